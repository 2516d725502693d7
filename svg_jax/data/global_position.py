"""A loader among the P processes of a job: which process it is, and the position they saved.

Global batch k holds the same records on any process count, so every process saved the same
position, and a resume on any process count starts from it. Saved states that disagree cannot
come from one run."""
from __future__ import annotations

import json
from typing import Any, Sequence


def agreed_position(positions: Sequence[Any], what: str) -> Any:
  """The position every one of `positions` (JSON-like, one per saving process) holds; ValueError
  naming `what` (the loader) when they differ."""
  distinct = {json.dumps(p, sort_keys=True) for p in positions}
  if len(distinct) != 1:
    raise ValueError(f"the {len(positions)} saved {what} states disagree on the position: "
                     f"{sorted(distinct)}")
  return positions[0]


def process_of(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process: JAX's where the caller gave None; ValueError when the
  index is outside [0, count)."""
  if process_index is None or process_count is None:
    import jax  # only when the caller did not say; keeps the data code importable without jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count
