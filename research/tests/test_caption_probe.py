"""The caption probe: its targets say what the rendered images show, and its readers tell features
that carry held-out combinations (word context) from features that only tell captions apart
(identity)."""
import numpy as np
import pytest

from research import caption_probe as cp
from svg_jax.demo import shapes


def _centre(box):
  return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_targets_agree_with_the_rendered_objects(split):
  """Counts, named colours and relation sides against the objects each item is drawn from."""
  seen_sides = {"horizontal": 0, "vertical": 0}
  for index in range(240):
    item = shapes.item_spec(0, split, index, 64)
    y = cp.prompt_targets(item["metadata"])
    objs = item["objects"]
    for s, shape in enumerate(shapes.SHAPES):
      mine = [o for o in objs if o["shape"] == shape]
      assert y[0, s] == len(mine), item["prompt"]
      if y[1, s]:
        assert {o["color"] for o in mine} == {shapes.COLORS[y[1, s] - 1]}, item["prompt"]
      elif mine:
        assert shapes.COLORS[0] not in item["prompt"] or item["metadata"]["tag"] != "colors"
    if item["metadata"]["tag"] in ("colors", "color_attr"):
      assert all(y[1, shapes.SHAPES.index(o["shape"])] for o in objs), item["prompt"]
    for row, axis, coord in ((2, "horizontal", 0), (3, "vertical", 1)):
      named = np.flatnonzero(y[row])
      if named.size:
        assert named.size == 2, item["prompt"]
        first, second = sorted(named, key=lambda s: y[row, s])  # side 1 (left / above) first
        a = _centre(next(o["box"] for o in objs if o["shape"] == shapes.SHAPES[first]))
        b = _centre(next(o["box"] for o in objs if o["shape"] == shapes.SHAPES[second]))
        assert a[coord] < b[coord], item["prompt"]  # image y grows downwards: above = smaller
        seen_sides[axis] += 1
  assert min(seen_sides.values()) > 5  # both axes were exercised


def test_category_accuracy_weights_prompts_by_their_items_and_averages_categories():
  meta = [{"tag": "colors"}, {"tag": "colors"}, {"tag": "counting"}]
  targets = np.zeros((3, len(cp.ATTRIBUTES), len(shapes.SHAPES)), np.int32)
  predicted = targets.copy()
  predicted[1, 1, 0] = 3  # the second colour prompt read wrong in one entry
  scores = cp.category_accuracy(predicted, targets, meta, weights=[3, 1, 2])
  assert scores["colors"] == pytest.approx(0.75)
  assert scores["counting"] == 1.0
  assert scores["overall"] == pytest.approx((0.75 + 1.0) / 2)


def _splits():
  train = cp.distinct_prompts([shapes.item_spec(0, "train", i, 64) for i in range(2000)])
  held = cp.distinct_prompts([shapes.item_spec(0, "heldout", i, 64) for i in range(300)])
  return train, held


def test_word_context_carries_held_out_colours_and_relations_but_caption_identity_does_not():
  """The probe must be able to tell both apart: a reader of word + previous word reads unseen
  colour-shape pairs, attributions and relations; features that only identify the caption read
  the repeated single-object prompts and nothing new."""
  (tp, tm, _), (hp, hm, hc) = _splits()
  prompts = tp + hp
  vocabulary = sorted({w for p in prompts for w in p.split()})
  feats, mask = cp.word_context_features(prompts, vocabulary, 10)
  n = len(tp)
  words = cp.probe((feats[:n], mask[:n], tm), (feats[n:], mask[n:], hm, hc), seeds=(0,))
  assert len(words["heldout"]) == 1
  got = words["heldout"][0]
  for category in ("colors", "position", "color_attr", "single_object", "two_object"):
    assert got[category] >= 0.95, (category, got)

  # An independent random code per (distinct prompt, token position): every caption and token
  # told apart, nothing shared between captions (a held-out repeat of a training prompt keeps its
  # codes). 512 channels instead of a one-hot's 3,100: the same verdicts, a third of the time.
  index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
  codes = np.random.default_rng(0).standard_normal((len(index), mask.shape[1], 512))
  ident = np.stack([codes[index[p]] for p in prompts]).astype(np.float32)
  identity = cp.probe((ident[:n], mask[:n], tm), (ident[n:], mask[n:], hm, hc), seeds=(0,))
  got = identity["heldout"][0]
  print("word context:", words["heldout"][0], "\nidentity:", got)
  assert got["single_object"] == 1.0  # the same four prompts as in training
  for category in ("colors", "position", "color_attr", "counting"):
    assert got[category] <= 0.2, (category, got)


def test_word_context_refuses_prompts_longer_than_its_length():
  with pytest.raises(ValueError, match="more than length"):
    cp.word_context_features(["a photo of a red circle"], ["a", "photo", "of", "red", "circle"], 4)
