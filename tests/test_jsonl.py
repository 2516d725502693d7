"""The one jsonl line reader: numbering, blank lines, and each kind of bad line, as each reader
built on it reports them."""
import pytest

from svg_jax.data import image_pipeline, jsonl
from svg_jax.demo import shapes
from svg_jax.eval import benchmarks


@pytest.fixture
def mixed(tmp_path):
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(b'{"path": "a.png", "prompt": "p"}\n\n   \n[1, 2]\nnot json\n\xff\xfe\n'
                   b'{"path": "b.png", "prompt": "q"}\n')
  return path


def test_lines_number_parse_and_name_problems(mixed):
  got = [(ln.number, ln.item, ln.problem and ln.problem.split(" (")[0])
         for ln in jsonl.lines(mixed)]
  assert got == [(1, {"path": "a.png", "prompt": "p"}, None),
                 (4, None, "a JSON list, not an object"),
                 (5, None, "not valid JSON"),
                 (6, None, "not UTF-8"),
                 (7, {"path": "b.png", "prompt": "q"}, None)]


def test_readers_stop_or_collect_as_documented(mixed, tmp_path):
  with pytest.raises(ValueError, match=r"mixed.jsonl:4 is a JSON list, not an object"):
    image_pipeline.read_image_list(mixed)  # stops at the first bad line
  with pytest.raises(ValueError, match=r"line 4: a JSON list.*line 5: not valid JSON.*"
                     r"line 6: not UTF-8"):
    benchmarks.read_prompt_file(str(mixed), "geneval")  # collects every bad line
  (tmp_path / "heldout.jsonl").write_bytes(mixed.read_bytes())
  with pytest.raises(ValueError, match=r"heldout.jsonl:1 is missing keys \['metadata'\]"):
    shapes.read_split(str(tmp_path), "heldout")
  with pytest.raises(ValueError, match=r"mixed.jsonl line 4: a JSON list, not an object"):
    jsonl.prompts(mixed)  # stops at the first bad line
  good = tmp_path / "prompts.jsonl"
  good.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "seed": 3}\n{"text": "x"}\n')
  with pytest.raises(ValueError, match=r"prompts.jsonl line 4: no string `prompt`"):
    jsonl.prompts(good)
  good.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "seed": 3}\n')
  assert jsonl.prompts(good) == ["a cat", "a dog"]
