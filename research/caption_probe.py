"""How far caption features carry the held-out split's compositions: a text-side ceiling.

The DiT learns the shapes demo from a few hundred distinct training captions and is scored on
prompts whose combinations (colour-shape pairs, relations, counts, shape pairs) none of them shows.
It can only honour such a prompt where the prompt's features relate to those of seen captions in a
way a reader of them can reuse. This probe measures that without images:
- `prompt_targets`: what a prompt asks of each shape: how many (0 = absent), its colour if named,
  its side in a named relation (horizontal and vertical);
- a small attention reader (a learned query per shape and attribute over the caption's RMS-normed
  tokens, 1+ heads, a linear value and classifier: one cross-attention layer, the DiT's way of
  reading captions) is fit until it reads every distinct training caption right, then reads the
  held-out prompts;
- a prompt is read right when every target is, so the per-category accuracy is what ShapesGenEval
  would give a model that renders perfectly what this reader understands.
It bounds the DiT only loosely (a deeper reader may generalize differently, and readers of other
seeds do differ), but it separates what the caption side allows from what the DiT learns.

`word_context_features` is the reference encoding: each token is its word and the word before it,
one-hot. What a reader of it cannot recover, the split itself does not teach; what it recovers
and the text encoder's features do not, the text encoder loses.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from svg_jax.demo import shapes

ATTRIBUTES = ("count", "color", "horizontal", "vertical")
# Classes per attribute: count 0 (absent) .. 4; colour 0 (not named) + the palette; side 0 (no
# relation names the shape), 1 (left / above), 2 (right / below).
NUM_CLASSES = (max(shapes.COUNTS) + 1, len(shapes.COLORS) + 1, 3, 3)
READER_WIDTH = 64  # channels of the reader's pooled value, split among its heads
_SIDES = {"left of": ("horizontal", 1, 2), "right of": ("horizontal", 2, 1),
          "above": ("vertical", 1, 2), "below": ("vertical", 2, 1)}


def prompt_targets(metadata: Mapping[str, Any]) -> np.ndarray:
  """[len(ATTRIBUTES), len(SHAPES)] int: what a GenEval-format prompt asks of each shape."""
  out = np.zeros((len(ATTRIBUTES), len(shapes.SHAPES)), np.int32)
  row = {name: i for i, name in enumerate(ATTRIBUTES)}
  include = metadata["include"]
  for entry in include:
    s = shapes.SHAPES.index(entry["class"])
    out[row["count"], s] = entry["count"]
    if "color" in entry:
      out[row["color"], s] = 1 + shapes.COLORS.index(entry["color"])
  for entry in include:
    if "position" in entry:
      relation, target = entry["position"]
      axis, subject_side, target_side = _SIDES[relation]
      out[row[axis], shapes.SHAPES.index(entry["class"])] = subject_side
      out[row[axis], shapes.SHAPES.index(include[target]["class"])] = target_side
  return out


def distinct_prompts(items: Sequence[Mapping[str, Any]]
                     ) -> tuple[list[str], list[dict], np.ndarray]:
  """(prompts, their metadata, how many items each has), in order of first appearance."""
  order: dict[str, int] = {}
  metadata: list[dict] = []
  counts: list[int] = []
  for item in items:
    prompt = item["prompt"]
    if prompt not in order:
      order[prompt] = len(metadata)
      metadata.append(item["metadata"])
      counts.append(0)
    counts[order[prompt]] += 1
  return list(order), metadata, np.asarray(counts)


def word_context_features(prompts: Sequence[str], vocabulary: Sequence[str],
                          length: int) -> tuple[np.ndarray, np.ndarray]:
  """The reference encoding: token i = one-hot(word i) ++ one-hot(word i - 1), [N, length, 2V]."""
  index = {w: i for i, w in enumerate(vocabulary)}
  v = len(vocabulary)
  feats = np.zeros((len(prompts), length, 2 * v), np.float32)
  mask = np.zeros((len(prompts), length), bool)
  for n, prompt in enumerate(prompts):
    words = prompt.split()
    if len(words) > length:
      raise ValueError(f"{prompt!r} has {len(words)} words, more than length {length}")
    for i, word in enumerate(words):
      feats[n, i, index[word]] = 1.0
      if i:
        feats[n, i, v + index[words[i - 1]]] = 1.0
    mask[n, :len(words)] = True
  return feats, mask


def init_reader(key: jax.Array, feature_dim: int, num_heads: int = 1) -> dict:
  if num_heads < 1 or READER_WIDTH % num_heads:
    raise ValueError(f"num_heads must divide {READER_WIDTH}, got {num_heads}")
  head_dim = READER_WIDTH // num_heads
  k = jax.random.split(key, 3 + len(ATTRIBUTES))
  return {
      "queries": 0.1 * jax.random.normal(
          k[0], (len(ATTRIBUTES), len(shapes.SHAPES), num_heads, head_dim)),
      "keys": jax.random.normal(k[1], (feature_dim, num_heads, head_dim)) / np.sqrt(feature_dim),
      "values": jax.random.normal(k[2], (feature_dim, num_heads, head_dim)) / np.sqrt(feature_dim),
      "heads": [0.1 * jax.random.normal(k[3 + a], (READER_WIDTH, n))
                for a, n in enumerate(NUM_CLASSES)],
  }


def reader_logits(params: dict, features: jax.Array, mask: jax.Array) -> list[jax.Array]:
  """Per attribute: logits [N, len(SHAPES), classes] of every shape's query."""
  k = jnp.einsum("nlf,fhd->nlhd", features, params["keys"])
  v = jnp.einsum("nlf,fhd->nlhd", features, params["values"])
  scores = jnp.einsum("ashd,nlhd->nashl", params["queries"], k) / np.sqrt(k.shape[-1])
  scores = jnp.where(mask[:, None, None, None, :], scores, -1e9)
  pooled = jnp.einsum("nashl,nlhd->nashd", jax.nn.softmax(scores, axis=-1), v)
  pooled = pooled.reshape(*pooled.shape[:3], -1)
  return [pooled[:, a] @ head for a, head in enumerate(params["heads"])]


@functools.partial(jax.jit, static_argnames=("steps", "lr", "l2"))
def _fit(params, features, mask, targets, *, steps: int, lr: float, l2: float):
  """Full-batch Adam on the readers' cross-entropy; one compile per feature shape, not per seed."""
  def loss(p):
    logits = reader_logits(p, features, mask)
    ce = sum(optax.softmax_cross_entropy_with_integer_labels(lg, targets[:, a]).mean()
             for a, lg in enumerate(logits))
    return ce + l2 * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

  opt = optax.adam(lr)

  def step(carry, _):
    p, state = carry
    updates, state = opt.update(jax.grad(loss)(p), state, p)
    return (optax.apply_updates(p, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params


def fit_reader(features: np.ndarray, mask: np.ndarray, targets: np.ndarray, *, seed: int,
               steps: int = 1500, lr: float = 3e-3, l2: float = 1e-4, num_heads: int = 1) -> dict:
  """A reader fit (full batch, Adam) to read `targets` [N, A, S] from `features` [N, L, D]."""
  params = init_reader(jax.random.key(seed), features.shape[-1], num_heads=num_heads)
  return _fit(params, jnp.asarray(features), jnp.asarray(mask), jnp.asarray(targets),
              steps=steps, lr=lr, l2=l2)


def read(params: dict, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Predicted targets [N, A, S]."""
  logits = reader_logits(params, jnp.asarray(features), jnp.asarray(mask))
  return np.stack([np.asarray(lg.argmax(-1)) for lg in logits], axis=1)


def category_accuracy(predicted: np.ndarray, targets: np.ndarray, metadata: Sequence[Mapping],
                      weights: np.ndarray | None = None) -> dict[str, float]:
  """Per category: the (weighted) share of prompts with every target read right; `overall` is the
  mean over categories, as GenEval's."""
  right = np.all(predicted == targets, axis=(1, 2))
  weights = np.ones(len(right)) if weights is None else np.asarray(weights, float)
  tags = np.asarray([m["tag"] for m in metadata])
  out = {}
  for category in shapes.CATEGORIES:
    sel = tags == category
    if sel.any():
      out[category] = float(np.sum(right[sel] * weights[sel]) / np.sum(weights[sel]))
  out["overall"] = float(np.mean([out[c] for c in out]))
  return out


def rms_normalize(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Each token scaled to unit RMS over its channels, as the DiT's caption embedder (an RMSNorm)
  does before anything reads it; padding stays zero."""
  rms = np.sqrt(np.mean(np.square(features, dtype=np.float64), axis=-1, keepdims=True)) + 1e-6
  return (features / rms * mask[..., None]).astype(np.float32)


def probe(train: tuple[np.ndarray, np.ndarray, Sequence[Mapping]],
          heldout: tuple[np.ndarray, np.ndarray, Sequence[Mapping], np.ndarray],
          seeds: Sequence[int] = (0, 1, 2, 3, 4), max_tries: int = 4,
          **fit_kwargs) -> dict[str, Any]:
  """Readers fit on `train` = (features, mask, metadata) of the distinct training captions, then
  scored on `heldout` = (features, mask, metadata, items per prompt).

  Only readers that read every training caption right count: a fit stuck short of that (attention
  that settles on the wrong tokens) is retried from another initialization, up to `max_tries` per
  seed. Returns per counted reader its category accuracy on the held-out prompts, and `failed_fits`.
  """
  (tf, tm, tmeta), (hf, hm, hmeta, hcount) = train, heldout
  tf, hf = rms_normalize(tf, tm), rms_normalize(hf, hm)
  ty = np.stack([prompt_targets(m) for m in tmeta])
  hy = np.stack([prompt_targets(m) for m in hmeta])
  heldout_scores, failed = [], 0
  for seed in seeds:
    for attempt in range(max_tries):
      params = fit_reader(tf, tm, ty, seed=seed + 1000 * attempt, **fit_kwargs)
      if np.all(read(params, tf, tm) == ty):
        heldout_scores.append(category_accuracy(read(params, hf, hm), hy, hmeta, hcount))
        break
      failed += 1
  if not heldout_scores:
    raise RuntimeError(f"no reader read all {len(tmeta)} training captions right in {failed} "
                       "tries: the features do not tell them apart, or this reader cannot route "
                       "them (try more heads or steps)")
  return {"heldout": heldout_scores, "failed_fits": failed}
