"""launch/aot_compile.py over many combinations, one process each: `every` combination, or the
largest micro-batch that `fit`s.

Each combination runs the script again in a process of its own (the fake-device count is fixed
when JAX starts, and a 2.6B compile's memory is given back when its process ends), with --json:
its last stdout line is `aot.step_report`'s dict. A child gets the flags given to this process
(`forwarded_flags`: --config.x overrides included, the driver's own left out), its config file
with the variant of the combination, and the flags of the combination.

`fit`, per variant and TPU target: for each remat policy (least recomputation first,
`nextdit.REMAT_POLICIES` order by default), the largest power-of-two micro-batch per chip that
fits, halving from the whole per-chip step batch; the first policy that fits at all is the row
(less recomputation that fits is faster, so the later policies are not tried).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from svg_jax import input_errors
from svg_jax.models import nextdit
from svg_jax.train import aot

# Flags of the driver itself, and those each combination sets, never passed on to a child.
DRIVER_FLAGS = ("all", "fit", "devices_list", "targets", "variants", "remats", "timeout", "json",
                "config", "target", "devices", "flagfile")


@dataclasses.dataclass(frozen=True)
class Children:
  """How to start the children: the script, its config file[:variant], the flags every child gets
  ({name: "--name=value"}) and each one's time limit in seconds."""
  script: str
  config: str
  flags: dict[str, str]
  timeout: float

  def command(self, config: str, extra: dict[str, Any]) -> list[str]:
    """The child's command line: `config` (file:variant), the flags, `extra`'s flags over them."""
    given = [arg for name, arg in self.flags.items() if name not in extra]
    return ([sys.executable, self.script, f"--config={config}", *given] +
            [f"--{name}={value}" for name, value in extra.items()] + ["--json"])


def forwarded_flags(flag_values) -> dict[str, str]:
  """The flags given on the command line (absl's FlagValues), by name, as a child gets them: all
  but `DRIVER_FLAGS`, and the config's overrides (--config.x.y=v) among them."""
  out, seen = {}, set()
  for name in flag_values:
    flag = flag_values[name]
    if flag.present and id(flag) not in seen and flag.name not in DRIVER_FLAGS:
      seen.add(id(flag))
      out[flag.name] = flag.serialize()
  return out


def combinations(config: str, *, variants: list[str], targets: list[str], devices: list[str]
                 ) -> Iterator[tuple[str, dict[str, str], str]]:
  """(config file:variant, the flag of the target or device count, label) for each variant x
  target (each device count without targets). A config given with its variant is that one."""
  base, _, variant = config.partition(":")
  where = [("target", t) for t in targets] if targets else [("devices", d) for d in devices]
  for v in ([variant] if variant else variants):
    for flag, value in where:
      yield f"{base}:{v}", {flag: value}, f"{v} x {value}"


def run_child(command: list[str], label: str, timeout: float) -> dict[str, Any] | None:
  """The child's report, with its wall time; None (and a line saying why) when it failed."""
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    print(f"{label}: timed out after {timeout:g} s", flush=True)
    return None
  if proc.returncode:
    print(f"{label}: failed\n{proc.stderr[-3000:]}", flush=True)
    return None
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  r["wall_s"] = round(time.perf_counter() - start, 1)
  return r


Runner = Callable[[list[str], str, float], "dict[str, Any] | None"]


def every(children: Children, *, variants: list[str], targets: list[str], devices: list[str],
          run: Runner = run_child) -> int:
  """Every combination's report, printed as `aot.report_lines` and one "json" line; exit status
  1 when one failed (they are named last), else 0."""
  failed = []
  for config, extra, label in combinations(children.config, variants=variants, targets=targets,
                                           devices=devices):
    r = run(children.command(config, extra), label, children.timeout)
    if r is None:
      failed.append(label)
      continue
    print("\n".join(aot.report_lines(r)))
    print(f"  (process wall time {r['wall_s']} s)")
    print("  json " + json.dumps(r), flush=True)
  if failed:
    print("failed: " + "; ".join(failed))
  return 1 if failed else 0


def remat_order(remats: list[str]) -> list[str]:
  """The policies to try: `remats` as given, each checked; none given, every one
  (`nextdit.REMAT_POLICIES`, least recomputation first)."""
  unknown = [r for r in remats if r not in nextdit.REMAT_POLICIES]
  if unknown:
    raise input_errors.InputError(f"remat policies {unknown} are not among "
                                  f"{nextdit.REMAT_POLICIES}")
  return list(remats) or list(nextdit.REMAT_POLICIES)


def fit(children: Children, *, variants: list[str], targets: list[str], remats: list[str],
        config_of: Callable[[str], Any], mesh: str = "", run: Runner = run_child) -> int:
  """Per variant and target, the largest micro-batch per chip that fits (the module docstring),
  a line for each compile and one when nothing fits. `config_of(file:variant)` is the config a
  child would compile (its overrides set), for the per-chip step batch the search starts from."""
  if not targets:
    raise input_errors.InputError("--fit needs --targets (TPU slices: their HBM decides a fit)")
  order = remat_order(remats)
  for config, extra, label in combinations(children.config, variants=variants, targets=targets,
                                           devices=[]):
    start = aot.per_device_step_batch(config_of(config), aot.tpu_target(extra["target"]), mesh)
    found = False
    for remat in order:
      per_device = start
      while per_device >= 1 and not found:
        r = run(children.command(config, dict(extra, remat=remat, per_device_batch=per_device,
                                              micro_batches=0)),
                f"{label} {remat} {per_device}/device", children.timeout)
        if r is not None:
          total = aot.gib_text(r["memory"]["total"]) if r.get("memory") else "-"
          print(f"{label} remat {remat} {per_device}/device: "
                f"{'fits' if r.get('fits') else 'does not fit'} ({total} GiB)", flush=True)
          print("  json " + json.dumps(r), flush=True)
          found = bool(r.get("fits"))
        per_device //= 2
      if found:
        break
    if not found:
      print(f"{label}: nothing fits with remat {','.join(order)}", flush=True)
  return 0
