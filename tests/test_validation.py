"""In-training validation of the DiT task: sample grids at the configured steps (read back with the
`tensorboard` package's own event reader), the held-out loss per noise level against a direct
computation, and a resumed run that logs what an uninterrupted one logs, bit for bit.

The direct computation is written here from the definition (docs/reference.md §4.1: x_t =
t x1 + (1 - t) x0, target x1 - x0, per-sample mean squared error), one record at a time with its
caption at its own length, in float64 numpy; only the DiT forward is the package's model.
Tiny random DiT, decoder and statistics; the offline demo text encoder; 8 fake CPU devices.
"""
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

import saved_state
import validation_files
from lowerings import lowered_programs
from svg_jax import parallel
from svg_jax.data import records
from svg_jax.demo import configs as demo_configs
from svg_jax.demo import text_encoder as demo
from svg_jax.models.nextdit import NextDiT
from svg_jax.train import dit_task, trainer, validation

SPEC = demo.DemoSpec(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=16, intermediate_size=64)
MODEL = dict(in_channels=validation_files.CHANNELS, cap_feat_dim=SPEC.hidden_size, dim=64,
             n_heads=4, n_kv_heads=2, axes_dims=(4, 6, 6), n_layers=1, n_refiner_layers=1,
             multiple_of=32)
PROMPTS = validation_files.PROMPTS
RES = validation_files.RES  # pixels: a 4x4 latent through the 16x decoder
TIMES = (0.05, 0.2, 0.5, 0.8)
SEED = 7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return validation_files.write(tmp_path_factory.mktemp("val"), SPEC)


def _config(files, train, heldout, num_steps=6):
  c = demo_configs.dit()
  c.model.update(MODEL)
  c.autoencoder.decoder.update(validation_files.DECODER)
  c.autoencoder.decoder_path, c.autoencoder.stats_path = files["decoder"], files["stats"]
  c.data.path, c.data.eval_path = train, heldout
  c.data.caption_len_buckets, c.data.max_caption_len = (16,), 16
  c.train.update(dict(global_batch_size=8, num_steps=num_steps, log_every=1,
                      checkpoint_every=1000, sample_every=2, eval_every=3, lr=2e-3,
                      warmup_steps=2))
  c.validation.update(dict(prompts=tuple(PROMPTS), text_features=files.get("features", ""),
                           system_prompt="empty", resolution=RES, steps=3, shift=1.0,
                           loss_records=10, loss_batch_size=4, loss_timesteps=TIMES,
                           loss_seed=SEED))
  return c


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
  """An uninterrupted 6-step run (prompt features from the .npz file) and one stopped after step
  4 and resumed to 6 (prompts encoded by the trainer from text.encoder_dir)."""
  whole = str(tmp_path_factory.mktemp("whole"))
  trainer.train(_config(files, files["train"], files["heldout"]), whole)
  resumed = str(tmp_path_factory.mktemp("resumed"))
  c = _config(files, files["train"], files["heldout"], num_steps=4)
  c.validation.text_features, c.text.encoder_dir = "", files["text"]
  trainer.train(c, resumed)
  c.train.num_steps = 6
  summary = trainer.train(c, resumed)
  assert summary["resumed_from"] == 4
  return whole, resumed


@pytest.mark.slow
def test_grids_at_the_configured_steps_in_png_and_tensorboard(runs):
  whole, _ = runs
  grids = validation_files.grids(whole)
  assert sorted(grids) == [2, 4, 6]
  for grid in grids.values():
    # 3 prompts in 2 columns of RES x RES images; the fourth cell is empty (black).
    assert grid.shape == (2 * RES, 2 * RES, 3) and grid.dtype == np.uint8
    assert not grid[RES:, RES:].any() and grid[:RES].std() > 0
  assert not np.array_equal(grids[2], grids[6])  # the EMA params moved
  acc = event_accumulator.EventAccumulator(os.path.join(whole, "tensorboard"),
                                           size_guidance={event_accumulator.IMAGES: 0,
                                                          event_accumulator.SCALARS: 0})
  acc.Reload()
  images = acc.Images(validation.IMAGE_TAG)
  assert [e.step for e in images] == [2, 4, 6]
  for e in images:
    assert (e.width, e.height) == (2 * RES, 2 * RES)
    decoded = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, grids[e.step])
  for t in TIMES:
    assert [e.step for e in acc.Scalars(f"eval/{validation.loss_key(t)}")] == [3, 6]


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run_bit_for_bit(runs):
  whole, resumed = runs
  a, b = _records(whole), _records(resumed)
  loss = lambda recs: {r["step"]: r["loss"] for r in recs if "loss" in r}  # noqa: E731
  assert sorted(loss(a)) == list(range(1, 7)) and loss(a) == loss(b)
  evals = lambda recs: {r["step"]: {k: v for k, v in r.items() if k.startswith("loss_")}  # noqa
                        | {"records": r["heldout_records"]}
                        for r in recs if r.get("event") == "eval" and "loss_mean" in r}
  ea, eb = evals(a), evals(b)
  assert sorted(ea) == [3, 6] and sorted(eb) == [3, 4, 6]  # the first leg also ends at 4
  assert ea[3] == eb[3] and ea[6] == eb[6]
  # Grids of both runs, the .npz path against the trainer's own encoding, match exactly.
  ga, gb = validation_files.grids(whole), validation_files.grids(resumed)
  assert sorted(gb) == [2, 4, 6]
  for step in ga:
    np.testing.assert_array_equal(ga[step], gb[step])


def _direct_heldout_losses(config, params, eval_path, n, seed, times):
  """Mean over the first n records of the per-record velocity MSE at each t, one record at a
  time, noise from numpy's PCG64 seeded with (seed, record index)."""
  model = NextDiT(dit_task.config_lib.nextdit_config(config))
  apply = jax.jit(lambda p, x, t, c, m: model.apply({"params": p}, x, t, c, m))
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  items = [rec for _, rec in records.iter_records(eval_path)][:n]
  sums = np.zeros(len(times))
  for i, rec in enumerate(items):
    x1 = rec["latent"].astype(np.float64)
    x0 = np.random.default_rng([seed, i]).standard_normal(x1.shape, np.float32).astype(np.float64)
    length = int(rec["text_len"])
    cap = rec["text_features"][:length].astype(np.float32)[None]
    for j, t in enumerate(times):
      xt = t * x1 + (1 - t) * x0
      with parallel.mesh_context(mesh, config.axis_rules):
        v = np.asarray(apply(params, xt[None].astype(np.float32), np.full((1,), t, np.float32),
                             cap, np.ones((1, length), bool)), np.float64)[0]
      sums[j] += np.mean((v - (x1 - x0)) ** 2)
  return sums / len(items)


@pytest.mark.slow
def test_heldout_loss_equals_a_direct_computation(runs, files):
  whole, _ = runs
  config = _config(files, files["train"], files["heldout"])
  mesh = parallel.make_mesh(dict(config.mesh))
  state, step = saved_state.restore_state(config, whole, mesh)
  assert step == 6
  params = jax.device_get(state.params)  # validation.loss_on_ema is False
  want = _direct_heldout_losses(config, params, files["heldout"], 10, SEED, TIMES)
  got = [r for r in _records(whole) if r.get("event") == "eval" and r["step"] == 6
         and "loss_mean" in r][0]
  assert got["heldout_records"] == 10
  for t, w in zip(TIMES, want):
    assert got[validation.loss_key(t)] == pytest.approx(w, rel=2e-5)
  assert got["loss_mean"] == pytest.approx(np.mean(want), rel=2e-5)
  assert np.min(np.abs(np.diff(want))) > 1e-4 * np.max(want)  # t changes the loss


def test_without_a_decoder_one_line_and_no_sampling(files, tmp_path, monkeypatch):
  config = _config(files, files["train"], "")
  config.autoencoder.decoder_path, config.train.eval_every = "", 0
  lines = []
  monkeypatch.setattr(validation.logging, "info", lambda msg, *a: lines.append(msg % a))
  mesh = parallel.make_mesh(dict(config.mesh))
  model_cfg = dit_task.config_lib.nextdit_config(config)
  val = validation.Validation(config, mesh, NextDiT(model_cfg), model_cfg, None, str(tmp_path))
  assert lines == ["validation: no autoencoder.decoder_path, so no sample grids (the prompts are "
                   "not sampled)"]
  assert not any(val.due(s, s == 6) for s in range(1, 7))


@pytest.mark.slow
def test_an_evaluation_compiled_ahead_lowers_no_program(files, tmp_path):
  """`compile_eval` (the loop calls it with the first step's compile, which the stall watch does
  not time) compiles the held-out loss of both latent sizes, the sampler and the decoder, so the
  evaluation after it lowers none of them: jit finds what was compiled ahead."""
  config = _config(files, files["train"], files["heldout"])
  mesh = parallel.make_mesh(dict(config.mesh))
  setup = dit_task.TASK.make_setup(config, mesh)
  setup.logger_class(str(tmp_path), num_steps=6, num_devices=jax.device_count(), chip="cpu",
                     is_main=True)
  with parallel.mesh_context(mesh, setup.rules):
    state = setup.init_state(0)
    with lowered_programs() as ahead:
      setup.compile_eval(state)
    assert setup.eval_due(6, True)
    with lowered_programs() as during:
      result = setup.evaluate(state, 6)
  assert "loss_mean" in result and "samples" in result
  names = ("trajectory", "_per_sample", "decode_latents")
  assert [n for n in ahead if any(k in n for k in names)] and not [
      n for n in during if any(k in n for k in names)], (ahead, during)


@pytest.mark.parametrize("change, message", [
    (dict(sample_every=2, prompts=()), "needs validation.prompts or validation.prompts_file"),
    (dict(sample_every=2, text_features=""), "needs the prompts' text features"),
    (dict(eval_every=3, eval_path=""), "train.eval_every > 0 needs data.eval_path"),
    (dict(seeds=(1, 2)), "validation.seeds has 2 seeds for 3 prompts"),
    (dict(loss_timesteps=(0.5, 1.5)), "validation.loss_timesteps must be times in [0, 1]"),
    # Found before training, not at the first grid after it (nothing saved by then).
    (dict(grid_cols=-3), "validation.grid_cols must be >= 0"),
    (dict(batch_size=-2), "validation.batch_size must be >= 0"),
    (dict(prompts=("x", "y", "z")), "holds features of other prompts than validation.prompts"),
])
def test_validation_config_problems_are_named(files, change, message):
  config = _config(files, files["train"], files["heldout"])
  for key, value in change.items():
    section = (config.train if key in config.train else config.data if key in config.data
               else config.validation)
    section[key] = value
  problems = dit_task.config_problems(config, 1)
  assert any(message in p for p in problems), problems
