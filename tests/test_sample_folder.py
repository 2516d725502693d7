"""The folder of a sampling run, written batch by batch: what an earlier run, an interrupted batch
and a long run leave in it."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from svg_jax import generate as gen
from svg_jax import sample_folder
from svg_jax.utils import atomic_files


def _images(n, start=0):
  """n distinct 4x6 images (pixel values start, start + 1, ...)."""
  return [np.full((4, 6, 3), start + k, np.uint8) for k in range(n)]


def _fields(prompts, seeds):
  return [dict(prompt=p, seed=s) for p, s in zip(prompts, seeds)]


def _meta(out):
  return [json.loads(line) for line in open(out / sample_folder.METADATA)]


def _png(path):
  return np.asarray(Image.open(path).convert("RGB"))


def test_replaces_an_earlier_run_and_keeps_other_files(tmp_path):
  out = tmp_path / "out"
  earlier = sample_folder.SampleFolder(str(out), dict(steps=2))
  earlier.add(range(3), _images(3), _fields("abc", [0, 1, 2]))
  assert earlier.finish()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(sample_folder.InputError, match="holds an earlier run's images"):
    sample_folder.check_folder(str(out), overwrite=False)
  sample_folder.check_folder(str(out), overwrite=True)
  # Nothing goes before the new run has a batch to write (a run that fails first keeps the old).
  new = sample_folder.SampleFolder(str(out), dict(steps=3))
  assert len(os.listdir(out)) == 6
  new.add([0], [_images(1, 9)[0]], _fields("d", [7]))
  assert sorted(os.listdir(out)) == ["00000.png", "metadata.jsonl", "notes.txt"]
  assert new.finish()
  assert sorted(os.listdir(out)) == ["00000.png", "grid.png", "metadata.jsonl", "notes.txt"]
  assert _meta(out) == [dict(file="00000.png", prompt="d", seed=7, width=6, height=4, steps=3)]
  assert _png(out / "00000.png").max() == 9


def test_metadata_grows_per_batch_and_the_grid_is_read_back(tmp_path):
  out = tmp_path / "out"
  folder = sample_folder.SampleFolder(str(out), dict(steps=2))
  images = _images(5, 10)
  folder.add(range(0, 2), images[:2], _fields("ab", [0, 1]))
  assert [m["file"] for m in _meta(out)] == ["00000.png", "00001.png"]
  assert not os.path.exists(out / sample_folder.GRID)
  folder.add(range(2, 5), np.stack(images[2:]), _fields("cde", [2, 3, 4]))
  assert [(m["file"], m["prompt"]) for m in _meta(out)] == [
      (f"{j:05d}.png", p) for j, p in enumerate("abcde")]
  assert folder.finish(grid_cols=2)
  np.testing.assert_array_equal(_png(out / sample_folder.GRID), gen.make_grid(images, 2))


def test_an_interrupted_batch_leaves_only_listed_images(tmp_path, monkeypatch):
  """Ctrl-C while a batch's second PNG is written: the batch's first PNG goes too, the earlier
  batch and its metadata lines stay, and the folder counts as an earlier run."""
  out = tmp_path / "out"
  folder = sample_folder.SampleFolder(str(out), {})
  folder.add(range(2), _images(2), _fields("ab", [0, 1]))
  save, saved = atomic_files.save_png, []

  def save_then_interrupt(path, image, tmp_dir=None):
    saved.append(path)
    if len(saved) == 2:
      raise KeyboardInterrupt
    save(path, image, tmp_dir)

  monkeypatch.setattr(atomic_files, "save_png", save_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    folder.add(range(2, 4), _images(2, 2), _fields("cd", [2, 3]))
  assert len(saved) == 2
  assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "metadata.jsonl"]
  assert [m["file"] for m in _meta(out)] == ["00000.png", "00001.png"]
  assert folder.written == ["00000.png", "00001.png"]
  with pytest.raises(sample_folder.InputError, match="holds an earlier run's images"):
    sample_folder.check_folder(str(out), overwrite=False)


def test_no_grid_above_the_limit_and_no_stale_one(tmp_path):
  out = tmp_path / "out"
  small = sample_folder.SampleFolder(str(out), {})
  small.add(range(2), _images(2), _fields("ab", [0, 1]))
  assert small.finish() and os.path.exists(out / sample_folder.GRID)
  n = sample_folder.GRID_MAX_IMAGES + 1
  big = sample_folder.SampleFolder(str(out), {})
  for start in range(0, n, 16):
    k = min(16, n - start)
    big.add(range(start, start + k), _images(k), _fields("x" * k, range(start, start + k)))
  assert not big.finish()
  assert not os.path.exists(out / sample_folder.GRID)  # the earlier run's went with it
  assert len(_meta(out)) == n and len(os.listdir(out)) == n + 1
  # At the limit there is one.
  exact = sample_folder.SampleFolder(str(tmp_path / "exact"), {})
  exact.add(range(n - 1), _images(n - 1), _fields("x" * (n - 1), range(n - 1)))
  assert exact.finish() and os.path.exists(tmp_path / "exact" / sample_folder.GRID)


def _sized(fields, w=6, h=4):
  return [dict(f, width=w, height=h) for f in fields]


def test_resuming_keeps_the_same_jobs_images_and_refuses_another_job(tmp_path):
  out = tmp_path / "out"
  job = _fields("abcd", [0, 1, 2, 3])
  earlier = sample_folder.SampleFolder(str(out), dict(steps=2))
  earlier.add(range(3), _images(3), job[:3])
  (out / "00001.png").unlink()  # gone since: made again
  with pytest.raises(sample_folder.InputError, match="holds an earlier run's images"):
    sample_folder.check_folder(str(out), overwrite=False)
  sample_folder.check_folder(str(out), overwrite=False, resume=True)
  refusals = [  # (provenance, fields of the job, what the line names)
      (dict(steps=3), _sized(job), "steps: 2 there, 3 now"),
      (dict(steps=2), _sized(_fields("abxd", [0, 1, 2, 3])), "prompt: 'c' there, 'x' now"),
      (dict(steps=2), _sized(job, w=8), "width: 6 there, 8 now"),
      (dict(steps=2), _sized(job[:2]), "00002.png, past this job's 2 images")]
  for provenance, fields, line in refusals:
    with pytest.raises(sample_folder.InputError, match=line.replace("(", r"\(")):
      sample_folder.SampleFolder(str(out), provenance, resume_fields=fields)
  assert len(_meta(out)) == 3  # a refused resume changes nothing
  folder = sample_folder.SampleFolder(str(out), dict(steps=2), resume_fields=_sized(job))
  assert folder.done == {0, 2}
  assert [m["file"] for m in _meta(out)] == ["00000.png", "00002.png"]  # the lost one unlisted
  folder.add([1, 3], _images(2, 20), [job[1], job[3]])
  assert folder.finish(grid_cols=4)
  assert sorted(m["file"] for m in _meta(out)) == [f"{j:05d}.png" for j in range(4)]
  grid = _png(out / sample_folder.GRID)
  assert [int(grid[0, 6 * k, 0]) for k in range(4)] == [0, 20, 2, 21]  # in image order


def test_resuming_a_folder_of_another_tool_is_refused(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / sample_folder.METADATA).write_text(json.dumps({"file_name": "x.png"}) + "\n")
  with pytest.raises(sample_folder.InputError, match="line 1 is not an image's line"):
    sample_folder.SampleFolder(str(out), {}, resume_fields=_sized(_fields("a", [0])))
  fresh = sample_folder.SampleFolder(str(tmp_path / "new"), {}, resume_fields=[])
  assert fresh.done == set() and not os.path.exists(tmp_path / "new")
