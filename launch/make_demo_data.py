"""Writes the offline demo dataset (coloured shapes with GenEval-style captions) to a directory.

  python launch/make_demo_data.py --out /tmp/shapes --num_train 2000 --num_heldout 300 \
      --image_size 64 --seed 0

Rerunning with the same flags on a complete directory does nothing; see svg_jax.data.shapes.
"""
from absl import app, flags

from svg_jax.data import shapes

_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 2000, "Number of training images.")
_NUM_HELDOUT = flags.DEFINE_integer("num_heldout", 300, "Number of held-out images.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Image side in pixels (64 or 128 typical).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed; every image is a function of (seed, split, index).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  manifest = shapes.write_dataset(_OUT.value, _NUM_TRAIN.value, _NUM_HELDOUT.value,
                                  _IMAGE_SIZE.value, _SEED.value)
  counts = manifest["counts"]
  print(f"{_OUT.value}: {counts['train']} train, {counts['heldout']} held-out images at "
        f"{manifest['image_size']}px, seed {manifest['seed']}")


if __name__ == "__main__":
  app.run(main)
