"""Images through the SVG autoencoder and back: each image cropped as the DiT's data is (its
closest aspect-ratio bucket), encoded, decoded, and written with its PSNR / SSIM.

Output names: `<out>/<file name>.png`, the input's extension kept (`photos/cat.jpg` ->
`cat.jpg.png`): `good.jpg` and `good.png` never share an output. Files of one name from several
folders keep their folders below the one they share (`a/x.png`, `b/x.png` -> `a/x.png.png`,
`b/x.png.png`). Each holds the
crop and its reconstruction side by side.

Images are planned first (header only: size and bucket; files that cannot be opened, or whose
shorter side is below `min(min_side, resolution)` as precompute and the decoder's data refuse
them, are skipped with the reason), then decoded and reconstructed `batch_size` at a time per
bucket: memory holds one chunk whatever the number of images. Each chunk's PNGs are written, then
its lines appended to `<out>/metrics.jsonl` in one write, then printed; so an interrupted run
(Ctrl-C, a crash, a full disk) keeps every finished image, each listed. `<out>/metrics.json` is
written at the end (and, as far as it can be, when a run stops): the settings (weights,
statistics, resolution...), every image and skipped input, the means.

A perfect reconstruction has an infinite PSNR, which strict JSON cannot hold: its `psnr` is null
and `mean_psnr` is over the finite ones (`identical` counts the others); SSIM is always finite.

An --out holding an earlier run (metrics.json or metrics.jsonl) is refused unless `overwrite`
(its listed files are removed before the first new one is written) or `resume` (the same
settings: listed and whole images are kept, the rest are made)."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from svg_jax import autoencoder as ae_lib
from svg_jax.data import buckets, images as images_lib
from svg_jax.data.image_pipeline import DEFAULT_MIN_SIDE, effective_min_side
from svg_jax.eval import image_metrics
from svg_jax.input_errors import InputError
from svg_jax.utils import atomic_files
from svg_jax.utils.progress import Progress
from svg_jax.utils.writable_folders import FolderNotWritable

METRICS_FILE = "metrics.json"
LINES_FILE = "metrics.jsonl"  # one line per finished or skipped image, appended per chunk
DEFAULT_BATCH_SIZE = 8  # images per encode + decode call: bounds memory, not the whole bucket


class WriteFailed(FolderNotWritable):
  """The file system refused a write into --out (a full disk): one line, exit 2."""
  kind = "write error"


def check_resolution(resolution: int, patch_size: int) -> None:
  """InputError unless `resolution` gives crops of whole patches, a square one among them, that
  SSIM can score."""
  sides = [min(b) for b in buckets.buckets_for_resolution(resolution, patch_size)] if (
      resolution > 0) else []
  if not sides:
    raise InputError(f"--resolution {resolution} gives no crop of whole {patch_size}-pixel "
                     f"patches: use a positive multiple of {patch_size} (256, 512, 1024...)")
  if resolution % patch_size:  # 100 gave a 128x64 crop of a square image
    raise InputError(f"--resolution {resolution} is not a multiple of the {patch_size}-pixel "
                     f"patches: use a positive multiple of {patch_size} (256, 512, 1024...)")
  if min(sides) < image_metrics.SSIM_WINDOW:
    raise InputError(f"--resolution {resolution}: its narrowest crops are {min(sides)} px, SSIM "
                     f"needs at least {image_metrics.SSIM_WINDOW}")
  if (resolution, resolution) not in [tuple(b) for b in
                                      buckets.buckets_for_resolution(resolution, patch_size)]:
    raise InputError(f"--resolution {resolution} has no square bucket ({resolution // patch_size}"
                     f"^2 patches make no square crop): a square image would be cut to another "
                     f"shape; use a square of whole patches (256, 512, 1024...)")


def output_names(paths: Sequence[str]) -> dict[str, str]:
  """{path: output file name}: the file name, extension kept, plus `.png`; files of one name from
  several folders keep their folders below the one those files share (distinct paths give
  distinct names)."""
  full = {p: os.path.abspath(p) for p in paths}
  by_base: dict[str, list[str]] = {}
  for p, f in full.items():
    by_base.setdefault(os.path.basename(f), []).append(p)
  names = {}
  for base, group in by_base.items():
    if len(group) == 1:
      names[group[0]] = base + ".png"
    else:
      common = os.path.commonpath([os.path.dirname(full[p]) for p in group])
      names.update({p: os.path.relpath(full[p], common) + ".png" for p in group})
  return names


def unique_paths(paths: Sequence[str]) -> list[str]:
  """`paths` without repeats of one file (a folder and a file in it), first mention kept."""
  seen, out = set(), []
  for p in paths:
    key = os.path.abspath(p)
    if key not in seen:
      seen.add(key)
      out.append(p)
  return out


def plan(paths: Sequence[str], resolution: int, patch_size: int, min_side: int = DEFAULT_MIN_SIDE
         ) -> tuple[dict[tuple, list[str]], list[tuple[str, str]]]:
  """({bucket: paths}, [(path, reason)] skipped) from the files' headers, before anything loads:
  a tiny image is skipped like a corrupt one, not blown up to a crop and averaged in."""
  bucket_list = buckets.buckets_for_resolution(resolution, patch_size)
  need = effective_min_side(min_side, resolution)
  groups: dict[tuple, list[str]] = {}
  bad = []
  for path in paths:
    try:
      with Image.open(path) as image:
        w, h = image.size
    except Exception:  # noqa: BLE001  (PIL raises many types; open_rgb names the reason)
      try:
        images_lib.open_rgb(path, min_size=need)
        reason = "cannot be opened"
      except images_lib.BadImageError as e:
        reason = e.reason
      bad.append((path, reason))
      continue
    if min(w, h) < need:
      bad.append((path, f"too small: {w}x{h}, shorter side < {need}"))
      continue
    groups.setdefault(buckets.closest_bucket(w, h, bucket_list), []).append(path)
  return groups, bad


def check_out_folder(out: str, overwrite: bool = False, resume: bool = False) -> None:
  """InputError when `out` holds an earlier run and neither `overwrite` nor `resume` is on."""
  if overwrite and resume:
    raise InputError("--resume keeps an earlier run's images, --overwrite replaces them: give one")
  held = [n for n in (METRICS_FILE, LINES_FILE) if os.path.exists(os.path.join(out, n))]
  if held and not (overwrite or resume):
    raise InputError(f"--out {out} holds an earlier run's reconstructions ({held[0]}); choose "
                     "another folder, replace them with --overwrite or go on with --resume")


def _json(obj: Any) -> str:
  return json.dumps(obj, allow_nan=False)  # strict JSON: a NaN or inf here is a bug


def _earlier_lines(out: str) -> list[dict]:
  """The image / skipped lines an earlier run left (metrics.jsonl, else metrics.json's lists)."""
  lines_path, metrics_path = os.path.join(out, LINES_FILE), os.path.join(out, METRICS_FILE)
  items = []
  if os.path.exists(lines_path):
    with open(lines_path) as f:
      for text in f:
        try:
          item = json.loads(text)
        except ValueError:
          continue  # a line cut by a kill: its image is made again
        if isinstance(item, dict):
          items.append(item)
  elif os.path.exists(metrics_path):
    try:
      earlier = atomic_files.read_json(metrics_path)
    except ValueError:
      earlier = None
    if isinstance(earlier, dict):
      items = [i for i in earlier.get("images", []) + earlier.get("skipped", [])
               if isinstance(i, dict)]
  return items


def _settings_there(out: str) -> dict | None:
  lines_path = os.path.join(out, LINES_FILE)
  if os.path.exists(lines_path):
    with open(lines_path) as f:
      first = f.readline()
    try:
      item = json.loads(first)
      return item.get("settings") if isinstance(item, dict) else None
    except ValueError:
      return None
  try:
    earlier = atomic_files.read_json(os.path.join(out, METRICS_FILE))
  except ValueError:
    return None
  return earlier.get("settings") if isinstance(earlier, dict) else None


def run_settings(settings: dict | None, resolution: int, min_side: int) -> dict:
  """The settings a run records (and a resume compares): the caller's plus the crop's, as JSON
  gives them back."""
  return json.loads(_json(dict(settings or {}, resolution=resolution, min_side=min_side)))


def check_resumable(out: str, settings: dict) -> None:
  """InputError when `out` holds a run of settings other than `run_settings`' `settings`."""
  there = _settings_there(out)
  if there is not None and there != settings:
    differ = sorted(k for k in set(there) | set(settings) if there.get(k) != settings.get(k))
    raise InputError(f"--out {out} holds a run of other settings ({', '.join(differ)}): "
                     "resume it with the same ones, choose another folder or use --overwrite")


def _remove_earlier_run(out: str) -> None:
  """The files an earlier run listed, then its metrics files (other files stay)."""
  root = os.path.realpath(out)
  for item in _earlier_lines(out):
    name = item.get("file")
    if isinstance(name, str):
      earlier = os.path.realpath(os.path.join(out, name))
      if earlier.startswith(root + os.sep) and os.path.isfile(earlier):  # never outside --out
        os.remove(earlier)
        _remove_emptied_folders(os.path.dirname(earlier), root)
  for name in (LINES_FILE, METRICS_FILE):
    if os.path.exists(os.path.join(out, name)):
      os.remove(os.path.join(out, name))


def _remove_emptied_folders(folder: str, root: str) -> None:
  """`folder` and the folders above it, up to `root` (kept), while they are empty."""
  while folder.startswith(root + os.sep):
    try:
      os.rmdir(folder)
    except OSError:  # not empty: it holds other files
      return
    folder = os.path.dirname(folder)


def summary_of(settings: dict, results: Sequence[dict], bad: Sequence[tuple[str, str]],
               finished: bool) -> dict:
  out = {"settings": settings, "finished": finished, "images": list(results),
         "skipped": [{"path": p, "reason": why} for p, why in bad]}
  if results:
    finite = [r["psnr"] for r in results if r["psnr"] is not None]
    out["mean_psnr"] = float(np.mean(finite)) if finite else None
    out["identical"] = len(results) - len(finite)
    out["mean_ssim"] = float(np.mean([r["ssim"] for r in results]))
  return out


def reconstruct_images(ae: ae_lib.SVGAutoencoder, paths: Sequence[str], resolution: int,
                       outdir: str, say: Callable[[str], None] = print, *,
                       settings: dict | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                       min_side: int = DEFAULT_MIN_SIDE, resume: bool = False,
                       planned: tuple | None = None, progress_stream=None) -> dict:
  """Writes the pairs, metrics.jsonl and metrics.json of `paths` into `outdir` (made) and returns
  the summary written there; `say` gets a line per skipped image, per image and for the means.
  settings: what decided the images (recorded; `resume` requires the same). planned: `plan`'s
  result when the caller made it already. An earlier run there is replaced, or resumed."""
  if batch_size < 1:
    raise InputError(f"batch size {batch_size} < 1")
  paths = unique_paths(paths)
  names = output_names(paths)
  patch = ae.encoder_cfg.patch_size
  groups, bad = planned if planned is not None else plan(paths, resolution, patch, min_side)
  settings = run_settings(settings, resolution, min_side)
  kept: dict[str, dict] = {}
  if resume:
    check_resumable(outdir, settings)
    for item in _earlier_lines(outdir):
      f = item.get("file")
      if (item.get("path") in names and f == names[item["path"]] and "ssim" in item
          and atomic_files.whole_png(os.path.join(outdir, f))):
        kept[item["path"]] = item
  results = [kept[p] for p in paths if p in kept]
  skipped_paths = {p for p, _ in bad}
  todo = [p for p in paths if p not in kept and p not in skipped_paths]

  def write_failed(what: str, e: OSError) -> WriteFailed:
    return WriteFailed(f"{what}: {e.strerror or e}; {len(results)} of {len(paths)} images are "
                       f"written to {outdir} and listed in its {LINES_FILE}")

  lines_path = os.path.join(outdir, LINES_FILE)
  try:  # writable_folders' check passes /proc/xyz as root: the first write says
    os.makedirs(outdir, exist_ok=True)
  except OSError as e:
    raise WriteFailed(f"--out {outdir} cannot be made: {e.strerror or e}") from None
  try:
    if resume:  # kept images listed again under this run's settings, the rest made
      atomic_files.write_text(lines_path, "".join(_json(x) + "\n" for x in (
          [{"settings": settings}] + results)))
    else:
      _remove_earlier_run(outdir)
      atomic_files.write_text(lines_path, _json({"settings": settings}) + "\n")
  except OSError as e:
    raise write_failed(f"cannot write to --out {outdir}", e) from None
  for path, why in bad:
    say(f"skipped {path}: {why}")
  if bad:
    atomic_files.append_whole(lines_path, "".join(_json({"path": p, "reason": why}) + "\n"
                                                  for p, why in bad))
  if kept:
    say(f"resuming {outdir}: {len(kept)} of {len(paths)} images are there, {len(todo)} to make")
  progress = Progress(len(todo), what="images", stream=progress_stream or sys.stderr)
  todo_set = set(todo)
  need = effective_min_side(min_side, resolution)
  try:
    for bucket, group in sorted(groups.items()):
      group = [p for p in group if p in todo_set]
      for start in range(0, len(group), batch_size):
        chunk, crops, new_bad = [], [], []
        for path in group[start:start + batch_size]:
          try:  # the header was fine; the data may still be cut or corrupt
            rgb, _ = images_lib.open_rgb(path, min_size=need)
            crop, got = ae_lib.preprocess(rgb, resolution, patch)
          except images_lib.BadImageError as e:
            new_bad.append((path, e.reason))
            continue
          assert tuple(got) == tuple(bucket), (path, got, bucket)
          chunk.append(path)
          crops.append(crop)
        lines, done = [], []
        if chunk:
          originals = np.stack(crops)
          recons = ae.reconstruct(originals)  # one compile per bucket shape (and chunk size)
          for path, orig, rec in zip(chunk, originals, recons):
            name = names[path]
            target = os.path.join(outdir, name)
            try:
              os.makedirs(os.path.dirname(target), exist_ok=True)
              atomic_files.save_png(target, np.concatenate([orig, rec], axis=1))
            except OSError as e:
              raise write_failed(f"cannot write {target}", e) from None
            p = image_metrics.psnr(orig, rec)
            done.append({"path": path, "file": name, "bucket": list(bucket),
                         "psnr": p if math.isfinite(p) else None,
                         "ssim": image_metrics.ssim(orig, rec)})
        lines = [_json(r) for r in done] + [_json({"path": p, "reason": why}) for p, why in new_bad]
        if lines:
          try:
            atomic_files.append_whole(lines_path, "".join(line + "\n" for line in lines))
          except OSError as e:
            raise write_failed(f"cannot write {lines_path}", e) from None
        results += done
        bad += new_bad
        progress.end_line()
        for path, why in new_bad:
          say(f"skipped {path}: {why}")
        for r in done:
          shown = "inf (identical)" if r["psnr"] is None else f"{r['psnr']:.2f}"
          say(f"{r['path']}\t{r['bucket'][0]}x{r['bucket'][1]}\tPSNR {shown} dB\t"
              f"SSIM {r['ssim']:.4f}")
        progress.update(done=len(done) + len(new_bad), good=len(done))
  except BaseException:  # Ctrl-C, a crash, a full disk: say what is kept
    progress.end_line()
    try:
      atomic_files.write_text(os.path.join(outdir, METRICS_FILE),
                              json.dumps(summary_of(settings, results, bad, False), indent=1,
                                         allow_nan=False))
    except OSError:
      pass  # metrics.jsonl lists them all the same
    print(f"stopped: {len(results)} of {len(paths)} images are written to {outdir} and listed "
          f"in its {LINES_FILE} and {METRICS_FILE} (--resume goes on with it)", file=sys.stderr,
          flush=True)
    raise
  # The finished images in input order.
  order = {p: k for k, p in enumerate(paths)}
  results.sort(key=lambda r: order.get(r["path"], len(order)))
  summary = summary_of(settings, results, bad, True)
  if results:
    identical = summary["identical"]
    mean_psnr = ("inf" if summary["mean_psnr"] is None else f"{summary['mean_psnr']:.2f}")
    say(f"mean over {len(results)} images\tPSNR {mean_psnr} dB\tSSIM {summary['mean_ssim']:.4f}"
        + (f"\t({identical} identical, PSNR infinite, left out of the PSNR mean)"
           if identical else "") + (f"\t({len(bad)} skipped)" if bad else ""))
  try:
    atomic_files.write_text(os.path.join(outdir, METRICS_FILE),
                            json.dumps(summary, indent=1, allow_nan=False))
  except OSError as e:
    raise write_failed(f"cannot write {os.path.join(outdir, METRICS_FILE)}", e) from None
  if not results:
    raise InputError(f"no image could be reconstructed ({len(bad)} skipped)")
  return summary
