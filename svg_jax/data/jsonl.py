"""Reading JSON-lines files: one parse loop for every jsonl the project reads.

Callers differ only in what they do with a bad line (stop at the first, collect them all, or report
it as a bad input), so the loop yields the problem instead of deciding.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, NamedTuple


class Line(NamedTuple):
  number: int  # 1-based
  item: dict | None  # the JSON object, or None when the line is bad
  problem: str | None  # why the line is bad ("not valid JSON (...)", ...), else None


def lines(path: str | os.PathLike) -> Iterator[Line]:
  """The non-blank lines of a jsonl file, each parsed to a JSON object or its problem."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a byte-order mark (editors on Windows write one): not part of the JSON
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield Line(number, None, f"not UTF-8 ({e.reason})")
        continue
      if not text.strip():
        continue
      try:
        item = json.loads(text)
      except json.JSONDecodeError as e:
        yield Line(number, None, f"not valid JSON ({e.msg})")
        continue
      if not isinstance(item, dict):
        yield Line(number, None, f"a JSON {type(item).__name__}, not an object")
        continue
      yield Line(number, item, None)


def prompts(path: str | os.PathLike) -> list[str]:
  """The `prompt` strings of a jsonl file of `{"prompt": ...}` lines; ValueError naming the first
  line that has none."""
  out = []
  for line in lines(path):
    prompt = None if line.problem else line.item.get("prompt")
    if not isinstance(prompt, str):
      raise ValueError(f"{path} line {line.number}: {line.problem or 'no string `prompt`'}")
    out.append(prompt)
  return out
