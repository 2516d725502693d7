"""Chained training stages: `train.init_from` (a workdir's step, a weights file of
`train.init_from_format`, another `model.scan_layers`), a later stage's resume when its source
is gone, and what a resume says about the config it was given (tiny models, 8 CPU devices)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from svg_jax import checkpoint as ckpt_lib
from svg_jax import config as config_lib
from svg_jax import dit_checkpoint, parallel
from svg_jax.convert import decoder_io, dit_io
from svg_jax.convert import nextdit as keymap
from svg_jax.data import synthetic
from svg_jax.demo import decoder_data
from svg_jax.train import decoder_task, dit_task, loop, trainer

import saved_state
import tiny_trainer
from configs import decoder as decoder_configs

# Two joint layers, so a restacked layout has something to stack.
MODEL = dict(in_channels=8, cap_feat_dim=16, dim=64, n_heads=4, n_kv_heads=2, axes_dims=(4, 6, 6),
             n_layers=2, n_refiner_layers=1, multiple_of=32)


def _config(data_dir, **train):
  defaults = dict(global_batch_size=8, lr=5e-4, log_every=1, checkpoint_every=2)
  return tiny_trainer.config(data_dir, MODEL, **{**defaults, **train})


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _events(workdir, name):
  return [r for r in _records(workdir) if r.get("event") == name]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


def _messages(caplog, part):
  return [r.getMessage() for r in caplog.records if part in r.getMessage()]


def _equal(a, b) -> bool:
  a, b = jax.device_get(a), jax.device_get(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "ds"
  synthetic.write_random_dataset(path, buckets=((4, 4),), num_records=64, latent_channels=8,
                                 text_dim=16, learnable=True, caption_len=(1, 8), seed=0)
  return str(path)


@pytest.fixture(scope="module")
def stage1(data_dir, tmp_path_factory):
  """A first stage of 4 steps (unscanned layers, the tiny config's) with checkpoints 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("stage1"))
  trainer.train(_config(data_dir, num_steps=4), workdir)
  assert ckpt_lib.finished_steps(ckpt_lib.checkpoint_dir(workdir)) == [2, 4]
  return workdir


def test_init_from_formats_are_the_weight_readers_formats():
  assert loop.INIT_FORMATS == dit_io.FORMATS == decoder_io.FORMATS


def test_a_later_stage_resumes_when_its_init_from_source_is_gone(data_dir, stage1, tmp_path,
                                                                  caplog):
  """Stage 2 starts from stage 1's newest params (one line: what was loaded and what starts
  fresh; the event names the step); stage 1's workdir is then deleted: stage 2 still resumes
  (init_from is not read, one line says so), logs the fields changed on the command line, and a
  rerun that has nothing left to train says so. A fresh workdir still needs the source."""
  caplog.set_level("INFO")
  source, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
  shutil.copytree(stage1, source)
  config = _config(data_dir, num_steps=2, init_from=source)
  trainer.train(config, stage2)
  assert _events(stage2, "init_from") == [
      {"step": 0, "event": "init_from", "num_steps": 2, "source": source, "source_step": 4}]
  assert _messages(caplog, "train.init_from: loaded") == [
      f"train.init_from: loaded the params of step 4 of {source}; the optimizer state starts "
      "fresh, the EMA starts as a copy of these params"]

  shutil.rmtree(source)
  with pytest.raises(loop.ConfigError, match=f"^train.init_from '{source}' does not exist$"):
    loop.validate_config(config, trainer.get("dit"), workdir=str(tmp_path / "fresh"))
  caplog.clear()
  config.train.update(dict(num_steps=4, lr=2e-4))
  summary = trainer.train(config, stage2)
  assert (summary["resumed_from"], summary["step"]) == (2, 4)
  assert _messages(caplog, "ignored") == [
      f"train.init_from {source} ignored: resuming {stage2} at step 2"]
  assert _messages(caplog, "config field") == [
      "resuming step 2 with 2 config fields changed since it was saved: train.lr 0.0005 -> "
      "0.0002; train.num_steps 2 -> 4"]
  assert _events(stage2, "resume") == [
      {"step": 2, "event": "resume", "num_steps": 4, "init_from_ignored": source}]
  assert sorted(_losses(stage2)) == [1, 2, 3, 4]

  caplog.clear()
  rows = len(_records(stage2))
  summary = trainer.train(config, stage2)
  assert (summary["resumed_from"], summary["step"]) == (4, 4)
  assert _messages(caplog, "nothing to train") == [
      "the run is already at step 4 >= train.num_steps 4: nothing to train (raise "
      "train.num_steps to go on)"]
  assert not _messages(caplog, "config field")  # the same config: no line
  assert [r for r in _records(stage2)[rows:] if "loss" in r] == []


def test_a_run_starts_from_official_weights_and_from_an_older_step(data_dir, stage1, tmp_path,
                                                                    monkeypatch):
  """Stage 1's step-2 params exported as an official `consolidated.00-of-01.pth` start a run
  (train.init_from_format = "official"): the params its state starts from are the file's, bit
  for bit, and its first step is that of a run started from stage 1's workdir at
  train.init_from_step = 2 (whose start is step 2's params, not the newest step 4's)."""
  cfg = config_lib.nextdit_config(_config(data_dir))
  step2 = jax.device_get(dit_checkpoint.load_params(stage1, cfg, ema=False, step=2))
  step4 = jax.device_get(dit_checkpoint.load_params(stage1, cfg, ema=False, step=4))
  assert not _equal(step2, step4)
  path = str(tmp_path / "consolidated.00-of-01.pth")
  dit_io.save_dit(step2, path, "official", cfg)

  started = []
  real = dit_task.DiTSetup.state_from_params

  def state_from_params(self, params):
    started.append(jax.device_get(params))
    return real(self, params)

  monkeypatch.setattr(dit_task.DiTSetup, "state_from_params", state_from_params)
  from_file, from_run = str(tmp_path / "from_file"), str(tmp_path / "from_run")
  trainer.train(_config(data_dir, num_steps=1, init_from=path, init_from_format="official"),
                from_file)
  trainer.train(_config(data_dir, num_steps=1, init_from=stage1, init_from_step=2), from_run)
  assert len(started) == 2
  assert _equal(started[0], dit_io.load_dit(path, "official", cfg)) and _equal(started[0], step2)
  assert _equal(started[1], step2)
  assert _events(from_file, "init_from") == [
      {"step": 0, "event": "init_from", "num_steps": 1, "source": path, "format": "official"}]
  assert _events(from_run, "init_from") == [
      {"step": 0, "event": "init_from", "num_steps": 1, "source": stage1, "source_step": 2}]
  assert _losses(from_file) == _losses(from_run) and len(_losses(from_file)) == 1

  # A step the workdir does not have, and the file for another model: one line each.
  with pytest.raises(loop.ConfigError, match=r"^train.init_from: no checkpoint of step 3 in "
                     r".*checkpoints \(steps: \[2, 4\]\)$"):
    trainer.train(_config(data_dir, init_from=stage1, init_from_step=3), str(tmp_path / "a"))
  wrong = _config(data_dir, init_from=path, init_from_format="official")
  wrong.model.update(dict(dim=96, n_heads=6, axes_dims=(4, 4, 8)))
  with pytest.raises(loop.ConfigError) as info:
    trainer.train(wrong, str(tmp_path / "b"))
  assert str(info.value).startswith(f"train.init_from {path}: ")
  assert "does not match the model config" in str(info.value) and "\n" not in str(info.value)


def test_a_workdir_of_the_other_layer_layout_is_restacked(data_dir, stage1):
  """Stage 1 has one params subtree per layer (`model.scan_layers = False`); a run with stacked
  layers starts from the same values, stacked."""
  config = _config(data_dir, init_from=stage1)
  assert not config.model.scan_layers
  config.model.scan_layers = True
  mesh = parallel.make_mesh(dict(config.mesh))
  setup = dit_task.DiTSetup(config, mesh)
  params, step = setup.load_init_params(stage1, "", None)
  assert step == 4 and "layers_0" not in params
  state, _ = saved_state.restore_state(_config(data_dir), stage1, mesh)
  got, want = keymap.unscanned_flat(jax.device_get(params)), keymap.unscanned_flat(
      jax.device_get(state.params))
  assert sorted(got) == sorted(want)
  assert all(np.array_equal(got[k], want[k]) for k in want)
  assert all(a.sharding == b.sharding for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(setup.abstract_state.params)))


def test_init_from_problems_are_one_line_before_anything_runs(data_dir, stage1, tmp_path):
  weights = tmp_path / "weights.pth"
  weights.write_bytes(b"not read")
  cases = [
      (dict(init_from=str(weights)), rf"train.init_from '{weights}' is a file, not a training "
       r"workdir: set train.init_from_format to its format \(one of \('flax', 'official', "
       r"'safetensors', 'diffusers'\)\)"),
      (dict(init_from=str(weights), init_from_format="pth"),
       r"train.init_from_format 'pth' is not one of \('', 'flax', 'official', 'safetensors', "
       r"'diffusers'\)"),
      (dict(init_from=str(weights), init_from_format="official", init_from_step=2),
       r"train.init_from_step 2 picks a checkpoint of a training workdir; official weights "
       r"have no steps \(leave it -1\)"),
      (dict(init_from=stage1, init_from_step=-2),
       r"train.init_from_step must be -1 \(the newest\) or a step >= 0, got -2"),
      (dict(init_from=stage1, init_from_format="flax"),
       rf"train.init_from '{stage1}' is a folder; the flax format is one file \(a training "
       r"workdir is read with train.init_from_format \"\"\)"),
  ]
  for train, message in cases:
    with pytest.raises(loop.ConfigError, match=message) as info:
      loop.validate_config(_config(data_dir, **train), trainer.get("dit"),
                           workdir=str(tmp_path / "fresh"))
    assert "\n" not in str(info.value)
  # A workdir that resumes never looks at the source.
  loop.validate_config(_config(data_dir, init_from=str(tmp_path / "gone")), trainer.get("dit"),
                       workdir=stage1)


def test_config_changes_name_each_field_once_with_both_values():
  saved = {"train": {"lr": 1e-4, "num_steps": 10, "old": 1},
           "data": {"caption_len_buckets": [64, 128]}, "task": "dit"}
  now = {"train": {"lr": 2e-4, "num_steps": 10, "init_from": "x" * 60},
         "data": {"caption_len_buckets": [64, 256]}, "task": "dit"}
  assert loop.config_changes(saved, now) == [
      "data.caption_len_buckets (64, 128) -> (64, 256)",
      f"train.init_from absent -> '{'x' * 36}...",
      "train.lr 0.0001 -> 0.0002",
      "train.old 1 -> absent"]
  assert loop.config_changes(saved, saved) == []


DECODER = {"autoencoder.encoder": dict(dim=32, depth=2, num_heads=2, ffn_hidden=64,
                                       num_register_tokens=1, scan_layers=False),
           "autoencoder.decoder": dict(z_channels=32, ch=8, ch_mult=(1, 1, 1, 2),
                                       num_res_blocks=0, norm_groups=4),
           "discriminator": dict(ndf=8, n_layers=2),
           "data": dict(resolution=32, num_eval_images=0),
           "train": dict(global_batch_size=8, log_every=1)}


def test_a_decoder_starts_from_a_weights_file(tmp_path):
  """The decoder task reads a decoder weights file (here safetensors, official key names) into
  its state's shards, the values of the file."""
  config = decoder_configs.get_config("tiny")
  for section, values in DECODER.items():
    config[section].update(values)
  decoder_data.prepare_for(config, str(tmp_path / "demo"), num_train=8, num_heldout=2, seed=0)
  setup = decoder_task.TASK.make_setup(config, parallel.make_mesh(dict(config.mesh)))
  rng = np.random.default_rng(0)
  weights = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                         setup.abstract_state.params)
  path = str(tmp_path / "decoder.safetensors")
  decoder_io.save_decoder_weights(weights, path, "safetensors", setup.decoder_cfg)
  params, step = setup.load_init_params(path, "safetensors", None)
  assert step is None and _equal(params, weights)
  assert all(a.sharding == b.sharding for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(setup.abstract_state.params)))
