"""docs/config.md documents every config field of every config variant, and only fields that exist.

The fields are the dotted leaf names of every variant of every config file under configs/: a
ConfigDict (or dict) is descended into, so `mesh.fsdp` is a field; any other value, a tuple such
as `axis_rules` included, is one field. docs/config.md documents a field in a field table: a
markdown table whose header row is `| field | default | what it does |` and whose first column
holds the field's name in backticks, under a heading that is either the section as one
backticked dotted name (`` ## `autoencoder.encoder` ``) or `## Top-level fields`. A field named
only in prose, or in another table, does not count. The tests fail on a field of some variant that
no table documents, on a documented field that no variant has (stale docs), and on a field
documented twice; the last test shows that the check sees a missing and a stale row.
"""
from __future__ import annotations

import functools
import os
import re

import ml_collections
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "config.md")

FIELD_HEADER = ("field", "default", "what it does")
TOP_LEVEL_HEADING = "Top-level fields"
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_SECTION = re.compile(r"^`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)`$")
_NAME = re.compile(r"^`([A-Za-z_]\w*)`$")


# ----------------------------------------------------------------------------- the configs


@functools.lru_cache(maxsize=None)
def _variants() -> dict[str, ml_collections.ConfigDict]:
  """Every variant of every configs/*.py, by its `--config` spelling."""
  from configs import decoder, precompute, svg_t2i_2b, tiny
  from svg_jax.demo import configs as demo_configs
  out = {}
  for stage in svg_t2i_2b.STAGES:
    out[f"configs/svg_t2i_2b.py:{stage}"] = svg_t2i_2b.get_config(stage)
  for variant in decoder.VARIANTS:
    out[f"configs/decoder.py:{variant}"] = decoder.get_config(variant)
  for preset in demo_configs.PRESETS:
    out[f"configs/tiny.py:{preset}"] = tiny.get_config(preset)
  # configs/precompute.py names its variants only in its error message: none, or demo.
  for variant in ("", "demo"):
    out[f"configs/precompute.py:{variant}".rstrip(":")] = precompute.get_config(variant)
  return out


def flatten(config, prefix: str = "") -> set[str]:
  """Dotted names of the leaves of a ConfigDict (sub-dicts descended into, tuples are leaves)."""
  out = set()
  for key, value in config.items():
    name = prefix + str(key)
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out |= flatten(value, name + ".")
    else:
      out.add(name)
  return out


@functools.lru_cache(maxsize=None)
def config_fields() -> dict[str, tuple[str, ...]]:
  """field -> the variants that have it."""
  owners: dict[str, list[str]] = {}
  for spec, config in _variants().items():
    for name in flatten(config):
      owners.setdefault(name, []).append(spec)
  return {name: tuple(specs) for name, specs in owners.items()}


# ----------------------------------------------------------------------------- the doc


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def _is_table_row(line: str) -> bool:
  return line.lstrip().startswith("|")


def _prefix(heading: str | None, line_no: int) -> str:
  if heading == TOP_LEVEL_HEADING:
    return ""
  match = _SECTION.match(heading or "")
  if not match:
    raise ValueError(f"docs/config.md line {line_no}: a field table under the heading {heading!r},"
                     f" which is neither a backticked section name nor {TOP_LEVEL_HEADING!r}")
  return match.group(1) + "."


def documented_fields(text: str) -> list[str]:
  """The dotted names the field tables of `text` document, in order (repeats kept)."""
  names = []
  heading = None
  lines = text.splitlines()
  in_fence = False
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.lstrip().startswith("```"):
      in_fence = not in_fence
      i += 1
      continue
    if in_fence:
      i += 1
      continue
    match = _HEADING.match(line)
    if match:
      heading = match.group(2)
      i += 1
      continue
    if _is_table_row(line) and tuple(_cells(line)) == FIELD_HEADER:
      prefix = _prefix(heading, i + 1)
      i += 2  # the header and its |---| row
      while i < len(lines) and _is_table_row(lines[i]):
        first = _cells(lines[i])[0]
        name = _NAME.match(first)
        if not name:
          raise ValueError(f"docs/config.md line {i + 1}: the first cell {first!r} of a field "
                           "table row is not one backticked field name")
        names.append(prefix + name.group(1))
        i += 1
      continue
    i += 1
  return names


def compare(fields, text: str) -> tuple[set[str], set[str]]:
  """(fields that no table of `text` documents, documented names that are no field)."""
  documented = set(documented_fields(text))
  return set(fields) - documented, documented - set(fields)


@functools.lru_cache(maxsize=None)
def doc_text() -> str:
  with open(DOC, encoding="utf-8") as f:
    return f.read()


# ----------------------------------------------------------------------------- the tests


def test_every_config_field_is_documented():
  fields = config_fields()
  missing, _ = compare(fields, doc_text())
  count = len(_variants())

  def where(name):
    return "every variant" if len(fields[name]) == count else ", ".join(fields[name])

  assert not missing, "fields missing from docs/config.md's tables:\n" + "\n".join(
      f"  {name} (in {where(name)})" for name in sorted(missing))


def test_every_documented_field_exists():
  _, stale = compare(config_fields(), doc_text())
  assert not stale, ("docs/config.md documents fields that no config variant has: "
                     f"{sorted(stale)}")


def test_no_field_is_documented_twice():
  names = documented_fields(doc_text())
  repeated = sorted({n for n in names if names.count(n) > 1})
  assert not repeated, f"documented more than once in docs/config.md: {repeated}"


def test_the_check_sees_missing_stale_and_misplaced_rows():
  """Edited copies of the doc (never the file): a deleted row is missing even where prose names
  the field, an invented row is stale, a row under the wrong section is both, and a field table
  under a heading that names no section is an error."""
  text = doc_text()
  fields = config_fields()
  assert compare(fields, text) == (set(), set())  # the baseline the edits are measured from

  row = next(line for line in text.splitlines() if line.startswith("| `keep_checkpoints` |"))
  without = text.replace(row + "\n", "") + "\nProse naming `train.keep_checkpoints`.\n"
  assert compare(fields, without) == ({"train.keep_checkpoints"}, set())

  invented = text.replace(row, row + "\n| `keep_forever` | `0` | Not a field. |")
  assert compare(fields, invented) == (set(), {"train.keep_forever"})

  table = "| field | default | what it does |\n|---|---|---|\n" + row + "\n"
  moved = text.replace(row + "\n", "") + "\n## `data`\n\n" + table
  assert compare(fields, moved) == ({"train.keep_checkpoints"}, {"data.keep_checkpoints"})

  loose = text + "\n## Notes\n\n" + table
  with pytest.raises(ValueError, match="neither a backticked section name"):
    documented_fields(loose)
