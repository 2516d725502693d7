"""The offline shapes dataset: determinism, on-disk layout, held-out combinations, GenEval
format."""
import json

import numpy as np
import pytest
from PIL import Image

import shape_items
from svg_jax import assets
from svg_jax.demo import shapes



def _real_geneval() -> list[dict]:
  """The official GenEval prompt metadata shipped with SVG-T2I (553 entries)."""
  with open(assets.GENEVAL_PROMPTS) as f:
    return [json.loads(line) for line in f if line.strip()]


def _combinations(item: dict) -> dict[str, set]:
  """The compositional combinations an item shows: image-level colour-shape pairs, and the
  caption-level relation key / (count, shape) / two_object shape pair."""
  out: dict[str, set] = {
      "color_shape": {(o["color"], o["shape"]) for o in item["objects"]},
      "relation": set(), "count": set(), "pair": set(),
  }
  meta = item["metadata"]
  include = meta["include"]
  if meta["tag"] == "position":
    relation, target = include[1]["position"]
    out["relation"].add(shapes.relation_key(include[1]["class"], relation,
                                            include[target]["class"]))
  elif meta["tag"] == "counting":
    out["count"].add((include[0]["count"], include[0]["class"]))
  elif meta["tag"] == "two_object":
    out["pair"].add(frozenset(i["class"] for i in include))
  return out


def _specs(split, count, seed=0, size=64, layouts="jittered"):
  return [shapes.item_spec(seed, split, i, size, layouts) for i in range(count)]


def test_rendering_is_deterministic_by_seed():
  for split in shapes.SPLITS:
    for i in (0, 5, 17):
      a, b = shape_items.make_item(7, split, i, 64), shape_items.make_item(7, split, i, 64)
      assert a["prompt"] == b["prompt"] and a["objects"] == b["objects"]
      np.testing.assert_array_equal(a["image"], b["image"])
  # another seed gives other images (compare a whole batch: any single pair could collide)
  imgs7 = np.stack([shape_items.make_item(7, "train", i, 64)["image"] for i in range(12)])
  imgs8 = np.stack([shape_items.make_item(8, "train", i, 64)["image"] for i in range(12)])
  assert not np.array_equal(imgs7, imgs8)
  # the two splits are different streams
  assert _specs("train", 12) != _specs("heldout", 12)


def test_rendered_pixels_match_objects():
  item = shape_items.make_item(0, "train", 3, 128)  # a colors item: one object
  img = item["image"]
  assert img.shape == (128, 128, 3) and img.dtype == np.uint8
  obj, = item["objects"]
  x0, y0, x1, y1 = obj["box"]
  # centre pixel is the exact palette colour, corners of the image are the background
  cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2 + (y1 - y0) * 0.15)
  assert tuple(img[cy, cx]) == shapes.PALETTE[obj["color"]]
  for y, x in ((0, 0), (0, 127), (127, 0), (127, 127)):
    assert tuple(img[y, x]) == shapes.BACKGROUND
  # anti-aliasing is mild: pixels are the background, the object colour or a blend on a thin rim
  exact = np.all(img == shapes.BACKGROUND, -1) | np.all(img == shapes.PALETTE[obj["color"]], -1)
  rim = (~exact).sum()
  perimeter = 4 * (x1 - x0)
  assert rim <= 1.6 * perimeter, (rim, perimeter)
  coverage = exact.mean()
  assert coverage > 0.9


def test_write_dataset_layout_and_idempotence(tmp_path):
  out = tmp_path / "shapes"
  manifest = shapes.write_dataset(str(out), num_train=14, num_heldout=8, image_size=64, seed=3)
  assert manifest["counts"] == {"train": 14, "heldout": 8}
  assert manifest["seed"] == 3 and manifest["image_size"] == 64
  with open(out / "manifest.json") as f:
    assert json.load(f) == manifest
  for split, count in (("train", 14), ("heldout", 8)):
    with open(out / f"{split}.jsonl") as f:
      lines = [json.loads(line) for line in f]
    assert len(lines) == count
    for i, line in enumerate(lines):
      assert set(line) == {"path", "prompt", "metadata", "objects"}
      assert line["path"] == f"{split}/{i:06d}.png"  # relative to the jsonl's directory
      assert line["prompt"] == line["metadata"]["prompt"]
      assert line["metadata"]["tag"] == shapes.CATEGORIES[i % 6]
      with Image.open(out / line["path"]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
        pixels = np.asarray(im)
      ref = shape_items.make_item(3, split, i, 64)
      np.testing.assert_array_equal(pixels, ref["image"])
      assert line["prompt"] == ref["prompt"] and line["objects"] == ref["objects"]
    absolute = shapes.read_split(str(out), split)
    assert [a["path"] for a in absolute] == [str(out / line["path"]) for line in lines]

  # rerun on a complete directory writes nothing
  files = sorted(p for p in out.rglob("*") if p.is_file())
  stamps = {p: p.stat().st_mtime_ns for p in files}
  assert shapes.write_dataset(str(out), 14, 8, 64, 3) == manifest
  assert {p: p.stat().st_mtime_ns for p in files} == stamps
  # an interrupted run (missing image, missing jsonl) is finished with identical bytes
  victim = out / "train" / "000005.png"
  original = victim.read_bytes()
  victim.unlink()
  (out / "heldout.jsonl").unlink()
  shapes.write_dataset(str(out), 14, 8, 64, 3)
  assert victim.read_bytes() == original
  assert (out / "heldout.jsonl").is_file()
  # different arguments on the same directory are refused with the differing fields named
  with pytest.raises(ValueError, match="seed"):
    shapes.write_dataset(str(out), 14, 8, 64, 4)
  with pytest.raises(ValueError, match="counts"):
    shapes.write_dataset(str(out), 15, 8, 64, 3)
  # a prefix of a bigger dataset is the smaller dataset
  big = tmp_path / "big"
  shapes.write_dataset(str(big), 20, 8, 64, 3)
  assert (big / "train" / "000005.png").read_bytes() == original


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="split"):
    shapes.item_spec(0, "valid", 0, 64)
  with pytest.raises(ValueError, match="category"):
    shapes.sample_item(np.random.default_rng(0), "spatial", "train", 64)
  with pytest.raises(ValueError, match="image_size"):
    shapes.write_dataset("/nonexistent/never", 1, 1, 16, 0)
  with pytest.raises(ValueError, match="num_train"):
    shapes.write_dataset("/nonexistent/never", -1, 1, 64, 0)
  with pytest.raises(FileNotFoundError, match="not a shapes dataset folder"):
    shapes.read_split("/nonexistent/never", "train")


@pytest.mark.parametrize("layouts", shapes.LAYOUTS)
def test_heldout_combinations_never_in_training(layouts):
  train = _specs("train", 1800, layouts=layouts)
  held = _specs("heldout", 600, layouts=layouts)
  seen = {k: set() for k in ("color_shape", "relation", "count", "pair")}
  for item in train:
    for k, v in _combinations(item).items():
      seen[k] |= v
  # nothing held out occurs in training: colour-shape pairs in any training *image*
  assert not seen["color_shape"] & shapes.HELDOUT_COLOR_SHAPE
  assert not seen["relation"] & shapes.HELDOUT_RELATIONS
  assert not seen["count"] & shapes.HELDOUT_COUNTS
  assert not seen["pair"] & shapes.HELDOUT_PAIRS
  # ... while everything else does, so training covers each colour and each shape
  all_pairs = {(c, s) for c in shapes.COLORS for s in shapes.SHAPES}
  assert seen["color_shape"] == all_pairs - shapes.HELDOUT_COLOR_SHAPE
  assert {c for c, _ in seen["color_shape"]} == set(shapes.COLORS)
  assert {s for _, s in seen["color_shape"]} == set(shapes.SHAPES)
  for color, shape in shapes.HELDOUT_COLOR_SHAPE:  # each part seen, only the pairing is new
    assert any(c == color for c, _ in seen["color_shape"])
    assert any(s == shape for _, s in seen["color_shape"])
  for axis, first, second in shapes.HELDOUT_RELATIONS:  # the mirrored arrangement is trained
    assert (axis, second, first) in seen["relation"]
  assert len(seen["relation"]) == 2 * 12 - len(shapes.HELDOUT_RELATIONS)

  # every held-out item of a compositional category shows a held-out combination of its kind
  held_seen = {k: set() for k in seen}
  for item in held:
    combos = _combinations(item)
    for k, v in combos.items():
      held_seen[k] |= v
    tag = item["metadata"]["tag"]
    if tag in ("colors", "color_attr"):
      assert combos["color_shape"] & shapes.HELDOUT_COLOR_SHAPE, item["prompt"]
    elif tag == "position":
      assert combos["relation"] <= shapes.HELDOUT_RELATIONS and combos["relation"]
    elif tag == "counting":
      assert combos["count"] <= shapes.HELDOUT_COUNTS and combos["count"]
    elif tag == "two_object":
      assert combos["pair"] <= shapes.HELDOUT_PAIRS and combos["pair"]
  assert held_seen["relation"] == shapes.HELDOUT_RELATIONS
  assert held_seen["count"] == shapes.HELDOUT_COUNTS
  assert held_seen["pair"] == shapes.HELDOUT_PAIRS
  assert shapes.HELDOUT_COLOR_SHAPE <= held_seen["color_shape"]

  # held-out prompts are unseen text, except single_object (only four exist)
  train_prompts = {item["prompt"] for item in train}
  for item in held:
    if item["metadata"]["tag"] != "single_object":
      assert item["prompt"] not in train_prompts, item["prompt"]


def test_relation_key_is_canonical():
  assert shapes.relation_key("circle", "left of", "square") == \
      shapes.relation_key("square", "right of", "circle") == ("horizontal", "circle", "square")
  assert shapes.relation_key("circle", "above", "square") == \
      shapes.relation_key("square", "below", "circle") == ("vertical", "circle", "square")
  with pytest.raises(ValueError, match="relation"):
    shapes.relation_key("circle", "next to", "square")


@pytest.mark.parametrize("layouts", shapes.LAYOUTS)
def test_layout_keeps_objects_apart_and_inside(layouts):
  for split in shapes.SPLITS:
    for size in (64, 128):
      for item in _specs(split, 120, size=size, layouts=layouts):
        boxes = [o["box"] for o in item["objects"]]
        assert len(boxes) == sum(r["count"] for r in item["metadata"]["include"])
        for x0, y0, x1, y1 in boxes:
          assert 0 < x0 < x1 < size and 0 < y0 < y1 < size
          assert x1 - x0 >= 0.18 * size  # >= ~11.5px at 64: recognisable after blur
        for i, a in enumerate(boxes):
          for b in boxes[:i]:
            assert shapes._separated(a, b, gap=2.0)


def test_fixed_layouts_put_every_object_on_its_slot_at_one_size():
  """Fixed layouts: each object's box is centred on a template slot with the middle of its
  count's size range, relations hold by the template, and the rest of the item (prompt, colours,
  shapes) is what the jittered layout gives."""
  size = 64
  for split in shapes.SPLITS:
    fixed, jittered = _specs(split, 120, layouts="fixed"), _specs(split, 120)
    for item, other in zip(fixed, jittered):
      assert item["prompt"] == other["prompt"]
      assert [(o["shape"], o["color"]) for o in item["objects"]] == [
          (o["shape"], o["color"]) for o in other["objects"]]
      n = len(item["objects"])
      lo, hi = shapes._size_range(n)
      slots = set(shapes.SLOTS[n]) | set(shapes.VERTICAL_PAIR if n == 2 else ())
      for o in item["objects"]:
        x0, y0, x1, y1 = o["box"]
        assert x1 - x0 == pytest.approx((lo + hi) / 2 * size, abs=1e-3)
        assert y1 - y0 == pytest.approx(x1 - x0, abs=1e-3)
        assert any(((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((cx * size, cy * size),
                                                                  abs=1e-3) for cx, cy in slots)
      if item["metadata"]["tag"] == "position":
        relation, _ = item["metadata"]["include"][1]["position"]
        target_box, subject_box = (o["box"] for o in item["objects"])
        assert shapes._clearly_related(subject_box, target_box, relation,
                                       shapes._gap(size))
  with pytest.raises(ValueError, match="layouts"):
    shapes.item_spec(0, "train", 0, 64, "random")


def test_metadata_mirrors_geneval_format():
  real = _real_geneval()
  assert len(real) == 553
  real_tags = {e["tag"] for e in real}
  assert set(shapes.CATEGORIES) == real_tags == {
      "single_object", "two_object", "counting", "colors", "position", "color_attr"}

  def structure(entry):
    """Keys per level, the numbers and words GenEval uses; no class names."""
    return (tuple(entry),
            tuple(tuple(sorted(req)) for req in entry["include"]),
            tuple(tuple(sorted(req)) for req in entry.get("exclude", [])))

  real_structures = {}
  for e in real:
    real_structures.setdefault(e["tag"], set()).add(structure(e))
  real_colors = {r["color"] for e in real for r in e["include"] if "color" in r}
  real_relations = {r["position"][0] for e in real for r in e["include"] if "position" in r}
  real_counts = {r["count"] for e in real if e["tag"] == "counting" for r in e["include"]}

  ours = _specs("train", 60) + _specs("heldout", 60)
  assert {e["metadata"]["tag"] for e in ours} == real_tags
  for item in ours:
    meta = item["metadata"]
    assert structure(meta) in real_structures[meta["tag"]], meta
    assert meta["prompt"].startswith("a photo of ")
    for req in meta["include"]:
      assert req["class"] in shapes.SHAPES
      if "color" in req:
        assert req["color"] in real_colors  # GenEval's own colour words
      if "position" in req:
        rel, target = req["position"]
        assert rel in real_relations and target == 0
    if meta["tag"] == "counting":  # GenEval: exactly n means "n included, n + 1 excluded"
      (inc,), (exc,) = meta["include"], meta["exclude"]
      assert exc == {"class": inc["class"], "count": inc["count"] + 1}
      assert inc["count"] in real_counts
  assert set(shapes.RELATIONS) == real_relations
  assert set(shapes.COLORS) <= real_colors
