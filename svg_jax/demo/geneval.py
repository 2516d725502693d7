"""GenEval for the shapes demo: scores an image against its prompt's GenEval metadata.

GenEval runs an object detector and a colour classifier, then checks the prompt's `include` /
`exclude` clauses. Here the detector is exact geometry on the demo palette (`shapes`):
  1. a 3x3 median removes pixel noise, then every pixel takes the nearest palette colour or the
     background (RGB distance),
  2. objects are 4-connected components of one colour (holes filled); components smaller than
     `min_area_frac` of the image are spurious and dropped,
  3. a component's shape is the template (circle / square / triangle / diamond, stretched to the
     component's bounding box) with the highest IoU against its mask. Templates are also rendered
     blurred and thresholded, because blur rounds a square towards a circle; components resembling
     no template (`min_shape_iou`) are not objects.
Objects are ordered by area, standing in for GenEval's detector confidence. The clause checks follow
GenEval's `evaluate` (djghosh13/geneval, evaluation/evaluate_images.py): per include clause, the
first `count` objects of the class must exist, have the colour and stand in the relation (box
centres, offsets shrunk by `position_threshold` x the summed box sizes) to every object of the
target group; an exclude clause fails when `count` or more objects of the class exist. The overall
score is the mean of the per-category accuracies, as in GenEval.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFilter

from svg_jax.demo import shapes

CATEGORIES = shapes.CATEGORIES
_COLOR_TABLE = np.array([shapes.BACKGROUND] + [shapes.PALETTE[c] for c in shapes.COLORS],
                        np.float32)


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
  min_area_frac: float = 0.003   # components below this fraction of the image are noise
  median: bool = True            # 3x3 median on the image before labelling (pixel noise)
  min_shape_iou: float = 0.5     # a component matching no template this well is not an object
  template_size: int = 32        # masks are compared with the templates at this resolution
  # Gaussian blurs (std / shape side) the templates are rendered at: sharp ground truth up to
  # blurry samples. Beyond ~0.1 a blurred diamond is as close to a circle as to a diamond.
  template_blurs: tuple[float, ...] = (0.0, 0.03, 0.06, 0.09)
  position_threshold: float = 0.1  # GenEval's default
  max_objects: int = 16          # per class, as GenEval's max_objects


@dataclasses.dataclass(frozen=True)
class Detection:
  shape: str
  color: str
  box: tuple[float, float, float, float]  # x0, y0, x1, y1 (x1, y1 exclusive), pixels
  area: int


# ------------------------------------------------------------------------------------------------
# Detector


def as_rgb_array(image: Any) -> np.ndarray:
  """float32 [H, W, 3] in 0..255 from a PIL image, a uint8 array or a float array in [0, 1]."""
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"), np.float32)
  arr = np.asarray(image)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
  if arr.dtype == np.uint8:
    return arr.astype(np.float32)
  if np.issubdtype(arr.dtype, np.floating):
    if not np.all(np.isfinite(arr)):
      raise ValueError("image has NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -0.01 or hi > 1.01:
      raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}]")
    return np.clip(arr, 0.0, 1.0).astype(np.float32) * 255.0
  raise ValueError(f"unsupported image dtype {arr.dtype}; use uint8 or float in [0, 1]")


def label_pixels(rgb: np.ndarray) -> np.ndarray:
  """int [H, W]: 0 = background, k = palette colour k-1 (nearest in RGB)."""
  d = ((rgb[:, :, None, :] - _COLOR_TABLE[None, None]) ** 2).sum(-1)
  return d.argmin(-1).astype(np.int32)


def median3x3(rgb: np.ndarray) -> np.ndarray:
  """Per-channel 3x3 median (edge-replicated): removes pixel noise, keeps edges where they are."""
  h, w, _ = rgb.shape
  padded = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
  return np.median(np.stack([padded[dy:dy + h, dx:dx + w] for dy in range(3)
                             for dx in range(3)]), axis=0)


def fill_holes(mask: np.ndarray) -> np.ndarray:
  """mask plus the regions of its complement that do not reach the border."""
  comp = connected_components(np.pad(~mask, 1, constant_values=True).astype(np.int32))
  outside = comp[0, 0]  # the padded border is one component of the complement
  return (comp != outside)[1:-1, 1:-1]


def connected_components(labels: np.ndarray) -> np.ndarray:
  """int [H, W]: 4-connected components of equal non-zero label, each named by its smallest flat
  pixel index; -1 on background. Min-label propagation with pointer jumping (log-ish rounds)."""
  h, w = labels.shape
  n = h * w
  fg = labels > 0
  comp = np.where(fg, np.arange(n).reshape(h, w), n)  # n: "no label", larger than any index
  same_right = fg[:, :-1] & (labels[:, :-1] == labels[:, 1:])
  same_down = fg[:-1, :] & (labels[:-1, :] == labels[1:, :])
  while True:
    new = comp.copy()
    np.minimum(new[:, :-1], np.where(same_right, comp[:, 1:], n), out=new[:, :-1])
    np.minimum(new[:, 1:], np.where(same_right, comp[:, :-1], n), out=new[:, 1:])
    np.minimum(new[:-1, :], np.where(same_down, comp[1:, :], n), out=new[:-1, :])
    np.minimum(new[1:, :], np.where(same_down, comp[:-1, :], n), out=new[1:, :])
    flat = new.reshape(-1)
    idx = np.flatnonzero(fg)
    while True:  # a label is a pixel of the same component, so follow it to its own label
      jumped = flat[flat[idx]]
      if np.array_equal(jumped, flat[idx]):
        break
      flat[idx] = jumped
    if np.array_equal(new, comp):
      break
    comp = new
  return np.where(fg, comp, -1)


def blurred_template(shape: str, blur: float, size: int = 32) -> np.ndarray:
  """bool [size, size]: `shape` blurred by a gaussian of std blur x its side, thresholded at half
  coverage (what the pixel labelling does to a blurred object) and stretched to its bounding box."""
  side = 4 * size
  pad = int(np.ceil(3 * blur * side)) + 2
  canvas = np.zeros((side + 2 * pad,) * 2, np.float32)
  canvas[pad:pad + side, pad:pad + side] = shapes.render_mask(shape, side, supersample=2)
  im = Image.fromarray(np.round(canvas * 255).astype(np.uint8))
  if blur > 0:
    im = im.filter(ImageFilter.GaussianBlur(blur * side))
  mask = np.asarray(im) >= 128
  ys, xs = np.nonzero(mask)
  crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  return _resize_mask(crop, size)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  im = Image.fromarray(mask.astype(np.uint8) * 255)
  return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR)) >= 128


@functools.lru_cache(maxsize=8)
def _templates(size: int, blurs: tuple[float, ...]) -> dict[str, tuple[np.ndarray, ...]]:
  return {s: tuple(blurred_template(s, b, size) for b in blurs) for s in shapes.SHAPES}


def classify_shape(mask: np.ndarray, template_size: int = 32,
                   template_blurs: tuple[float, ...] = (0.0,)) -> tuple[str, float]:
  """(shape, IoU) of the template best matching a component mask cropped to its bounding box;
  each shape is tried sharp and at several blurs, since blur rounds squares towards circles."""
  m = _resize_mask(mask, template_size)
  best_shape, best_iou = shapes.SHAPES[0], -1.0
  for shape, templates in _templates(template_size, tuple(template_blurs)).items():
    for t in templates:
      iou = float((m & t).sum()) / max(float((m | t).sum()), 1.0)
      if iou > best_iou:
        best_shape, best_iou = shape, iou
  return best_shape, best_iou


def detect(image: Any, config: ScorerConfig = ScorerConfig()) -> list[Detection]:
  """Objects in the image, largest first."""
  rgb = as_rgb_array(image)
  if config.median:
    rgb = median3x3(rgb)
  labels = label_pixels(rgb)
  comp = connected_components(labels)
  h, w = labels.shape
  min_area = max(1.0, config.min_area_frac * h * w)
  ids, areas = np.unique(comp[comp >= 0], return_counts=True)
  found = []
  for cid, area in zip(ids, areas):
    if area < min_area:
      continue
    ys, xs = np.nonzero(comp == cid)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    mask = fill_holes(comp[y0:y1, x0:x1] == cid)
    shape, iou = classify_shape(mask, config.template_size, config.template_blurs)
    if iou < config.min_shape_iou:
      continue
    color = shapes.COLORS[int(labels.flat[cid]) - 1]
    found.append(Detection(shape, color, (float(x0), float(y0), float(x1), float(y1)),
                           int(area)))
  found.sort(key=lambda d: -d.area)
  return found


# ------------------------------------------------------------------------------------------------
# GenEval's clause checks


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = 0.1) -> set[str]:
  """Relations of box a to box b, GenEval's rule: centre offset, each axis shrunk towards zero by
  threshold x (size a + size b), normalised by the unshrunk offset length, > 0.5 counts."""
  a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
  offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
  dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
  revised = np.maximum(np.abs(offset) - threshold * dims, 0.0) * np.sign(offset)
  if np.all(np.abs(revised) < 1e-3):
    return set()
  dx, dy = revised / np.linalg.norm(offset)
  rels = set()
  if dx < -0.5:
    rels.add("left of")
  if dx > 0.5:
    rels.add("right of")
  if dy < -0.5:  # image y grows downwards
    rels.add("above")
  if dy > 0.5:
    rels.add("below")
  return rels


def validate_metadata(metadata: dict) -> None:
  """Raises ValueError naming what is wrong with a GenEval metadata entry."""
  if not isinstance(metadata, dict):
    raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
  missing = [k for k in ("tag", "include") if k not in metadata]
  if missing:
    raise ValueError(f"metadata is missing keys {missing}: {metadata}")
  if metadata["tag"] not in CATEGORIES:
    raise ValueError(f"unknown tag {metadata['tag']!r}; expected one of {CATEGORIES}")
  unexpected = sorted(set(metadata) - {"tag", "include", "exclude", "prompt"})
  if unexpected:
    raise ValueError(f"metadata has unexpected keys {unexpected}")
  for group in ("include", "exclude"):
    for i, req in enumerate(metadata.get(group, [])):
      for key in ("class", "count"):
        if key not in req:
          raise ValueError(f"{group}[{i}] is missing {key!r}: {req}")
      if not isinstance(req["count"], int) or req["count"] < 1:
        raise ValueError(f"{group}[{i}] count must be a positive int, got {req['count']!r}")
      if req["class"] not in shapes.SHAPES:
        raise ValueError(f"{group}[{i}] has unknown class {req['class']!r}; "
                         f"expected one of {shapes.SHAPES}")
      if "color" in req and req["color"] not in shapes.PALETTE:
        raise ValueError(f"{group}[{i}] has unknown color {req['color']!r}; "
                         f"expected one of {shapes.COLORS}")
      if "position" in req:
        if not isinstance(req["position"], (list, tuple)) or len(req["position"]) != 2:
          raise ValueError(f"{group}[{i}] position must be [relation, target index], "
                           f"got {req['position']!r}")
        rel, target = req["position"]
        if rel not in shapes.RELATIONS:
          raise ValueError(f"{group}[{i}] has unknown relation {rel!r}")
        if not 0 <= int(target) < i:
          raise ValueError(f"{group}[{i}] points at group {target}, not an earlier include")


def evaluate_detections(detections: Sequence[Detection], metadata: dict,
                        config: ScorerConfig = ScorerConfig()) -> tuple[bool, str]:
  """(correct, reason) of detected objects against one GenEval metadata entry."""
  validate_metadata(metadata)
  by_class: dict[str, list[Detection]] = {}
  for det in detections:  # already largest first
    group = by_class.setdefault(det.shape, [])
    if len(group) < config.max_objects:
      group.append(det)
  correct, reasons, matched_groups = True, [], []
  for req in metadata["include"]:
    cls, count = req["class"], int(req["count"])
    found = by_class.get(cls, [])[:count]
    ok = len(found) >= count
    if not ok:
      reasons.append(f"expected {cls}>={count}, found {len(found)}")
    else:
      if "color" in req:
        n_color = sum(d.color == req["color"] for d in found)
        if n_color < count:
          ok = False
          reasons.append(f"expected {req['color']} {cls}>={count}, found {n_color} "
                         f"({', '.join(d.color for d in found)})")
      if ok and "position" in req:
        rel, target = req["position"]
        targets = matched_groups[int(target)]
        if targets is None:
          ok = False
          reasons.append(f"no target for {cls} to be {rel}")
        else:
          for obj in found:
            for tgt in targets:
              rels = relative_position(obj.box, tgt.box, config.position_threshold)
              if rel not in rels:
                ok = False
                reasons.append(f"expected {cls} {rel} target, found "
                               f"{' and '.join(sorted(rels)) or 'no relation'}")
                break
            if not ok:
              break
    correct &= ok
    matched_groups.append(found if ok else None)
  for req in metadata.get("exclude", []):
    n = len(by_class.get(req["class"], []))
    if n >= int(req["count"]):
      correct = False
      reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
  return correct, "\n".join(reasons)


def evaluate_image(image: Any, metadata: dict,
                   config: ScorerConfig = ScorerConfig()) -> dict:
  """{tag, prompt, correct, reason, detections} for one image."""
  dets = detect(image, config)
  correct, reason = evaluate_detections(dets, metadata, config)
  return {"tag": metadata["tag"], "prompt": metadata.get("prompt", ""), "correct": correct,
          "reason": reason, "detections": dets}


def evaluate_images(images: Sequence[Any], metadatas: Sequence[dict],
                    config: ScorerConfig = ScorerConfig()) -> list[dict]:
  if len(images) != len(metadatas):
    raise ValueError(f"{len(images)} images but {len(metadatas)} metadata entries")
  return [evaluate_image(im, md, config) for im, md in zip(images, metadatas)]


def summarize(results: Sequence[dict]) -> dict[str, float]:
  """{category: accuracy} over the categories present, and "overall": their mean (GenEval)."""
  by_tag: dict[str, list[bool]] = {}
  for r in results:
    by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
  if not by_tag:
    raise ValueError("no results to summarize")
  scores = {tag: float(np.mean(by_tag[tag])) for tag in CATEGORIES if tag in by_tag}
  scores["overall"] = float(np.mean([scores[t] for t in CATEGORIES if t in scores]))
  return scores


def score(images: Sequence[Any], metadatas: Sequence[dict],
          config: ScorerConfig = ScorerConfig()) -> dict[str, float]:
  """{category: accuracy, "overall": mean of the category accuracies}."""
  return summarize(evaluate_images(images, metadatas, config))


def format_table(scores: dict[str, float], counts: dict[str, int] | None = None) -> str:
  """The scores as a text table, categories in GenEval order then "overall"; with `counts`
  ({category: number of images}) an n column."""
  rows = [t for t in CATEGORIES if t in scores] + ["overall"]
  lines = [f"{'category':<14} {'accuracy':>8}" + (f" {'n':>6}" if counts else "")]
  for tag in rows:
    line = f"{tag:<14} {scores[tag]:>8.4f}"
    if counts:
      n = sum(counts.get(t, 0) for t in rows[:-1]) if tag == "overall" else counts.get(tag, 0)
      line += f" {n:>6}"
    lines.append(line)
  return "\n".join(lines)


def print_table(scores: dict[str, float], counts: dict[str, int] | None = None,
                file=sys.stdout) -> None:
  print(format_table(scores, counts), file=file)
