"""The shapes GenEval scorer: the documented scores on ground truth (0.997 at 64 px, 1.0 at
128 px), robust to blur / noise / colour shift, low on images of the wrong prompt, GenEval's
position rule and clause semantics."""
import collections

import numpy as np
import pytest
from PIL import Image, ImageFilter

import shape_items
from svg_jax.demo import geneval as sg
from svg_jax.demo import shapes


def _heldout(count, size, seed=0):
  items = [shape_items.make_item(seed, "heldout", i, size) for i in range(count)]
  return [it["image"] for it in items], [it["metadata"] for it in items]


def _degrade(images, blur, noise, shift, seed=0):
  """Gaussian blur (std in px), gaussian pixel noise (std, 0..255), a random per-channel colour
  shift in [-shift, shift] per image."""
  rng = np.random.default_rng(seed)
  out = []
  for img in images:
    im = Image.fromarray(img)
    if blur:
      im = im.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(im, np.float32) + rng.normal(0, noise, img.shape)
    a += rng.uniform(-shift, shift, size=3)
    out.append(np.clip(np.round(a), 0, 255).astype(np.uint8))
  return out


def _report(name, scores):
  print(f"\n{name}")
  sg.print_table(scores)


# docs/components.md: 0.997 at 64 px (one miscount of 50), 1.000 at 128 px
@pytest.mark.parametrize("size,count,overall,worst", [
    (64, 300, 0.997, 0.98), (128, 120, 1.0, 1.0)])
def test_ground_truth_scores_as_documented(size, count, overall, worst):
  images, metas = _heldout(count, size)
  results = sg.evaluate_images(images, metas)
  scores = sg.summarize(results)
  _report(f"ground truth, held-out, {size}px", scores)
  assert round(scores["overall"], 3) >= overall
  assert min(scores[c] for c in shapes.CATEGORIES) >= worst
  # detections agree with what was drawn: shape, colour, box (thin tips fall below half coverage
  # and the median trims them, so a triangle's apex may sit up to 2px low)
  for i in range(12):
    item = shapes.item_spec(0, "heldout", i, size)
    dets = results[i]["detections"]
    assert sorted((d.shape, d.color) for d in dets) == \
        sorted((o["shape"], o["color"]) for o in item["objects"])
    for obj in item["objects"]:
      det = min(dets, key=lambda d: np.abs(np.subtract(d.box, obj["box"])).sum())
      np.testing.assert_allclose(det.box, obj["box"], atol=2.0)


@pytest.mark.parametrize("size,blur", [(64, 0.8), (128, 1.5)])
def test_mild_degradation_scores_high(size, blur):
  images, metas = _heldout(180, size)
  scores = sg.score(_degrade(images, blur=blur, noise=6, shift=10), metas)
  _report(f"blur {blur}px + noise 6 + shift 10, {size}px", scores)
  assert scores["overall"] >= 0.98


def test_strong_degradation_report():
  images, metas = _heldout(180, 64)
  drawn = [sorted(o["color"] for o in shapes.item_spec(0, "heldout", i, 64)["objects"])
           for i in range(len(images))]
  # Colour survives even extreme degradation, stated against what was drawn: palette colours and
  # the background are >= 150 apart in RGB, so a pixel keeps its nearest colour under any change
  # below half that. The largest shift (25 per channel) moves a pixel by at most 25 * sqrt(3) = 43,
  # which leaves 32 for the noise; after the 3x3 median its std is ~0.42 x 30 = 13 per channel, so
  # an object's interior keeps its colour and every object is found in it. That no object is
  # invented (a blurred rim is a grey-colour blend, which a shift can move nearer a third colour)
  # is measured, not derived: 180 of 180 images at both levels.
  table = np.array([shapes.BACKGROUND, *shapes.PALETTE.values()], np.float64)
  separation = min(np.linalg.norm(a - b) for i, a in enumerate(table) for b in table[:i])
  assert 25 * np.sqrt(3) < separation / 2, separation
  scores = {}
  for name, blur, noise, shift in (("strong", 1.5, 20, 15), ("extreme", 2.0, 30, 25)):
    results = sg.evaluate_images(_degrade(images, blur=blur, noise=noise, shift=shift), metas)
    scores[name] = sg.summarize(results)
    _report(f"{name}: blur {blur}px + noise {noise} + shift {shift}, 64px", scores[name])
    found = [sorted(d.color for d in r["detections"]) for r in results]
    wrong = [i for i, (f, d) in enumerate(zip(found, drawn)) if f != d]
    assert not wrong, [(i, found[i], drawn[i]) for i in wrong[:5]]
  # Shape identity is what goes first, and how far is not derivable from the ground truth: a
  # diamond 19 px wide blurred by 1.5 px and noised reads as a circle although its blur (0.08 of
  # its side) is within the scorer's templates (up to 0.09), and 12-18 px shapes blurred by 2 px
  # are genuinely ambiguous. So these are regression floors under the measured 0.956 and 0.761.
  assert scores["strong"]["overall"] >= 0.93
  assert scores["extreme"]["overall"] >= 0.6


def test_wrong_prompt_scores_low():
  images, metas = _heldout(300, 64)
  rolled = sg.score(images[1:] + images[:1], metas)  # each image against its neighbour's prompt
  perm = np.random.default_rng(0).permutation(len(images))
  shuffled = sg.score([images[j] for j in perm], metas)
  _report("wrong prompt (rolled by one)", rolled)
  _report("wrong prompt (random permutation)", shuffled)
  # measured 0.107 and 0.153; single_object is high by design (any image with that shape passes)
  assert rolled["overall"] <= 0.35 and shuffled["overall"] <= 0.35
  assert rolled["color_attr"] <= 0.1 and shuffled["color_attr"] <= 0.1
  blank = sg.score([np.full((64, 64, 3), shapes.BACKGROUND, np.uint8)] * 6, metas[:6])
  assert blank["overall"] == 0.0


def test_training_combinations_do_not_pass_heldout_prompts():
  """A model that ignores the novel combination and draws training-like content scores low."""
  _, metas = _heldout(120, 64)
  train = [shape_items.make_item(0, "train", i, 64)["image"] for i in range(120)]
  scores = sg.score(train, metas)  # same categories, training combinations
  _report("training images against held-out prompts", scores)
  assert scores["overall"] <= 0.15
  for cat in ("colors", "color_attr", "position", "counting", "two_object"):
    assert scores[cat] <= 0.1


def _bfs_components(labels):
  """Independent reference: breadth-first 4-connected labelling of equal non-zero labels."""
  h, w = labels.shape
  comp = -np.ones((h, w), int)
  for sy in range(h):
    for sx in range(w):
      if labels[sy, sx] == 0 or comp[sy, sx] >= 0:
        continue
      queue = collections.deque([(sy, sx)])
      comp[sy, sx] = sy * w + sx
      while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
          if (0 <= ny < h and 0 <= nx < w and comp[ny, nx] < 0
              and labels[ny, nx] == labels[sy, sx]):
            comp[ny, nx] = sy * w + sx
            queue.append((ny, nx))
  return comp


def test_connected_components_match_bfs():
  rng = np.random.default_rng(0)
  for density in (0.3, 0.6, 0.9):
    labels = np.where(rng.random((40, 37)) < density, rng.integers(1, 4, (40, 37)), 0)
    np.testing.assert_array_equal(sg.connected_components(labels), _bfs_components(labels))
  # diagonal contact is not contact; a long snake is one component (many propagation rounds)
  diagonal = sg.connected_components(np.array([[1, 0], [0, 1]]))
  assert diagonal[0, 0] != diagonal[1, 1] and diagonal[0, 1] == -1
  snake = np.zeros((21, 21), int)
  snake[::4, :20] = 1
  snake[:, 19] = 0
  for r in range(0, 17, 4):
    snake[r:r + 5, 19 if (r // 4) % 2 == 0 else 0] = 1
  snake[1::2, 1::2] = np.where(snake[1::2, 1::2] == 0, 2, snake[1::2, 1::2])
  np.testing.assert_array_equal(sg.connected_components(snake), _bfs_components(snake))
  assert len(np.unique(sg.connected_components(snake)[snake == 1])) == 1


def test_relative_position_is_geneval_rule():
  # hand-computed with GenEval's formula (threshold 0.1, boxes x0, y0, x1, y1)
  a = (0, 0, 10, 10)
  assert sg.relative_position(a, (12, 0, 22, 10)) == {"left of"}     # dx = -(12-2)/12
  assert sg.relative_position((12, 0, 22, 10), a) == {"right of"}
  assert sg.relative_position(a, (0, 30, 10, 40)) == {"above"}       # y grows downwards
  assert sg.relative_position(a, (0, -30, 10, -20)) == {"below"}
  assert sg.relative_position(a, (1, 0, 11, 10)) == set()            # within the threshold
  assert sg.relative_position(a, (20, 20, 30, 30)) == {"left of", "above"}  # -18/28.3 each
  assert sg.relative_position(a, (20, 12, 30, 22)) == {"left of"}    # (-18, -10) / 23.3
  # the shrink is threshold x (10 + 10): offset 4.1 -> 2.1 / 4.1 = 0.51 > 0.5 at 0.1, just
  # 3.9 -> 1.9 / 3.9 = 0.49 is not enough, and at 0.2 the shrink swallows 4.1 whole
  assert sg.relative_position(a, (4.1, 0, 14.1, 10)) == {"left of"}
  assert sg.relative_position(a, (3.9, 0, 13.9, 10)) == set()
  assert sg.relative_position(a, (4.1, 0, 14.1, 10), threshold=0.2) == set()


def _det(shape, color, box, area):
  return sg.Detection(shape, color, tuple(map(float, box)), area)


def test_clause_semantics_follow_geneval():
  red_big = _det("circle", "red", (0, 0, 20, 20), 300)
  blue_small = _det("circle", "blue", (40, 0, 50, 10), 80)
  square = _det("square", "green", (40, 40, 60, 60), 400)
  ok = lambda dets, meta: sg.evaluate_detections(sorted(dets, key=lambda d: -d.area), meta)[0]
  two = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
         "exclude": [{"class": "circle", "count": 3}], "prompt": "a photo of two circles"}
  assert ok([red_big, blue_small], two)
  assert not ok([red_big], two)
  assert not ok([red_big, blue_small, _det("circle", "red", (0, 40, 8, 48), 50)], two)
  # colour is judged on the most confident (largest) object of the class only, as in GenEval
  red = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}
  blue = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "blue"}]}
  assert ok([red_big, blue_small], red) and not ok([red_big, blue_small], blue)
  # position: subject against every object of the target group
  left = {"tag": "position", "include": [
      {"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["below", 0]}]}
  assert ok([red_big, square], left)
  correct, reason = sg.evaluate_detections([square], left)
  assert not correct and "no target" in reason
  right = {"tag": "position", "include": [
      {"class": "circle", "count": 1}, {"class": "square", "count": 1,
                                         "position": ["left of", 0]}]}
  correct, reason = sg.evaluate_detections([square, red_big], right)
  assert not correct and "expected square left of target" in reason
  # color_attr: both clauses must hold
  attr = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                           {"class": "square", "count": 1, "color": "green"}]}
  assert ok([red_big, square], attr)
  assert not ok([blue_small, square], attr)


def test_summary_and_table():
  results = ([{"tag": "colors", "correct": c} for c in (True, True, False, True)]
             + [{"tag": "position", "correct": c} for c in (False, True)])
  scores = sg.summarize(results)
  assert scores == {"colors": 0.75, "position": 0.5, "overall": 0.625}  # mean of categories
  table = sg.format_table(scores, counts={"colors": 4, "position": 2})
  rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
  assert rows == {"colors": ["0.7500", "4"], "position": ["0.5000", "2"],
                  "overall": ["0.6250", "6"]}


def test_bad_inputs_are_named():
  img = np.full((64, 64, 3), 128, np.uint8)
  with pytest.raises(ValueError, match=r"missing keys \['include'\]"):
    sg.evaluate_image(img, {"tag": "colors"})
  with pytest.raises(ValueError, match="unknown tag"):
    sg.evaluate_image(img, {"tag": "spatial", "include": []})
  with pytest.raises(ValueError, match="unexpected keys"):
    sg.evaluate_image(img, {"tag": "colors", "include": [], "extra": 1})
  with pytest.raises(ValueError, match="unknown class"):
    sg.evaluate_image(img, {"tag": "colors", "include": [{"class": "dog", "count": 1}]})
  with pytest.raises(ValueError, match="unknown color"):
    sg.evaluate_image(img, {"tag": "colors",
                            "include": [{"class": "circle", "count": 1, "color": "teal"}]})
  with pytest.raises(ValueError, match="earlier include"):
    sg.evaluate_image(img, {"tag": "position", "include": [
        {"class": "circle", "count": 1, "position": ["above", 0]}]})
  with pytest.raises(ValueError, match="RGB"):
    sg.detect(np.zeros((64, 64), np.uint8))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    sg.detect(np.full((64, 64, 3), 2.0, np.float32))
  with pytest.raises(ValueError, match="2 images but 1"):
    sg.score([img, img], [{"tag": "colors", "include": []}])
  # float [0, 1] images and PIL images score like uint8 ones
  item = shape_items.make_item(0, "heldout", 4, 64)
  as_float = item["image"].astype(np.float32) / 255.0
  for image in (as_float, Image.fromarray(item["image"])):
    assert sg.evaluate_image(image, item["metadata"])["correct"]
