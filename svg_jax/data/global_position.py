"""The position of a loader that P processes saved: global batch k holds the same records on any
process count, so every process saved the same position, and a resume on any process count
starts from it. Saved states that disagree cannot come from one run."""
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
