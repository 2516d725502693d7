"""Decoder training as a user meets it: the fields its step logs (no `lpips` without LPIPS
weights, rather than a 0 that reads as a perfect score) and the one-line errors for an encoder
file of the wrong kind (a folder that is no model folder, another file, an SVG autoencoder .ckpt
without its key prefix), through `launch/train.py` on small real files."""
import json
import types

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import script_runs
from svg_jax.convert.torch_pickle import load_torch_file
from svg_jax.demo import decoder_data
from svg_jax.models.decoder import Decoder, DecoderConfig
from svg_jax.models.dinov3 import DINOv3Config, DINOv3ViT
from svg_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from svg_jax.models.lpips import LPIPS
from svg_jax.train import decoder_step

# ----------------------------------------------------------------------------- the step's metrics

ENC = DINOv3Config(patch_size=4, dim=16, depth=1, num_heads=2, ffn_hidden=32, num_register_tokens=1,
                   scan_layers=False)
DEC = DecoderConfig(z_channels=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=0, norm_groups=4)
DISC = DiscriminatorConfig(ndf=8, n_layers=2)


def _step_metrics(with_lpips: bool, enc, dec, disc, lpips_key) -> dict:
  """The metrics of one step past disc_start, with random LPIPS weights or none."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  unbox = lambda t: jax.device_get(nn.unbox(t))  # noqa: E731
  lpips = None
  if with_lpips:
    x = np.zeros((1, 16, 16, 3), np.float32)
    # Jitted: VGG's initializers run op by op otherwise (the slowest part of this test).
    lpips = unbox(jax.jit(lambda k: LPIPS().init(k, x, x)["params"])(lpips_key))
  frozen = {"encoder": unbox(enc), "mean": np.zeros(16, np.float32),
            "std": np.ones(16, np.float32), "lpips": lpips}
  loss = types.SimpleNamespace(lpips_weight=1.0, disc_weight=0.5, disc_factor=1.0, disc_start=0)
  train = types.SimpleNamespace(lr=1e-3, warmup_steps=0, lr_schedule="constant", num_steps=10)
  tx = optax.adam(1e-3)
  step = jax.jit(decoder_step.make_train_step(ENC, DEC, DISC, tx, tx, loss, train))
  state = decoder_step.create_state(unbox(dec), unbox(disc), tx, tx)
  _, metrics = step(state, {"image": images}, jax.random.PRNGKey(0), frozen)
  return jax.device_get(metrics)


def test_lpips_is_logged_only_when_measured():
  # The same encoder, decoder and discriminator for both steps (initialized once, jitted).
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  enc = jax.jit(lambda k: DINOv3ViT(ENC).init(k, np.zeros((1, 16, 16, 3), np.float32)))(k[0])
  dec = jax.jit(lambda k: Decoder(DEC).init(k, np.zeros((1, 4, 4, 16), np.float32)))(k[1])
  disc = jax.jit(lambda k: NLayerDiscriminator(DISC).init(k, np.zeros((2, 16, 16, 3), np.float32),
                                                           True))(k[2])
  enc, dec = enc["params"], dec["params"]
  without = _step_metrics(False, enc, dec, disc, k[3])
  with_ = _step_metrics(True, enc, dec, disc, k[3])
  assert "lpips" not in without, sorted(without)
  assert float(with_["lpips"]) > 0
  # Everything else is logged either way.
  assert set(with_) - set(without) == {"lpips"}
  assert {"loss", "nll", "l1", "g_loss", "d_loss", "d_weight", "disc_factor", "logits_real",
          "logits_fake", "grad_norm", "disc_grad_norm", "lr"} <= set(without)


# ----------------------------------------------------------------------------- launch/train.py

# A small decoder behind a 2-block DINOv3 at 32 px (as the audit's runs).
_ENC_FLAGS = dict(dim=32, depth=2, num_heads=2, ffn_hidden=64, num_register_tokens=1,
                  scan_layers=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The demo's files for that encoder, an SVG-autoencoder-like .ckpt holding the encoder under
  `encoder.` next to decoder weights, and a folder of images that is no model folder."""
  folder = tmp_path_factory.mktemp("decoder_inputs")
  enc = DINOv3Config(**_ENC_FLAGS)
  paths = decoder_data.prepare(str(folder), enc, 32, num_train=8, num_heldout=8, seed=0)
  official = load_torch_file(paths["autoencoder.encoder_path"])
  state = {"encoder." + k: torch.from_numpy(np.asarray(v)) for k, v in official.items()}
  state["decoder.conv_in.weight"] = torch.zeros(4, 32, 3, 3)
  torch.save({"state_dict": state}, folder / "autoencoder.ckpt")
  images = folder / "images"
  images.mkdir()
  (images / "a.png").write_bytes(b"")
  return paths, folder


def _train(paths, workdir, *extra):
  flags = [f"--config.{k}={v}" for k, v in paths.items()]
  flags += [f"--config.autoencoder.encoder.{k}={v}" for k, v in _ENC_FLAGS.items()]
  flags += ["--config.autoencoder.decoder.z_channels=32", "--config.autoencoder.decoder.ch=8",
            "--config.autoencoder.decoder.ch_mult=(1,1,1,1,2)",
            "--config.autoencoder.decoder.num_res_blocks=0",
            "--config.autoencoder.decoder.norm_groups=4", "--config.discriminator.ndf=8",
            "--config.discriminator.n_layers=2", "--config.data.resolution=32",
            "--config.data.num_eval_images=8", "--config.train.global_batch_size=8",
            "--config.train.eval_batch_size=8", "--config.train.log_every=1",
            "--config.train.num_steps=3", "--config.train.eval_every=3",
            "--config.train.checkpoint_every=3", "--config.loss.disc_start=2"]
  return script_runs.run("train.py", "--config",
                         f"{script_runs.REPO}/configs/decoder.py:stage1_256",
                         "--workdir", workdir, *flags, *extra)


def test_training_without_lpips_weights_logs_no_lpips_field(files, tmp_path):
  paths, _ = files
  out = _train(paths, tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  rows = [r for r in records if "event" not in r]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all("l1" in r and "nll" in r and "lpips" not in r for r in rows), rows
  assert [r["disc_factor"] for r in rows] == [0.0, 0.0, 1.0]  # disc_start=2
  evals = [r for r in records if r.get("event") == "eval"]
  assert [sorted(r) for r in evals] == [["event", "heldout_images", "heldout_psnr", "step"]]
  tb = EventAccumulator(str(tmp_path / "tensorboard"))
  tb.Reload()
  tags = set(tb.Tags()["scalars"])
  assert {"train/l1", "eval/heldout_psnr"} <= tags and "train/lpips" not in tags, tags


@pytest.mark.parametrize("encoder, prefix, fragments", [
    ("images", None, ["is a folder but not a Hugging Face model folder",
                      "model.safetensors.index.json", "a.png"]),
    ("stats", None, ["(autoencoder.encoder_path): not a DINOv3 state dict", "['mean', 'std']"]),
    ("ckpt", None, ["is not a DINOv3 state dict itself but holds one under the key prefix "
                    "'encoder.'", "set --config.autoencoder.encoder_prefix=encoder."]),
    ("ckpt", "enc.", ["no key starts with the prefix 'enc.'",
                      "set --config.autoencoder.encoder_prefix=encoder."]),
])
def test_an_encoder_file_of_another_kind_is_one_line_naming_it(files, tmp_path, encoder, prefix,
                                                               fragments):
  paths, folder = files
  path = {"images": folder / "images", "stats": paths["autoencoder.stats_path"],
          "ckpt": folder / "autoencoder.ckpt"}[encoder]
  extra = [f"--config.autoencoder.encoder_path={path}"]
  if prefix is not None:
    extra.append(f"--config.autoencoder.encoder_prefix={prefix}")
  out = _train(paths, tmp_path, *extra)
  script_runs.assert_one_line(out, "input error: ", str(path), *fragments)


def test_the_autoencoder_ckpt_trains_with_its_prefix(files, tmp_path):
  """The flag the error suggests is the one that works."""
  paths, folder = files
  out = _train(paths, tmp_path, f"--config.autoencoder.encoder_path={folder / 'autoencoder.ckpt'}",
               "--config.autoencoder.encoder_prefix=encoder.", "--config.train.num_steps=1")
  assert out.returncode == 0, out.stderr[-3000:]
