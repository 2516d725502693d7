"""Model configs from plain dicts (ml_collections sections, saved JSON): one strict constructor."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from svg_jax.input_errors import InputError


def from_dict(cls, d: Any, name: str, tuple_fields: Sequence[str] = ()):
  """`cls(**d)`, with list values of `tuple_fields` made tuples (JSON and ml_collections give
  lists) and unknown keys an error naming them."""
  d = dict(d)
  for key in tuple_fields:
    if d.get(key) is not None:
      d[key] = tuple(d[key])
  unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise InputError(f"unknown {name} config fields: {sorted(unknown)}")
  return cls(**d)


def whole_number_problems(cfg, least: Mapping[str, int]) -> list[str]:
  """"<field> must be an integer >= n, got v" for each field of `cfg` named in `least` (field ->
  n) whose value is not such an integer (bools are not)."""
  return [f"{name} must be an integer >= {n}, got {getattr(cfg, name)!r}"
          for name, n in least.items() if not is_whole_number(getattr(cfg, name), n)]


def is_whole_number(value: Any, least: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= least
