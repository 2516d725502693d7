"""Every process of a multi-host run must train the same run: one config, the same records, one
workdir. Hosts started with different settings trained to the end on mixed batches (another
batch size, learning rate or dataset on one host), or waited in a collective until the stall
timeout (another step count, checkpoint interval or mesh), and a workdir that is not shared
failed only at the first save. `check` compares them before anything compiles and stops every
process with one line naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax

from svg_jax import checkpoint as ckpt_lib
from svg_jax import multihost

# Record folders that each host may hold a copy of at a path of its own: compared by the copy's
# manifest.json (counts, fingerprints and shard names of the dataset), not by the path.
PER_HOST_DATA_FIELDS = ("data.path", "data.eval_path")
SHARED_WORKDIR = "workdir shared with process 0 (one folder that every host sees)"


def _manifest_digest(folder: str) -> str:
  path = os.path.join(folder, "manifest.json")
  try:
    with open(path, "rb") as f:
      return "manifest sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]
  except OSError:
    return f"no readable {path}"


def run_items(config, workdir: str, timeout_s: float) -> dict[str, str]:
  """What must be the same on every process: the config's fields (dotted names, JSON values),
  the record folders' manifests and whether the workdir is process 0's."""
  items = {k: json.dumps(v) for k, v in
           ckpt_lib.flat_config(ckpt_lib.config_to_json(config)).items()}
  for field in PER_HOST_DATA_FIELDS:
    folder = json.loads(items.pop(field, '""'))
    if folder:
      items[f"{field} (its manifest)"] = _manifest_digest(folder)
  items[SHARED_WORKDIR] = multihost.shared_folder(workdir, timeout_s)
  return items


def check(config, workdir: str, timeout_s: float) -> None:
  """multihost.DistributedSetupError on every process when the processes' run_items differ; a
  no-op on one process."""
  if jax.process_count() == 1:
    return
  multihost.check_same_everywhere("configs, records and workdir",
                                  run_items(config, workdir, timeout_s), timeout_s)
