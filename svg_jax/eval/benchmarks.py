"""Benchmark generation in the layouts the official GenEval and DPG-Bench scorers read.

  geneval  <out>/{i:05d}/metadata.jsonl (the prompt's line) and <out>/{i:05d}/samples/{k:05d}.png
  dpg      <out>/<stem of filename>.png, a 2x2 grid of the 4 images (row-major)

The official prompt files ship in the package (`svg_jax.assets.GENEVAL_PROMPTS`, `DPG_PROMPTS`).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from typing import Sequence

import numpy as np

from svg_jax import generate, sampling
from svg_jax.data import jsonl as jsonl_lib
from svg_jax.input_errors import InputError
from svg_jax.utils import atomic_files
from svg_jax.utils.rounding import round_up
from svg_jax.utils.progress import Progress

BENCHMARKS = ("geneval", "dpg")
GENEVAL_METADATA = "metadata.jsonl"
TMP_DIR = ".tmp"
SETTINGS_FILE = "generation.json"


def read_prompt_file(path: str, benchmark: str) -> list[dict]:
  """A benchmark prompt file: one JSON object per line with `prompt` (DPG: and `filename`)."""
  if benchmark not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
  need = ("prompt", "filename") if benchmark == "dpg" else ("prompt",)
  items, problems = [], []
  for line in jsonl_lib.lines(path):
    if line.problem:
      problems.append(f"line {line.number}: {line.problem}")
      continue
    item = line.item
    missing = [k for k in need if not isinstance(item.get(k), str) or not item.get(k)]
    if missing:
      problems.append(f"line {line.number}: missing or empty {missing}")
    items.append(item)
  if not items and not problems:
    problems.append("no prompts")
  if benchmark == "dpg" and not problems:
    stems = [dpg_grid_name(it["filename"]) for it in items]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
      problems.append(f"several prompts share the output names {dup[:5]}")
  if problems:
    raise ValueError(f"{path} is not a {benchmark} prompt file: " + "; ".join(problems[:10]))
  return items


def dpg_grid_name(filename: str) -> str:
  """DPG-Bench grid file of a prompt: its `filename` with a .png suffix ('286.txt' -> '286.png')."""
  return os.path.splitext(os.path.basename(filename))[0] + ".png"


def geneval_sample_path(outdir: str, index: int, k: int) -> str:
  return os.path.join(outdir, f"{index:05d}", "samples", f"{k:05d}.png")


def check_request(benchmark: str, images_per_prompt: int) -> None:
  """InputError for a benchmark or image count that no layout takes (before anything loads)."""
  if benchmark not in BENCHMARKS:
    raise InputError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
  if images_per_prompt < 1:
    raise InputError(f"images per prompt must be >= 1, got {images_per_prompt}")
  if benchmark == "dpg" and images_per_prompt != 4:
    raise InputError(f"DPG-Bench grids are 2x2: images per prompt must be 4, got "
                     f"{images_per_prompt}")


def pin_settings(outdir: str, settings: dict) -> None:
  """Writes `settings` (what decides the images: weights, sampler, resolution, prompts...) to
  <outdir>/generation.json, or, when a run wrote it before, refuses other settings: a rerun
  resumes a folder, it must not fill it with images of another model or sampler. The scorers
  read only the digit folders (GenEval) and the .png files (DPG-Bench)."""
  os.makedirs(outdir, exist_ok=True)
  path = os.path.join(outdir, SETTINGS_FILE)
  try:
    pinned = atomic_files.read_json(path)
  except ValueError as e:
    raise InputError(f"{path} is not JSON ({e}); remove it only if the folder's images were made "
                     "with this run's settings") from None
  settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
  if pinned is None:
    atomic_files.write_json(path, settings)
    return
  differ = atomic_files.differing_keys(pinned, settings)
  if differ:
    raise InputError(f"{outdir} holds images made with other settings ("
                     + "; ".join(f"{k}: {pinned.get(k)!r} there, {settings.get(k)!r} now"
                                 for k in differ)
                     + "); use a fresh output folder, or the same settings to resume it")


def _missing_images(benchmark, outdir, index, item, images_per_prompt) -> list[int]:
  if benchmark == "geneval":
    meta = os.path.join(outdir, f"{index:05d}", GENEVAL_METADATA)
    if os.path.exists(meta):
      with open(meta) as f:
        saved = f.read().strip()
      try:
        same = json.loads(saved) == item
      except ValueError:
        raise InputError(f"{meta} is not a JSON line (a damaged folder: remove {meta} and rerun "
                         "to have it written again)") from None
      if not same:
        raise InputError(f"{meta} holds another prompt ({saved[:80]}...) than line {index} of "
                         "the prompt file; use a fresh output folder for another prompt file")
    return [k for k in range(images_per_prompt)
            if not atomic_files.whole_png(geneval_sample_path(outdir, index, k))]
  grid = os.path.join(outdir, dpg_grid_name(item["filename"]))
  return [] if atomic_files.whole_png(grid) else list(range(images_per_prompt))


def _paths(benchmark, outdir, index, item, ks) -> list[str]:
  """The files that images `ks` of prompt `index` go to."""
  if benchmark == "geneval":
    return [geneval_sample_path(outdir, index, k) for k in ks]
  return [os.path.join(outdir, dpg_grid_name(item["filename"]))] if ks else []


def _stray_samples(outdir: str, index: int, images_per_prompt: int) -> list[str]:
  folder = os.path.dirname(geneval_sample_path(outdir, index, 0))
  try:
    names = os.listdir(folder)
  except OSError:
    return []
  ours = {os.path.basename(geneval_sample_path(outdir, index, k))
          for k in range(images_per_prompt)}
  return [os.path.join(folder, name) for name in sorted(set(names) - ours)]


def run_benchmark(generator: generate.Generator, items: Sequence[dict], benchmark: str,
                  outdir: str, resolution, settings: generate.SamplerSettings = generate.SamplerSettings(), *,
                  batch_size: int = 4, images_per_prompt: int = 4, process_index: int = 0,
                  process_count: int = 1, stream=None) -> dict:
  """Generate the benchmark images of this process's prompts (index i with i % count == this).

  Resumable: a prompt whose files all exist is skipped; a GenEval prompt with some samples gets
  only the missing ones. Files appear atomically (temporary name, then rename). Image k of prompt
  i uses the seed 42 + images_per_prompt * i + k. Returns counts for the report.
  """
  check_request(benchmark, images_per_prompt)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process index {process_index} outside [0, {process_count})")
  mine = [i for i in range(len(items)) if i % process_count == process_index]
  todo, skipped, damaged, strays = [], 0, [], []
  for i in mine:
    ks = _missing_images(benchmark, outdir, i, items[i], images_per_prompt)
    meta = os.path.join(outdir, f"{i:05d}", GENEVAL_METADATA)
    if benchmark == "geneval" and not ks and not os.path.exists(meta):
      atomic_files.write_text(meta, json.dumps(items[i]) + "\n")  # samples there, metadata lost
    skipped += not ks
    todo += [(i, k) for k in ks]
    damaged += [path for path in _paths(benchmark, outdir, i, items[i], ks) if
                os.path.exists(path)]
    if benchmark == "geneval":
      strays += _stray_samples(outdir, i, images_per_prompt)
  summary = dict(prompts=len(mine), skipped=skipped, images=len(todo), written=0)
  stream = stream or sys.stdout
  print(f"{benchmark}: process {process_index}/{process_count} has {len(mine)} prompts, "
        f"{skipped} already finished, {len(todo)} images to generate", file=stream, flush=True)
  if damaged:
    print(f"{len(damaged)} damaged files (not whole PNGs) are made again, e.g. {damaged[0]}",
          file=stream, flush=True)
  if strays:
    print(f"warning: {len(strays)} files in samples/ folders are none of this run's "
          f"{images_per_prompt} images per prompt, and GenEval's scorer reads every file there: "
          f"remove them, e.g. {strays[0]}", file=stream, flush=True)
  if not todo:
    return summary
  # Temporary files live in a hidden folder, never among the files a scorer lists (GenEval reads
  # every file of samples/); a crash can leave only stale files there. Each process has its own
  # folder in it, so that one that finishes cannot remove the folder another still writes into.
  tmp_dir = _own_temporary_folder(outdir)
  # One caption length for the whole prompt file, not this process's remaining prompts: one
  # compiled trajectory, and an image does not depend on how the prompts were split or resumed
  # (another padded length moves a pixel by a level now and then).
  length = generator.text_length(sorted({item["prompt"] for item in items}))
  # Whole batches for the devices: generate would pad a part up to them with discarded rows.
  chunk = round_up(batch_size if batch_size > 0 else len(todo),
                            generator.batch_multiple())
  buffered: dict[int, dict[int, np.ndarray]] = {}
  progress = Progress(len(todo), what="images", stream=stream)
  for start in range(0, len(todo), chunk):
    part = todo[start:start + chunk]
    images = generator.generate([items[i]["prompt"] for i, _ in part],
                                [sampling.eval_seed(i, k, images_per_prompt) for i, k in part],
                                resolution, settings, batch_size=chunk, text_length=length)
    for (i, k), img in zip(part, images):
      if benchmark == "geneval":
        folder = os.path.join(outdir, f"{i:05d}")
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        meta = os.path.join(folder, GENEVAL_METADATA)
        if not os.path.exists(meta):
          atomic_files.write_text(meta, json.dumps(items[i]) + "\n", tmp_dir)
        atomic_files.save_png(geneval_sample_path(outdir, i, k), img, tmp_dir)
        summary["written"] += 1
      else:
        buffered.setdefault(i, {})[k] = img
        if len(buffered[i]) == images_per_prompt:
          done = buffered.pop(i)
          grid = generate.make_grid([done[q] for q in range(images_per_prompt)], 2)
          atomic_files.save_png(os.path.join(outdir, dpg_grid_name(items[i]["filename"])), grid,
                                tmp_dir)
          summary["written"] += 1
    progress(start + len(part))
  for folder in (tmp_dir, os.path.dirname(tmp_dir)):
    try:
      os.rmdir(folder)  # only when empty: the shared one stays while another process writes
    except OSError:
      pass
  return summary


def _own_temporary_folder(outdir: str) -> str:
  """<outdir>/.tmp/<host>-<pid>, made, after removing the folders this host's ended processes
  left there (a killed run's). Another process may remove the shared .tmp when it is empty,
  between the two folders' creation: then again (once this one exists, .tmp is not empty)."""
  host = socket.gethostname()
  _remove_folders_of_ended_processes(os.path.join(outdir, TMP_DIR), host)
  folder = os.path.join(outdir, TMP_DIR, f"{host}-{os.getpid()}")
  for _ in range(100):
    try:
      os.makedirs(folder, exist_ok=True)
      return folder
    except FileNotFoundError:
      continue
  raise OSError(f"could not make {folder}: its parent keeps disappearing")


def _remove_folders_of_ended_processes(shared: str, host: str) -> None:
  try:
    names = os.listdir(shared)
  except OSError:
    return
  for name in names:
    owner, _, pid = name.rpartition("-")
    if owner != host or not pid.isdigit() or _running(int(pid)):
      continue  # another host's (its processes are not visible here) or a live one's
    shutil.rmtree(os.path.join(shared, name), ignore_errors=True)


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True
