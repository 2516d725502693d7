"""Tiny TFDS datasets defined in code, for `tfds.testing.mock_data(policy=USE_CODE)`: a builder of
16x16 RGB images and one text feature, registered under the snake_case of `class_name`."""
import numpy as np


def define_captioned_images(class_name: str, caption_key: str = "caption"):
  """Defines (and so registers) the builder class; tensorflow-datasets needs no TensorFlow here."""
  import tensorflow_datasets as tfds

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), caption_key: tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield 0, {"image": np.zeros((16, 16, 3), np.uint8), caption_key: "x"}

  return type(class_name, (tfds.core.GeneratorBasedBuilder,), dict(
      VERSION=tfds.core.Version("1.0.0"), _info=_info, _split_generators=_split_generators,
      _generate_examples=_generate_examples))


def define_multi_captioned_images(class_name: str):
  """A builder shaped like COCO captions: `image` and several captions per image in the nested
  feature `captions/text` (tfds.features.Sequence of a FeaturesDict)."""
  import tensorflow_datasets as tfds

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      yield i, {"image": np.full((16, 16, 3), 40 * i, np.uint8),
                "captions": {"id": [10 * i, 10 * i + 1],
                             "text": [f"picture {i}", f"another caption of {i}"]}}

  return type(class_name, (tfds.core.GeneratorBasedBuilder,), dict(
      VERSION=tfds.core.Version("1.0.0"), _info=_info, _split_generators=_split_generators,
      _generate_examples=_generate_examples))


def define_raw_captioned_images(class_name: str):
  """A builder whose images are raw uint8 tensors, so that `download_and_prepare` writes real
  ArrayRecord files without TensorFlow (an Image feature encodes with it). Its examples are the
  class's `CAPTIONS` at preparation: set them, then prepare into a data dir."""
  import tensorflow_datasets as tfds

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(16, 16, 3), dtype=np.uint8),
        "caption": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, caption in enumerate(self.CAPTIONS):
      yield i, {"image": np.full((16, 16, 3), 40 * i, np.uint8), "caption": caption}

  return type(class_name, (tfds.core.GeneratorBasedBuilder,), dict(
      VERSION=tfds.core.Version("1.0.0"), CAPTIONS=(), _info=_info,
      _split_generators=_split_generators, _generate_examples=_generate_examples))
