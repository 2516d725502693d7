"""Training by config: the tasks this trainer knows, and the loop's entry points with
`config.task` looked up among them.

The only module that names every task; the loop (loop.py) takes a task as an argument and the
task modules know only the interface (task_api.py), so no import runs back up to here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from svg_jax.data import pipeline
from svg_jax.train import decoder_task, dit_task, loop, remat
from svg_jax.train.task_api import Task

# The DiT resolves remat "auto" by compiling its own step (remat.py -> aot.py -> dit_task.py),
# so the choice is attached here, above both.
_DIT = dataclasses.replace(dit_task.TASK, resolve_config=remat.resolve)
TASKS: dict[str, Task] = {t.name: t for t in (_DIT, decoder_task.TASK)}


def get(name: str) -> Task:
  """The task called `name`; a `loop.ConfigError` for a name no task has."""
  if name not in TASKS:
    raise loop.ConfigError(f"task {name!r} is not supported by this trainer "
                           f"(only {tuple(TASKS)})")
  return TASKS[name]


def validate_config(config, num_devices: int | None = None,
                    process_count: int | None = None) -> tuple[int, ...]:
  """`loop.validate_config` for the task of `config`; returns the mesh shape."""
  return loop.validate_config(config, get(config.task), num_devices, process_count)


def train(config, workdir: str) -> dict[str, Any]:
  """`loop.train` for the task of `config` (see loop.py for the summary it returns)."""
  try:
    return loop.train(config, workdir, get(config.task))
  finally:  # the loop's batches are gone: their shared memory is unlinked before the exit
    pipeline.release_shared_memory()
