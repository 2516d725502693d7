"""`model.remat_policy = "auto"`: the least recomputation whose compiled train step fits the device.

The training loop calls `resolve` on its mesh before the DiT task builds its step
(svg_jax/train/loop.py; trainer.py attaches it to the DiT task). With the policy "auto" it
  1. reuses the policy saved with the workdir's newest checkpoint, so a resume trains with the
     policy its run started with;
  2. otherwise compiles the real train step (`aot.compile_step`: the task's jitted step on
     abstract inputs of the run's global batch, its largest latent bucket and longest caption
     bucket, on the run's mesh) for each of `candidates()` in turn, least recomputation first
     (`nextdit.REMAT_POLICIES`), and takes the first whose per-device peak
     (`aot.memory_report`'s total: arguments + temporaries + outputs not aliased to donated
     inputs) is at most device memory x (1 - `train.remat_headroom`) and which XLA did not have
     to squeeze. XLA:GPU recomputes parts of a program over its own limit (80% of the card,
     below the 83% the scripts' budget allows; `aot.xla_recomputed`): such a candidate fits,
     but runs slower than the next policy that fits as it is, so it is taken only when no
     later one fits;
  3. fails with one line (`RematBudgetError`, a config error) when not even "full" fits.
On GPUs and TPUs the chosen candidate is compiled with XLA's own options for the batch the loader
gives (`aot.abstract_batch`), so the trainer's first step of that shape loads it from the
persistent compilation cache (svg_jax/compile_cache.py) instead of compiling it again. (On the
CPU the candidates compile without backend optimizations, `aot.ANALYSIS_ONLY`, and are not reused.)
Each candidate is one log line with its figures, the verdict another; the loop writes the same
into metrics.jsonl (event "remat_policy") and the resolved policy is what every checkpoint's config
saves. A policy changes what the backward recomputes, never the function
(`dit_checkpoint.HARDWARE_FIELDS`).

Device memory: `train.remat_memory_budget_gib` when > 0 (tests set small budgets that way), else
`memory_stats()["bytes_limit"]` of this process's first mesh device (what XLA's allocator may use:
on GPUs XLA_PYTHON_CLIENT_MEM_FRACTION of the memory, 92% as the scripts set it (svg_jax/cli.py),
75% in a process that set nothing), else (the CPU has no memory_stats) the host's RAM shared by its
local devices.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable

from absl import logging

from svg_jax import checkpoint as ckpt_lib
from svg_jax.data import records
from svg_jax.models import nextdit
from svg_jax.train import aot
from svg_jax.train.loop import ConfigError
from svg_jax.utils.error_lines import out_of_memory_line

GIB = 1024 ** 3
EVENT = "remat_policy"


class RematBudgetError(ConfigError):
  """No remat policy fits the device memory (one line: every candidate's peak and the budget)."""


def candidates(platform: str) -> tuple[str, ...]:
  """The policies "auto" tries on `platform`, least recomputation first."""
  if platform == "cpu":
    # XLA:CPU compiles the offload to pinned_host, but that is the same RAM as its device memory:
    # its peak equals save_qkv_attn's (measured on the tiny step), so it is never a first fit
    # and would only cost a compile. GPUs and TPUs have the host memory space it frees HBM into.
    return tuple(p for p in nextdit.REMAT_POLICIES if p != "offload_qkv_attn")
  return nextdit.REMAT_POLICIES


def device_memory(config, mesh) -> tuple[int, str]:
  """(bytes one device may use, where the figure comes from); see the module docstring."""
  gib = float(config.train.remat_memory_budget_gib)
  if gib > 0:
    return int(gib * GIB), "train.remat_memory_budget_gib"
  device = mesh.local_devices[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (backends without allocator statistics raise or give None)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats bytes_limit"
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram // max(len(mesh.local_devices), 1), "host RAM / local devices"


def step_shape(config) -> tuple[tuple[int, int], int]:
  """(latent h, w) and caption length of the largest batch the loader can give: the dataset's
  bucket with the most latent pixels (the config's square resolution without a readable
  manifest) and data.max_caption_len (always the last caption bucket)."""
  hw = aot.latent_hw(config)
  try:
    manifest = records.read_manifest(config.data.path) if config.data.path else None
  except Exception:  # noqa: BLE001  (config_problems reports a bad data.path in one line)
    manifest = None
  if manifest:
    used = [records.parse_bucket_key(k) for k, n in manifest["buckets"].items() if n > 0]
    if used:
      hw = max(used, key=lambda b: (b[0] * b[1], b))
  return tuple(hw), int(config.data.max_caption_len)


def with_policy(config, policy: str):
  """A copy of `config` with model.remat_policy = policy."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.model.remat_policy = policy
  return out


def candidate_peak(config, mesh, policy: str, *, hw, cap_len: int) -> dict[str, Any]:
  """Compiles the train step of `config` with `policy` on `mesh`: {"policy", "peak_bytes",
  "compile_s", "xla_recomputed"}; peak_bytes None (and "error") where XLA refuses the program
  for lack of memory (XLA:TPU does so at compile time)."""
  try:
    compiled, setup, seconds = aot.compile_step(with_policy(config, policy), mesh,
                                                cap_len=cap_len, hw=hw)
  except Exception as e:  # noqa: BLE001  (only an out-of-memory refusal is a verdict)
    reason = out_of_memory_line(e)  # XLA:TPU refuses a program larger than its HBM
    if reason is None:
      raise
    return {"policy": policy, "peak_bytes": None, "compile_s": None, "error": reason}
  return {"policy": policy, "peak_bytes": int(aot.memory_report(compiled, setup)["total"]),
          "compile_s": round(seconds, 2),
          "xla_recomputed": aot.xla_recomputed(compiled.as_text())}


def _gib(b) -> str:
  return "-" if b is None else f"{b / GIB:.2f}"


def choose(config, mesh, limit: int, *, measure: Callable[[str], dict] | None = None
           ) -> tuple[int | None, list[dict]]:
  """Tries the candidates of the mesh's platform in order; returns (index of the first whose
  peak is <= `limit` bytes and that XLA did not squeeze, else of the first that fits squeezed,
  else None; one row per candidate tried). `measure(policy)` defaults to `candidate_peak` on the
  config's largest batch."""
  if measure is None:
    hw, cap_len = step_shape(config)
    measure = lambda p: candidate_peak(config, mesh, p, hw=hw, cap_len=cap_len)  # noqa: E731
  rows, squeezed = [], None
  for i, policy in enumerate(candidates(aot.mesh_platform(mesh))):
    row = dict(measure(policy))
    row["fits"] = row["peak_bytes"] is not None and row["peak_bytes"] <= limit
    rows.append(row)
    recomputed = row.get("xla_recomputed") or 0
    if row["fits"] and recomputed:
      verdict = (f"fits only as XLA recomputes {recomputed} instructions to stay under its own "
                 "limit; trying the next")
    else:
      verdict = "fits" if row["fits"] else row.get("error", "does not fit")
    logging.info("remat %-16s peak %s GiB per device (limit %s GiB)%s: %s", policy,
                 _gib(row["peak_bytes"]), _gib(limit),
                 f", compiled in {row['compile_s']} s" if row.get("compile_s") else "", verdict)
    if row["fits"] and not recomputed:
      return i, rows
    if row["fits"] and squeezed is None:
      squeezed = i
  return squeezed, rows


def saved_policy(workdir: str) -> str | None:
  """The remat policy in the config of the workdir's newest readable checkpoint, if any."""
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    return None
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    for step in sorted(ckpt.all_steps(), reverse=True):
      try:
        policy = ckpt.read_config(step)["model"]["remat_policy"]
      except Exception:  # noqa: BLE001  (a damaged step: the loop moves it aside later)
        continue
      if policy in nextdit.REMAT_POLICIES:
        return policy
    return None
  finally:
    ckpt.close()


def resolve(config, mesh, workdir: str,
            agree: Callable[..., int] = lambda v, after_compiles=False: v, *,
            measure: Callable[[str], dict] | None = None) -> tuple[Any, dict | None]:
  """(config with "auto" replaced by a policy, the metrics event describing the choice); the
  config itself and None when its policy is not "auto". `agree(i)` is the max of i over the
  processes (the loop's all-reduce): every process trains with the same policy; the vote on the
  choice waits for the others' candidate compiles (`after_compiles`). `measure`: see `choose`."""
  if config.model.remat_policy != nextdit.AUTO:
    return config, None
  # A vote, so every process takes the same branch: one that could not read the checkpoint's
  # config (a passing read error) would otherwise measure and wait for a vote nobody else casts.
  saved = saved_policy(workdir)
  found = agree(0 if saved is None else 1 + nextdit.REMAT_POLICIES.index(saved))
  saved = nextdit.REMAT_POLICIES[found - 1] if found else None
  if saved is not None:
    logging.info("remat auto: %s, as the run's newest checkpoint in %s", saved, workdir)
    return with_policy(config, saved), {"event": EVENT, "policy": saved, "source": "checkpoint"}
  start = time.perf_counter()
  memory, source = device_memory(config, mesh)
  headroom = float(config.train.remat_headroom)
  limit = int(memory * (1 - headroom))
  index, rows = choose(config, mesh, limit, measure=measure)
  options = candidates(aot.mesh_platform(mesh))
  index = agree(len(options) if index is None else index, after_compiles=True)
  summary = ", ".join(f"{r['policy']} {_gib(r['peak_bytes'])}"
                      + (" squeezed by XLA" if r.get("xla_recomputed") else "") for r in rows)
  if index >= len(options):
    raise RematBudgetError(
        f"model.remat_policy auto: no policy fits {_gib(limit)} GiB per device ({_gib(memory)} "
        f"GiB from {source}, headroom {headroom:g}); peak GiB per device: {summary}; lower the "
        "batch per device (train.micro_batches), shard further (mesh.fsdp / mesh.tensor) or "
        "raise train.remat_memory_budget_gib")
  policy = options[index]
  seconds = time.perf_counter() - start
  logging.info("remat auto: %s (peak GiB per device: %s; limit %s GiB = %s GiB from %s x (1 - "
               "%g); %.1f s)", policy, summary, _gib(limit), _gib(memory), source, headroom,
               seconds)
  event = {"event": EVENT, "policy": policy, "source": "measured", "limit_gib": limit / GIB,
           "device_memory_gib": memory / GIB, "memory_from": source, "headroom": headroom,
           "seconds": round(seconds, 1),
           "candidates": [{"policy": r["policy"], "fits": r["fits"], "compile_s": r["compile_s"],
                           "peak_gib": None if r["peak_bytes"] is None else r["peak_bytes"] / GIB,
                           "xla_recomputed": r.get("xla_recomputed", 0)}
                          for r in rows]}
  return with_policy(config, policy), event
