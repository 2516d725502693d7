"""The offline demo dataset: coloured shapes on a plain background with GenEval-style captions.

Every item is 1-4 flat shapes (circle, square, triangle, diamond) in six well separated colours,
rendered deterministically from (seed, split, index), with a caption in one of the six GenEval
categories and metadata in GenEval's own format (`tag`, `include: [{class, count, color?,
position?}]`, `exclude` for counting, `prompt`), so `geneval` (beside this file) can score
generated images the way GenEval scores them with a detector.

The held-out split tests composition: it only uses combinations that training never contains
  - colour-shape pairs (`HELDOUT_COLOR_SHAPE`): absent from every training image, captioned or not,
  - spatial relations between two shapes (`HELDOUT_RELATIONS`, canonical so that "A left of B" and
    "B right of A" count as the same combination): absent from training position captions,
  - (count, shape) pairs (`HELDOUT_COUNTS`): absent from training counting captions (and, since only
    counting images hold more than two objects, from training images),
  - unordered shape pairs of two_object captions (`HELDOUT_PAIRS`).
Every colour and every shape still occurs in training. single_object prompts cannot be novel (there
are four shapes), so the held-out split repeats them; all its other prompts are unseen in training.

On disk (`write_dataset`): `train.jsonl` / `heldout.jsonl` with one line per image
`{"path": "train/000000.png", "prompt": ..., "metadata": {GenEval entry}, "objects": [...]}` (paths
relative to the directory holding the jsonl, the official `{"path", "prompt"}` item plus extras),
the PNGs, and `manifest.json` written last, which marks the directory complete.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from svg_jax.data import jsonl as jsonl_lib
from svg_jax.input_errors import InputError, MissingInput
from svg_jax.utils import atomic_files

BACKGROUND = (128, 128, 128)
# Near-corners of the RGB cube around a mid-grey background: every pair is >= 150 apart in RGB,
# so a half-way blend at a blurred edge never lands nearer a third colour.
PALETTE = {
    "red": (225, 30, 30),
    "yellow": (235, 220, 30),
    "green": (25, 195, 35),
    "blue": (30, 60, 225),
    "purple": (195, 35, 225),
    "white": (245, 245, 245),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
COUNTS = tuple(NUMBER_WORDS)
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "heldout")

# Each colour loses one shape, each shape at most two colours: all still seen in training.
HELDOUT_COLOR_SHAPE = frozenset({
    ("red", "triangle"), ("yellow", "square"), ("green", "circle"),
    ("blue", "diamond"), ("purple", "triangle"), ("white", "circle"),
})
# Canonical relation keys (see `relation_key`): ("horizontal", left shape, right shape) or
# ("vertical", upper shape, lower shape). The mirrored arrangement stays in training.
HELDOUT_RELATIONS = frozenset({
    ("horizontal", "triangle", "circle"), ("horizontal", "square", "diamond"),
    ("vertical", "circle", "square"), ("vertical", "diamond", "triangle"),
})
HELDOUT_COUNTS = frozenset({(3, "triangle"), (4, "circle"), (2, "diamond")})
HELDOUT_PAIRS = frozenset({frozenset({"circle", "diamond"}), frozenset({"square", "triangle"})})

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: template layouts (1: uniform placement)
_SPLIT_CODE = {"train": 0, "heldout": 1}


def relation_key(subject: str, relation: str, target: str) -> tuple[str, str, str]:
  """Canonical key of "subject <relation> target": the same for "A left of B" and "B right of A"."""
  if relation == "left of":
    return ("horizontal", subject, target)
  if relation == "right of":
    return ("horizontal", target, subject)
  if relation == "above":
    return ("vertical", subject, target)
  if relation == "below":
    return ("vertical", target, subject)
  raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _phrase(shape: str, color: str | None = None) -> str:
  noun = f"{color} {shape}" if color else shape
  return f"{_article(noun)} {noun}"


# ------------------------------------------------------------------------------------------------
# Rendering


def shape_outline(shape: str, box: Sequence[float]) -> tuple[str, list[float]]:
  """('ellipse' | 'polygon', coordinates) of `shape` filling box = (x0, y0, x1, y1)."""
  x0, y0, x1, y1 = box
  xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
  if shape == "circle":
    return "ellipse", [x0, y0, x1, y1]
  if shape == "square":
    return "polygon", [x0, y0, x1, y0, x1, y1, x0, y1]
  if shape == "triangle":  # upright, apex at the top centre, base on the bottom edge
    return "polygon", [xm, y0, x1, y1, x0, y1]
  if shape == "diamond":
    return "polygon", [xm, y0, x1, ym, xm, y1, x0, ym]
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_mask(shape: str, size: int, supersample: int = 4) -> np.ndarray:
  """Coverage in [0, 1] of `shape` filling a size x size canvas (used as the scorer's template)."""
  canvas = Image.new("L", (size * supersample,) * 2, 0)
  _draw(ImageDraw.Draw(canvas), shape, (0, 0, size, size), supersample, 255)
  small = canvas.resize((size, size), Image.Resampling.BOX)
  return np.asarray(small, np.float32) / 255.0


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], ss: int, fill) -> None:
  kind, coords = shape_outline(shape, box)
  # Scale to the supersampled canvas; PIL fills inclusive pixel ranges, hence the -1 on far edges.
  if kind == "ellipse":
    x0, y0, x1, y1 = (c * ss for c in coords)
    draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
  else:
    pts = [(x * ss - (x * ss >= box[2] * ss), y * ss - (y * ss >= box[3] * ss))
           for x, y in zip(coords[0::2], coords[1::2])]
    draw.polygon(pts, fill=fill)


def render(objects: Sequence[dict], image_size: int, supersample: int = 4) -> np.ndarray:
  """uint8 [S, S, 3] image of `objects` ({shape, color, box}) on the plain background.

  Drawn at `supersample` x the size and box-filtered down: edges get a 1-pixel anti-aliased rim
  and nothing more, so the scorer stays exact on ground truth.
  """
  ss = int(supersample)
  canvas = Image.new("RGB", (image_size * ss,) * 2, BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for obj in objects:
    if obj["color"] not in PALETTE:
      raise ValueError(f"unknown colour {obj['color']!r}; expected one of {COLORS}")
    _draw(draw, obj["shape"], obj["box"], ss, PALETTE[obj["color"]])
  if ss > 1:
    canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
  return np.asarray(canvas, np.uint8)


# ------------------------------------------------------------------------------------------------
# Layout


def _size_range(n: int) -> tuple[float, float]:
  """Object side as a fraction of the image side, smaller when more objects share the image."""
  return {1: (0.3, 0.5), 2: (0.25, 0.36)}.get(n, (0.2, 0.28))


def _gap(image_size: int) -> float:
  return max(2.0, 0.06 * image_size)


def _margin(image_size: int) -> float:
  return max(1.0, 0.03 * image_size)


def _separated(a: Sequence[float], b: Sequence[float], gap: float) -> bool:
  return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _clearly_related(a: Sequence[float], b: Sequence[float], relation: str, gap: float) -> bool:
  """Box a is unambiguously `relation` box b: separated along that axis, aligned on the other."""
  dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
  dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
  if relation == "left of":
    return a[2] + gap <= b[0] and abs(dy) <= 0.3 * abs(dx)
  if relation == "right of":
    return b[2] + gap <= a[0] and abs(dy) <= 0.3 * abs(dx)
  if relation == "above":
    return a[3] + gap <= b[1] and abs(dx) <= 0.3 * abs(dy)
  if relation == "below":
    return b[3] + gap <= a[1] and abs(dx) <= 0.3 * abs(dy)
  raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


# Slot centres (fractions of the image side) per object count. Layouts are jittered templates, not
# uniform placements: with uniform placement an object's position holds most of an image's
# variance and a 17M DiT trained for minutes ignored the caption entirely (it changed the
# velocity by 7e-5); with templates the caption decides most of the image.
SLOTS = {
    1: ((0.5, 0.5),),
    2: ((0.27, 0.5), (0.73, 0.5)),
    3: ((0.27, 0.3), (0.73, 0.3), (0.5, 0.72)),
    4: ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)),
}
VERTICAL_PAIR = ((0.5, 0.27), (0.5, 0.73))
JITTER = 0.04  # uniform shift of each centre, fraction of the image side, per axis
# "jittered": centres shifted by up to JITTER and sides drawn from _size_range; "fixed": every
# object exactly on its slot with the middle of its size range. Fixed layouts leave the DiT a
# finite set of object patterns per slot, which a CPU-sized run learns in minutes (docs/demo.md).
LAYOUTS = ("jittered", "fixed")


def _slots(rng: np.random.Generator, n: int, relation: str | None) -> list[tuple[float, float]]:
  """The slot of each object: a random order of n's template, or the relation's ordered pair."""
  if relation is None:
    return [SLOTS[n][i] for i in rng.permutation(n)]
  if relation not in RELATIONS:
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
  pair = SLOTS[2] if relation in ("left of", "right of") else VERTICAL_PAIR
  return list(pair if relation in ("left of", "above") else pair[::-1])


def layout(rng: np.random.Generator, n: int, image_size: int,
           relation: str | None = None, layouts: str = "jittered") -> list[list[float]]:
  """n non-overlapping square boxes on the template of n (`layouts`: jittered or fixed); with
  `relation` (n == 2), box 0 is `relation` box 1."""
  if layouts not in LAYOUTS:
    raise ValueError(f"unknown layouts {layouts!r}; expected one of {LAYOUTS}")
  if relation is not None and n != 2:
    raise ValueError(f"a relation needs exactly 2 objects, got {n}")
  if n not in SLOTS:
    raise ValueError(f"layouts hold 1-{max(SLOTS)} objects, got {n}")
  lo, hi = _size_range(n)
  gap, m = _gap(image_size), _margin(image_size)
  slots = _slots(rng, n, relation)
  if layouts == "fixed":  # the templates are separated and related by construction
    side = (lo + hi) / 2 * image_size
    return [[cx * image_size - side / 2, cy * image_size - side / 2,
             cx * image_size + side / 2, cy * image_size + side / 2] for cx, cy in slots]
  scale = 1.0
  for _ in range(50):
    for _ in range(20):
      boxes: list[list[float]] = []
      for cx, cy in slots:
        side = rng.uniform(lo, hi) * image_size * scale
        jx, jy = rng.uniform(-JITTER, JITTER, size=2) * image_size
        x0 = float(np.clip(cx * image_size + jx - side / 2, m, image_size - m - side))
        y0 = float(np.clip(cy * image_size + jy - side / 2, m, image_size - m - side))
        boxes.append([x0, y0, x0 + side, y0 + side])
      apart = all(_separated(a, b, gap) for i, a in enumerate(boxes) for b in boxes[:i])
      if apart and (relation is None or _clearly_related(*boxes, relation, gap)):
        return boxes
    scale *= 0.9  # crowded: shrink and retry
  raise RuntimeError(f"could not place {n} objects in a {image_size}px image")


# ------------------------------------------------------------------------------------------------
# Captions and metadata


def _allowed_colors(shape: str, split: str) -> list[str]:
  if split == "heldout":
    return list(COLORS)
  return [c for c in COLORS if (c, shape) not in HELDOUT_COLOR_SHAPE]


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def sample_item(rng: np.random.Generator, category: str, split: str, image_size: int,
                layouts: str = "jittered") -> dict:
  """One item {prompt, metadata, objects} of `category` for `split` (no image yet)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  held = split == "heldout"
  if category == "single_object":
    shape = _pick(rng, SHAPES)
    shapes, colors = [shape], [_pick(rng, _allowed_colors(shape, split))]
    prompt = f"a photo of {_phrase(shape)}"
    include = [{"class": shape, "count": 1}]
    boxes = layout(rng, 1, image_size, layouts=layouts)
    extra = {}
  elif category == "two_object":
    pairs = [(a, b) for a in SHAPES for b in SHAPES
             if a != b and (frozenset((a, b)) in HELDOUT_PAIRS) == held]
    a, b = _pick(rng, pairs)
    shapes = [a, b]
    colors = [_pick(rng, _allowed_colors(s, split)) for s in shapes]
    prompt = f"a photo of {_phrase(a)} and {_phrase(b)}"
    include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
    boxes = layout(rng, 2, image_size, layouts=layouts)
    extra = {}
  elif category == "counting":
    options = [(n, s) for n in COUNTS for s in SHAPES if ((n, s) in HELDOUT_COUNTS) == held]
    n, shape = _pick(rng, options)
    shapes = [shape] * n
    colors = [_pick(rng, _allowed_colors(shape, split)) for _ in shapes]
    prompt = f"a photo of {NUMBER_WORDS[n]} {PLURALS[shape]}"
    include = [{"class": shape, "count": n}]
    extra = {"exclude": [{"class": shape, "count": n + 1}]}
    boxes = layout(rng, n, image_size, layouts=layouts)
  elif category == "colors":
    options = [(c, s) for s in SHAPES for c in COLORS if ((c, s) in HELDOUT_COLOR_SHAPE) == held]
    color, shape = _pick(rng, options)
    shapes, colors = [shape], [color]
    prompt = f"a photo of {_phrase(shape, color)}"
    include = [{"class": shape, "count": 1, "color": color}]
    boxes = layout(rng, 1, image_size, layouts=layouts)
    extra = {}
  elif category == "position":
    options = [(a, r, b) for a in SHAPES for b in SHAPES for r in RELATIONS
               if a != b and (relation_key(a, r, b) in HELDOUT_RELATIONS) == held]
    subject, relation, target = _pick(rng, options)
    # GenEval order: the target first, then the subject pointing at group 0.
    shapes = [target, subject]
    colors = [_pick(rng, _allowed_colors(s, split)) for s in shapes]
    prompt = f"a photo of {_phrase(subject)} {relation} {_phrase(target)}"
    include = [{"class": target, "count": 1},
               {"class": subject, "count": 1, "position": [relation, 0]}]
    subject_box, target_box = layout(rng, 2, image_size, relation=relation, layouts=layouts)
    boxes = [target_box, subject_box]
    extra = {}
  elif category == "color_attr":
    pairs = [(c, s) for s in SHAPES for c in COLORS]
    if held:  # at least one unseen colour-shape pair, the other anything
      first = _pick(rng, sorted(HELDOUT_COLOR_SHAPE))
    else:
      first = _pick(rng, [p for p in pairs if p not in HELDOUT_COLOR_SHAPE])
    second_options = [p for p in pairs if p[0] != first[0] and p[1] != first[1]
                      and (held or p not in HELDOUT_COLOR_SHAPE)]
    second = _pick(rng, second_options)
    if rng.integers(2):  # the unseen pair is not always named first
      first, second = second, first
    colors, shapes = [first[0], second[0]], [first[1], second[1]]
    prompt = f"a photo of {_phrase(shapes[0], colors[0])} and {_phrase(shapes[1], colors[1])}"
    include = [{"class": s, "count": 1, "color": c} for c, s in zip(colors, shapes)]
    boxes = layout(rng, 2, image_size, layouts=layouts)
    extra = {}
  else:
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
  metadata = {"tag": category, "include": include, **extra, "prompt": prompt}
  objects = [{"shape": s, "color": c, "box": [round(float(v), 3) for v in box]}
             for s, c, box in zip(shapes, colors, boxes)]
  return {"prompt": prompt, "metadata": metadata, "objects": objects}


def category_of(index: int) -> str:
  """Categories cycle, so every split prefix is balanced across the six."""
  return CATEGORIES[index % len(CATEGORIES)]


def item_spec(seed: int, split: str, index: int, image_size: int,
              layouts: str = "jittered") -> dict:
  """Item `index` of `split` without its image: a pure function of its arguments, independent of
  how many items the split has."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if int(index) < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])
  return sample_item(rng, category_of(index), split, image_size, layouts)


# ------------------------------------------------------------------------------------------------
# On disk


def _manifest(num_train: int, num_heldout: int, image_size: int, seed: int, layouts: str
              ) -> dict:
  return {
      "format": "svg_jax.shapes", "version": FORMAT_VERSION, "seed": int(seed),
      "image_size": int(image_size), "layouts": layouts, "counts": {"train": int(num_train),
                                                "heldout": int(num_heldout)},
      "background": list(BACKGROUND), "palette": {k: list(v) for k, v in PALETTE.items()},
      "shapes": list(SHAPES), "categories": list(CATEGORIES),
      "heldout_combinations": {
          "color_shape": sorted(list(p) for p in HELDOUT_COLOR_SHAPE),
          "relations": sorted(list(k) for k in HELDOUT_RELATIONS),
          "counts": sorted(list(k) for k in HELDOUT_COUNTS),
          "two_object_pairs": sorted(sorted(p) for p in HELDOUT_PAIRS),
      },
  }


def _complete(out_dir: str, manifest: dict) -> bool:
  for split in SPLITS:
    jsonl = os.path.join(out_dir, f"{split}.jsonl")
    if not os.path.isfile(jsonl):
      return False
    lines = list(jsonl_lib.lines(jsonl))
    if len(lines) != manifest["counts"][split] or any(line.problem for line in lines):
      return False
    if not all(os.path.isfile(os.path.join(out_dir, line.item.get("path", "")))
               for line in lines):
      return False
  return True


def write_dataset(out_dir: str, num_train: int, num_heldout: int, image_size: int = 64,
                  seed: int = 0, layouts: str = "jittered") -> dict:
  """Writes the dataset (PNGs, `train.jsonl`, `heldout.jsonl`, `manifest.json`) and returns the
  manifest. Deterministic in `seed`; a rerun on a complete directory with the same arguments
  writes nothing, one over an interrupted run finishes it, different arguments are an error."""
  for name, value in (("num_train", num_train), ("num_heldout", num_heldout)):
    if int(value) < 0:
      raise InputError(f"{name} must be >= 0, got {value}")
  if int(image_size) < 32:
    raise InputError(f"image_size must be >= 32 for shapes to stay recognisable, got {image_size}")
  if layouts not in LAYOUTS:
    raise InputError(f"unknown layouts {layouts!r}; expected one of {LAYOUTS}")
  manifest = _manifest(num_train, num_heldout, image_size, seed, layouts)
  manifest_path = os.path.join(out_dir, MANIFEST)
  existing = atomic_files.read_json(manifest_path)
  if existing is not None:
    if existing != manifest:
      raise InputError(f"{out_dir} already holds a different shapes dataset (differs in "
                       f"{atomic_files.differing_keys(existing, manifest)}); use another "
                       "directory or delete it")
    if _complete(out_dir, existing):
      return existing
  for split, count in (("train", num_train), ("heldout", num_heldout)):
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    lines = []
    for index in range(count):
      rel = f"{split}/{index:06d}.png"
      path = os.path.join(out_dir, rel)
      item = item_spec(seed, split, index, image_size, layouts)
      if not os.path.isfile(path):  # PNGs are written atomically, so an existing one is whole
        image = Image.fromarray(render(item["objects"], image_size))
        atomic_files.write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
      lines.append({"path": rel, "prompt": item["prompt"], "metadata": item["metadata"],
                    "objects": item["objects"]})
    atomic_files.write_text(os.path.join(out_dir, f"{split}.jsonl"),
                            "".join(json.dumps(line) + "\n" for line in lines))
  atomic_files.write_text(manifest_path, json.dumps(manifest, indent=2))
  return manifest


def read_split(out_dir: str, split: str) -> list[dict]:
  """The lines of `<out_dir>/<split>.jsonl` with `path` made absolute."""
  if split not in SPLITS:
    raise InputError(f"unknown split {split!r}; expected one of {SPLITS}")
  jsonl = os.path.join(out_dir, f"{split}.jsonl")
  if not os.path.isfile(jsonl):
    raise MissingInput(f"{jsonl} does not exist: not a shapes dataset folder (the demo writes one "
                       "under <workdir>/demo; launch/make_demo_data.py makes one)")
  out = []
  for line in jsonl_lib.lines(jsonl):
    if line.problem:
      raise InputError(f"{jsonl}:{line.number} is {line.problem}")
    item = line.item
    missing = [k for k in ("path", "prompt", "metadata") if k not in item]
    if missing:
      raise InputError(f"{jsonl}:{line.number} is missing keys {missing}")
    item["path"] = os.path.join(os.path.abspath(out_dir), item["path"])
    out.append(item)
  return out
