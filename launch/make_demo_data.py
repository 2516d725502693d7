"""Writes the offline demo dataset (coloured shapes with GenEval-style captions) to a directory.

  python launch/make_demo_data.py --out runs/shapes --num_train 4000 --num_heldout 300 \
      --image_size 64 --seed 0 [--preset small|full] [--layouts fixed|jittered]

Rerunning with the same flags on a complete directory does nothing; see svg_jax/demo/shapes.py.

The layouts default to the --preset's (svg_jax/demo/configs.py: small has fixed ones, full
jittered ones). With --decoder_files, --out gets what the preset's demo decoder
(configs/decoder.py:tiny, or tiny_full) trains on, as the demo makes it
(svg_jax/demo/decoder_data.py): the dataset in shapes_<size>px[_fixed]_seed<seed>/, a random
DINOv3 of that config's encoder made from --seed and its latent statistics. The command
then prints the config flags that point launch/train.py at them:

  python launch/make_demo_data.py --out runs/decoder_files --decoder_files
  python launch/train.py --config configs/decoder.py:tiny --workdir runs/decoder <printed flags>
"""
from absl import app, flags

from svg_jax import cli

_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 4000, "Number of training images.")
_NUM_HELDOUT = flags.DEFINE_integer("num_heldout", 300, "Number of held-out images.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Image side in pixels (64 or 128 typical; "
                                   "at least 32, for shapes to stay recognisable).")
# shapes.write_dataset's bounds, checked while the flags are parsed: one line, exit 2 (cli.run).
flags.register_validator("num_train", lambda n: n >= 0, "--num_train must be >= 0")
flags.register_validator("num_heldout", lambda n: n >= 0, "--num_heldout must be >= 0")
flags.register_validator("image_size", lambda n: n >= 32,
                         "--image_size must be >= 32 for shapes to stay recognisable")
_SEED = flags.DEFINE_integer("seed", 0, "Seed; every image is a function of (seed, split, index).")
_PRESET = flags.DEFINE_enum("preset", "small", ["small", "full"],
                            "demo preset: its layouts and, with --decoder_files, its encoder")
_LAYOUTS = flags.DEFINE_enum("layouts", None, ["fixed", "jittered"],
                             "object placement (default: the preset's)")
_DECODER_FILES = flags.DEFINE_bool(
    "decoder_files", False, "also the random DINOv3 of the preset's demo encoder and its latent "
    "statistics, and print the config flags for launch/train.py")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from svg_jax.demo import configs, decoder_data, shapes

  layouts = _LAYOUTS.value or configs.preset(_PRESET.value).layouts
  if _DECODER_FILES.value:
    config = configs.decoder(_PRESET.value)
    config.data.resolution = _IMAGE_SIZE.value
    paths = decoder_data.prepare_for(config, _OUT.value, num_train=_NUM_TRAIN.value,
                                     num_heldout=_NUM_HELDOUT.value, seed=_SEED.value,
                                     layouts=layouts)
    flags_out = [f"--config.{key}={value}" for key, value in paths.items()]
    if _IMAGE_SIZE.value != configs.RESOLUTION:
      flags_out.append(f"--config.data.resolution={_IMAGE_SIZE.value}")
    print(" ".join(flags_out))
    return
  manifest = shapes.write_dataset(_OUT.value, _NUM_TRAIN.value, _NUM_HELDOUT.value,
                                  _IMAGE_SIZE.value, _SEED.value, layouts)
  counts = manifest["counts"]
  print(f"{_OUT.value}: {counts['train']} train, {counts['heldout']} held-out images at "
        f"{manifest['image_size']}px, {layouts} layouts, seed {manifest['seed']}")


if __name__ == "__main__":
  cli.run(main)
