"""ShapesGenEval of a generator: one image per demo prompt (seed of the official eval, 42 + 4i),
scored with `geneval`; the evaluation behind `launch/evaluate.py` and the
demo's last stage."""
from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import numpy as np

from svg_jax import generate, sampling
from svg_jax.demo import geneval
from svg_jax.utils import atomic_files
from svg_jax.utils.progress import Progress

GRID_IMAGES = 32  # the first prompts' images in grid.png (8 per row)


def evaluate(generator: generate.Generator, items: Sequence[dict], resolution,
             settings: generate.SamplerSettings, *, batch_size: int = 64,
             outdir: str | None = None, report: dict | None = None) -> tuple[dict, np.ndarray]:
  """(scores, images) of the items ({prompt, metadata} lines of a shapes split). With `outdir`:
  grid.png + grid_prompts.txt (the first GRID_IMAGES) and scores.json (scores, counts, settings,
  and the caller's `report` fields)."""
  if not items:
    raise ValueError("no prompts to evaluate")
  prompts = [item["prompt"] for item in items]
  seeds = [sampling.eval_seed(i, 0) for i in range(len(prompts))]
  images = generator.generate(prompts, seeds, resolution, settings, batch_size=batch_size,
                              progress=Progress(len(prompts), what="images"))
  metadata = [item["metadata"] for item in items]
  scores = geneval.score(list(images), metadata)
  if outdir:
    save(outdir, images, prompts, {
        "scores": scores, "counts": category_counts(items), "num_prompts": len(items),
        "settings": {"steps": settings.steps, "cfg": settings.cfg_scale,
                     "cfg_mode": settings.cfg_mode, "renorm": settings.renorm,
                     "shift": settings.shift, "solver": settings.solver,
                     "resolution": list(resolution)},
        **(report or {}),
    })
  return scores, images


def save(outdir: str, images: np.ndarray, prompts: Sequence[str], report: dict) -> None:
  """grid.png + grid_prompts.txt (the first GRID_IMAGES) and `report` as scores.json."""
  os.makedirs(outdir, exist_ok=True)
  atomic_files.save_png(os.path.join(outdir, "grid.png"),
                        generate.make_grid(images[:GRID_IMAGES], cols=8))
  atomic_files.write_text(os.path.join(outdir, "grid_prompts.txt"),
                          "\n".join(prompts[:GRID_IMAGES]) + "\n")
  atomic_files.write_text(os.path.join(outdir, "scores.json"), json.dumps(report, indent=2))


def category_counts(items: Sequence[dict]) -> dict[str, int]:
  return dict(collections.Counter(item["metadata"]["tag"] for item in items))
