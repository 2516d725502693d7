"""The DiT's caption pathway alone: what a DiT trained only at flow time t ~ 0 draws for a prompt.

At t ~ 0 the DiT's input x_t is pure noise, so the best prediction of the data is the caption's
mean latent E[x1 | caption], and only the caption (through attention) can supply it. Such a DiT's
one-step data estimate x0 + v(x0, 0), averaged over noise draws, is decoded and scored with
ShapesGenEval. On held-out prompts that measures how far the conditioning pathway alone carries
unseen compositions, with no sampler involved and at a fraction of the samples the whole flow
needs. Mean images blur wherever a caption leaves the layout open, so the reference is the
training captions' true mean latents scored the same way (`caption_means`).
"""
from __future__ import annotations

import collections
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from svg_jax import generate
from svg_jax.data import records
from svg_jax.demo import evaluate as demo_eval
from svg_jax.demo import geneval

# t = sigmoid(-8 + 0.01 n): 3.4e-4, below 1e-3 up to ~100 sigma. No time shift, which would move
# t further toward noise by a factor that depends on the token count.
PURE_NOISE_FLOW = {"timestep_sampling": "logit_normal", "logit_mean": -8.0, "logit_std": 0.01,
                   "resolution_shift": False}


def set_pure_noise_times(config: ml_collections.ConfigDict) -> None:
  """Makes a DiT training config draw every flow time at ~3e-4 (x_t is pure noise)."""
  config.flow.update(PURE_NOISE_FLOW)


def mean_estimates(generator: generate.Generator, prompts: Sequence[str], resolution, *,
                   draws: int = 16, batch_size: int = 50, seed: int = 0) -> np.ndarray:
  """[N, h, w, C]: x0 + v(x0, t=0, prompt) averaged over `draws` noise draws (conditional only,
  no CFG), in the records' normalized latent space. Draw k of prompt i uses the noise of seed
  seed + i * draws + k (`Generator.noise`), so every (prompt, draw) has its own noise."""
  if draws < 1 or batch_size < 1:
    raise ValueError(f"draws and batch_size must be >= 1, got {draws}, {batch_size}")
  prompts = list(prompts)
  if not prompts:
    raise ValueError("no prompts")
  shape = generator.latent_shape(resolution)
  length = generator.text_length(prompts)
  velocity = jax.jit(lambda params, x, feats, mask: generator.model.apply(
      {"params": params}, x, jnp.zeros((x.shape[0],), jnp.float32), feats, mask))
  out = []
  for start in range(0, len(prompts), batch_size):
    part = prompts[start:start + batch_size]
    b = len(part)
    feats, mask = generator.text_features(part, length)
    feats, mask = feats[:b], mask[:b]  # the conditional rows
    total = np.zeros((b,) + shape, np.float64)
    for k in range(draws):
      x0 = generator.noise([seed + (start + i) * draws + k for i in range(b)], shape)
      total += x0 + np.asarray(velocity(generator.params, x0, feats, mask))
    out.append((total / draws).astype(np.float32))
  return np.concatenate(out)


def caption_means(records_dir: str, prompts: Sequence[str]) -> np.ndarray:
  """[N, h, w, C]: the mean latent of the training records whose caption is prompts[i]."""
  wanted = set(prompts)
  total: dict[str, np.ndarray] = {}
  count: collections.Counter = collections.Counter()
  for _, rec in records.iter_records(records_dir):
    caption = rec["caption"]
    if caption in wanted:
      latent = rec["latent"].astype(np.float64)
      total[caption] = total.get(caption, 0.0) + latent
      count[caption] += 1
  missing = sorted(wanted - set(count))
  if missing:
    raise ValueError(f"{len(missing)} prompts have no training record in {records_dir}, e.g. "
                     f"{missing[:3]}")
  return np.stack([total[p] / count[p] for p in prompts]).astype(np.float32)


def colour_and_shape(images: Sequence[np.ndarray], items: Sequence[dict]) -> dict[str, float]:
  """The colours category split in two: how often the largest object has the asked colour, and
  how often it has the asked shape (a prompt scores only when both are right)."""
  colour = shape = n = 0
  for image, item in zip(images, items):
    meta = item["metadata"]
    if meta["tag"] != "colors":
      continue
    asked = meta["include"][0]
    found = geneval.detect(image)
    n += 1
    colour += bool(found) and found[0].color == asked["color"]
    shape += bool(found) and found[0].shape == asked["class"]
  if not n:
    return {}
  return {"colors_colour_right": colour / n, "colors_shape_right": shape / n}


def evaluate(generator: generate.Generator, items: Sequence[dict], resolution, *,
             draws: int = 16, records_dir: str | None = None,
             outdir: str | None = None) -> dict:
  """Scores of the mean estimates of `items` ({prompt, metadata} lines of a shapes split).

  With `records_dir` (the prompts are training captions) also the estimates' mean-square
  distance to the true caption means and the scores of those means: the best a perfect caption
  pathway can do. With `outdir`: grid.png, grid_prompts.txt and scores.json.
  """
  if not items:
    raise ValueError("no prompts to evaluate")
  prompts = [item["prompt"] for item in items]
  metadata = [item["metadata"] for item in items]
  estimates = mean_estimates(generator, prompts, resolution, draws=draws)
  images = generator.decode(estimates)
  report = {"scores": geneval.score(list(images), metadata),
            **colour_and_shape(images, items), "draws": draws}
  if records_dir:
    means = caption_means(records_dir, prompts)
    report["distance_to_caption_means"] = float(np.mean((estimates - means) ** 2))
    report["caption_means_scores"] = geneval.score(list(generator.decode(means)), metadata)
  if outdir:
    demo_eval.save(outdir, images, prompts,
                   {**report, "counts": demo_eval.category_counts(items),
                    "num_prompts": len(items)})
  return report
