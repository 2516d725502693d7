"""What a training task gives the shared loop: a `Task` and the `TaskSetup` it builds.

The loop (svg_jax/train/loop.py) knows only this interface. Each task module (dit_task.py,
decoder_task.py) exports one `Task` built from this file, and only the trainer (trainer.py) names
the tasks, so imports run one way: task modules and the loop import this file, the trainer
imports them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol


class TaskSetup(Protocol):
  """Model, optimizer, abstract state and shardings, jitted init and step of a task on one mesh."""

  rules: Any  # logical-axis rules for `parallel.mesh_context`
  abstract_state: Any  # ShapeDtypeStructs with shardings (restores and `init_from` target it)
  state_shardings: Any
  logger_class: Callable[..., Any]  # a metrics.MetricsLogger class, or a callable like it
  init_from_note: str  # what else starts fresh from `train.init_from` (the loop's line ends so)
  # Saved with every checkpoint beside the config, under keys of their own: what the run's data
  # was made with that a reader of the checkpoint needs (the DiT's text conditioning).
  saved_facts: dict

  def init_state(self, seed: int) -> Any:
    """A fresh state, every array made directly in its shards."""

  def state_from_params(self, params) -> Any:
    """A fresh state around trained params (a later stage starts from an earlier one's)."""

  def load_init_params(self, source: str, fmt: str, step: int | None) -> tuple[Any, int | None]:
    """(params on the state's shardings, the step read or None) of `train.init_from`: a training
    workdir's step `step` (None: its newest) when `fmt` is "", else a weights file in format
    `fmt`. Raises FileNotFoundError (no such checkpoint), InputError (weights that do not fit)."""

  def compile_step(self, state, batch: dict, rng) -> Callable[..., tuple[Any, dict]]:
    """The jitted train step compiled ahead for these arguments' shapes: this call does the whole
    compile, and the callable it returns, (state, batch, rng) -> (state, metrics) on arguments of
    the same shapes, runs one step; the metrics hold at least `loss` and `grad_norm`."""

  def make_data_iterator(self) -> Iterator[dict]:
    """A Grain iterator whose state goes into every checkpoint."""

  def device_batch(self, local_batch: dict) -> dict:
    """This process's batch -> the global batch, sharded over the mesh."""

  def batch_counts(self, local_batch: dict) -> tuple[int, int, float]:
    """(images, tokens, FLOPs) of one global step on a batch shaped like `local_batch`."""

  def poison(self, local_batch: dict) -> dict:
    """The batch made NaN (`train.debug_nan_step` tests the divergence stop)."""

  def eval_due(self, step: int, at_end: bool) -> bool:
    """Whether `evaluate` runs after this step."""

  def compile_eval(self, state) -> None:
    """Compiles ahead what `evaluate` runs on a state like `state`, so that it compiles nothing
    (the loop calls it, untimed, with the first step's compile)."""

  def evaluate(self, state, step: int) -> dict:
    """Numbers written to metrics.jsonl as an "eval" record."""


@dataclasses.dataclass(frozen=True)
class Task:
  """A trainable task: `config.task == name` selects it.

  config_problems(config, process_count) lists, one line each, what the task needs of a config
  beyond the loop's own checks (nothing compiles or allocates); make_setup(config, mesh) builds
  its setup after those checks passed. resolve_config(config, mesh, workdir, agree), when given,
  runs before make_setup and returns (the config with its choices made on the mesh, a metrics
  event describing them or None); agree(i) is the max of i over the processes, and
  agree(i, after_compiles=True) the same where the others may still be compiling (the stall watch
  does not time that wait)."""

  name: str
  config_problems: Callable[[Any, int], list[str]]
  make_setup: Callable[[Any, Any], TaskSetup]
  resolve_config: Callable[[Any, Any, str, Callable[..., int]],
                           tuple[Any, dict | None]] | None = None
