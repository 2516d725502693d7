"""The precompute job's inputs (svg_jax/data/sources.py) on the odd things users' data holds:
names and captions UTF-8 cannot store, byte-order marks, links to folders, repeated paths, edited
captions, TFDS datasets that cannot be opened or lack a feature."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

import tfds_datasets
from svg_jax import config as config_lib
from svg_jax.data import sources
from svg_jax.input_errors import InputError


def _image(path):
  Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)


def _pair(folder, stem, caption):
  folder.mkdir(parents=True, exist_ok=True)
  _image(folder / f"{stem}.png")
  (folder / f"{stem}.txt").write_text(caption)


def _reasons(items):
  return {it.key: it.error for it in items if it.error is not None}


def test_a_file_name_utf8_cannot_hold_is_a_bad_input(tmp_path):
  d = tmp_path / "in"
  _pair(d, "good", "a cat")
  raw = os.path.join(os.fsencode(d), b"bad\xffname")
  _image(raw + b".png")
  with open(raw + b".txt", "w") as f:
    f.write("a dog")
  items = sources.read_folder(str(d))
  assert _reasons(items) == {"bad\\udcffname.png": "the file name is not valid UTF-8 (rename it)"}
  assert [it.key for it in items if it.error is None] == ["good.png"]
  for it in items:
    it.key.encode("utf-8")  # every key can be written to the manifest


def test_a_lone_surrogate_in_a_jsonl_path_or_caption_is_a_bad_input(tmp_path):
  _image(tmp_path / "a.png")
  (tmp_path / "t.jsonl").write_text('{"path": "a.png", "prompt": "lone \\ud800 surrogate"}\n'
                                    '{"path": "b\\udcff.png", "prompt": "fine"}\n')
  items = sources.read_jsonl(str(tmp_path / "t.jsonl"))
  assert _reasons(items) == {"b\\udcff.png": "bad jsonl line t.jsonl:2: the path is not valid "
                             "UTF-8 text (a lone surrogate escape)"}
  with pytest.raises(sources.BadInput, match="not valid UTF-8"):
    sources.check_caption(items[0].caption)


def test_byte_order_marks_are_not_text(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  _image(d / "a.png")
  (d / "a.txt").write_bytes("\ufeffa caption".encode("utf-8"))
  assert [it.caption for it in sources.read_folder(str(d))] == ["a caption"]
  (d / "t.jsonl").write_bytes("\ufeff".encode("utf-8") + b'{"path": "a.png", "prompt": "p"}\n')
  assert [(it.key, it.caption, it.error) for it in sources.read_jsonl(str(d / "t.jsonl"))] == [
      ("a.png", "p", None)]


def test_links_to_folders_are_read_once(tmp_path):
  elsewhere = tmp_path / "elsewhere"
  _pair(elsewhere, "far", "a far cat")
  d = tmp_path / "in"
  _pair(d / "b", "near", "a near dog")
  os.symlink(elsewhere, d / "c_link")  # a folder outside: its images are inputs
  os.symlink(elsewhere, d / "d_again")  # the same folder a second time
  os.symlink(d / "b", d / "a_to_b")  # a second name of a folder inside (sorted before b)
  os.symlink(d, d / "b" / "loop")  # a loop
  items = sources.read_folder(str(d))
  assert [it.key for it in items if it.error is None] == ["b/near.png", "c_link/far.png"]
  assert sorted(_reasons(items)) == ["a_to_b", "b/loop", "d_again"]
  assert all("read once" in reason for reason in _reasons(items).values())


def test_repeated_jsonl_paths_are_kept_and_said(tmp_path, caplog):
  _image(tmp_path / "a.png")
  (tmp_path / "t.jsonl").write_text('{"path": "a.png", "prompt": "one"}\n' * 3)
  with caplog.at_level(logging.WARNING):
    items = sources.read_jsonl(str(tmp_path / "t.jsonl"))
  assert [it.key for it in items] == ["a.png"] * 3
  assert "1 paths appear more than once (2 extra lines; first: a.png, 3 times)" in caplog.text


def test_edited_captions_change_the_fingerprint(tmp_path):
  d = tmp_path / "in"
  _pair(d, "a", "a cat")
  before = sources.Inputs.from_items(sources.read_folder(str(d))).fingerprint
  assert sources.Inputs.from_items(sources.read_folder(str(d))).fingerprint == before
  (d / "a.txt").write_text("a dog")
  assert sources.Inputs.from_items(sources.read_folder(str(d))).fingerprint != before
  same_keys = sources.read_folder(str(d), system_prompt="align")
  assert sources.Inputs.from_items(same_keys).fingerprint != before


def test_tfds_that_cannot_be_opened_or_lacks_a_feature_is_one_line(tmp_path):
  import tensorflow_datasets as tfds

  tfds_datasets.define_captioned_images("CaptionKeys", caption_key="text")
  cfg = config_lib.precompute_defaults()
  with pytest.raises(InputError, match=r"tfds dataset 'no_such_set_here' split 'train' .* cannot "
                     "be opened"):
    sources.read_tfds("no_such_set_here", "train", data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(InputError, match="has no feature 'caption'.*'text'.*tfds_caption_key"):
      sources.list_inputs("caption_keys", "tfds", cfg)
    cfg.tfds_caption_key = "text"
    assert len(sources.list_inputs("caption_keys", "tfds", cfg)) == 2


def test_tfds_nested_captions_take_the_first_and_a_non_text_caption_is_one_line():
  """COCO-style datasets keep several captions per image in a nested feature: `captions/text`
  reads it (TFDS's notation), the first caption is the image's; a key naming no text is one line
  before anything is read."""
  import tensorflow_datasets as tfds

  tfds_datasets.define_multi_captioned_images("ManyCaptions")
  cfg = config_lib.precompute_defaults()
  cfg.tfds_caption_key = "captions/text"
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    inputs = sources.list_inputs("many_captions", "tfds", cfg)
    source = tfds.data_source("many_captions", split="train")
    for i in range(3):
      texts = [t.decode() if isinstance(t, bytes) else t for t in source[i]["captions"]["text"]]
      assert inputs[i].caption == (texts[0] if texts else "")
      np.testing.assert_array_equal(inputs[i].image, source[i]["image"])
    assert any(len(source[i]["captions"]["text"]) > 1 for i in range(3))  # several to pick from
    for key, message in (("captions/id", "feature 'captions/id' is no text"),
                         ("captions", "feature 'captions' is no text"),
                         ("text", r"no feature 'text' .*'captions/text'.*'a/b'")):
      cfg.tfds_caption_key = key
      with pytest.raises(InputError, match=message):
        sources.list_inputs("many_captions", "tfds", cfg)


def test_a_tfds_dataset_prepared_again_with_other_content_has_another_fingerprint(tmp_path):
  """The resume plan compares fingerprints: one of name, split and length alone let a resume mix
  records of a dataset prepared again (same length, other captions) into the first one's. Real
  ArrayRecord files, read by tfds.data_source."""
  builder = tfds_datasets.define_raw_captioned_images("RawCaptions")
  cfg = config_lib.precompute_defaults()

  def prepared(folder, captions):
    builder.CAPTIONS = captions
    builder(data_dir=str(tmp_path / folder), file_format="array_record").download_and_prepare()
    cfg.tfds_data_dir = str(tmp_path / folder)
    return sources.list_inputs("raw_captions", "tfds", cfg)

  first = prepared("a", ("a red cube", "a blue ball", "two green cones", "a cat"))
  assert sorted(first[i].caption for i in range(4)) == ["a blue ball", "a cat", "a red cube",
                                                        "two green cones"]  # TFDS's order
  copy = prepared("b", ("a red cube", "a blue ball", "two green cones", "a cat"))
  assert copy.fingerprint == first.fingerprint  # the same files in another folder
  for captions in (("a red cube", "a blue ball", "two green cones", "a dog"),  # same bytes
                   ("a red cube", "a blue ball!", "two green cones", "a cat")):
    assert prepared("c" + str(len(captions[1])), captions).fingerprint != first.fingerprint
  cfg.tfds_data_dir, cfg.tfds_split = str(tmp_path / "a"), "train[1:]"
  assert sources.list_inputs("raw_captions", "tfds", cfg).fingerprint != first.fingerprint
