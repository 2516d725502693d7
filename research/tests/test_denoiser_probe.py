"""The denoiser probe: its posterior mean against the closed form of a two-point prior, its
bookkeeping against oracle denoisers, and the CLI on a briefly trained DiT."""
import os
import subprocess
import sys

import numpy as np
import pytest

from research import denoiser_probe
from svg_jax.data import synthetic
from svg_jax.demo import configs as demo_configs
from svg_jax.train import trainer

RESEARCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("t", [0.05, 0.3, 0.8])
def test_posterior_mean_of_a_two_point_prior(t):
  """x1 = +a or -a with equal odds, x_t = t x1 + (1 - t) n:
  E[x1 | x_t] = a tanh(t a.x_t / (1 - t)^2)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((4, 3))
  for _ in range(5):
    x_t = t * (a if rng.random() < 0.5 else -a) + (1 - t) * rng.standard_normal(a.shape)
    expected = a * np.tanh(t * np.sum(a * x_t) / (1 - t) ** 2)
    got = denoiser_probe.posterior_mean(x_t, t, np.stack([a, -a]))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(denoiser_probe.posterior_mean(x_t, t, a[None]), a)
  with pytest.raises(ValueError, match="t must be in"):
    denoiser_probe.posterior_mean(x_t, 1.0, a[None])


def test_probe_scores_oracle_denoisers():
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((12, 2, 2, 3)).astype(np.float32)
  captions = ["a", "b", "c"] * 4
  rows = [0, 4, 5, 10]

  def knows_x1(x_t, t, r):  # v = (x1 - x_t) / (1 - t): x1_hat is the true latent
    return (latents[r] - x_t) / (1 - t[:, None, None, None])

  def is_posterior(x_t, t, r):
    post = np.stack([denoiser_probe.posterior_mean(x, float(tt), latents[
        [i for i, c in enumerate(captions) if c == captions[j]]]) for x, tt, j in zip(x_t, t, r)])
    return (post - x_t) / (1 - t[:, None, None, None])

  for row in denoiser_probe.probe(knows_x1, latents, captions, rows, [0.1, 0.6]):
    assert row["dit_vs_x1"] < 1e-10 and row["images_per_caption"] == 4
    assert row["dit_vs_posterior"] == pytest.approx(row["posterior_vs_x1"], rel=1e-5)
  for row in denoiser_probe.probe(is_posterior, latents, captions, rows, [0.1, 0.6]):
    assert row["dit_vs_posterior"] < 1e-10
    assert row["dit_vs_x1"] == pytest.approx(row["posterior_vs_x1"], rel=1e-5)
  far, near = denoiser_probe.probe(is_posterior, latents, captions, rows, [0.01, 0.9])
  assert far["posterior_vs_x1"] > 0.1 > 1e-3 > near["posterior_vs_x1"]


def test_probe_baselines_against_their_definitions():
  rng = np.random.default_rng(2)
  latents = rng.standard_normal((12, 2, 2, 3)).astype(np.float32)
  captions = ["a", "b", "c"] * 4
  rows = [0, 4, 5, 10]
  mean_of = {c: latents[[i for i, k in enumerate(captions) if k == c]].mean(0) for c in "abc"}
  expected_caption = np.mean([(mean_of[captions[r]] - latents[r]) ** 2 for r in rows])
  expected_global = np.mean([(latents.mean(0) - latents[r]) ** 2 for r in rows])

  def predicts_caption_mean(x_t, t, r):
    return (np.stack([mean_of[captions[j]] for j in r]) - x_t) / (1 - t[:, None, None, None])

  for row in denoiser_probe.probe(predicts_caption_mean, latents, captions, rows, [0.05, 0.5]):
    assert row["dit_vs_caption_mean"] < 1e-10
    assert row["dit_vs_x1"] == pytest.approx(expected_caption, rel=1e-5)
    assert row["caption_mean_vs_x1"] == pytest.approx(expected_caption, rel=1e-6)
    assert row["global_mean_vs_x1"] == pytest.approx(expected_global, rel=1e-6)


def test_cli_on_a_trained_dit(tmp_path):
  data = str(tmp_path / "records")
  synthetic.write_random_dataset(data, buckets=((4, 4),), num_records=32, latent_channels=8,
                                 text_dim=16, learnable=True, caption_len=(1, 3), vocab_size=5)
  c = demo_configs.dit()
  c.model.update(dict(in_channels=8, cap_feat_dim=16, dim=64, n_heads=4, n_kv_heads=2,
                      axes_dims=(4, 6, 6), n_layers=1, n_refiner_layers=1, multiple_of=32))
  c.data.path = data
  c.data.caption_len_buckets = (8,)
  c.data.max_caption_len = 8
  c.train.update(dict(global_batch_size=8, num_steps=3, checkpoint_every=3, log_every=3))
  trainer.train(c, str(tmp_path / "dit"))
  out = subprocess.run([sys.executable, os.path.join(RESEARCH, "probe_denoiser.py"),
                        f"--records={data}", f"--checkpoint={tmp_path / 'dit'}", "--num=6",
                        "--times=0.1,0.9"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith("6 records of 32")
  table = np.array([[float(v) for v in line.split()] for line in lines[2:]])
  assert table.shape == (2, 5) and np.all(np.isfinite(table)) and list(table[:, 0]) == [0.1, 0.9]
  # The ideal denoiser is nearly exact at t = 0.9 and far at t = 0.1 on these few, distinct latents.
  assert table[1, 2] < table[0, 2]
