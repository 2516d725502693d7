"""The caption-pathway measurement: its training times, its mean estimate against oracle velocity
fields, the true caption means against their definition, and the colours-category split on
rendered ground truth."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import caption_pathway
from svg_jax import flow
from svg_jax.data import records, synthetic
from svg_jax.demo import configs as demo_configs
from svg_jax.demo import shapes


def _trainer_times(config, n=4096):
  """Flow times drawn the way the DiT train step draws them from its config."""
  f = config.flow
  shift = flow.shift_factor_for_seq_len(64) if f.resolution_shift else None
  return np.asarray(flow.sample_timesteps(jax.random.PRNGKey(0), n, f.timestep_sampling,
                                          float(f.logit_mean), float(f.logit_std), shift))


def test_pure_noise_times_are_all_near_zero():
  c = demo_configs.dit()
  assert _trainer_times(c).max() > 0.5  # the default spreads over the whole flow
  caption_pathway.set_pure_noise_times(c)
  t = _trainer_times(c)
  assert 0 < t.min() and t.max() < 1e-3


class _FakeGenerator:
  """The parts of `generate.Generator` the mean estimate uses, with a velocity field set by the
  test: v(x, t, caption) = field(x, t, caption row of the features)."""

  def __init__(self, field, prompts):
    self.field = field
    self.rows = {p: i for i, p in enumerate(prompts)}
    self.params = {}
    self.model = self

  def latent_shape(self, resolution):
    return (2, 3, 4)

  def text_length(self, prompts):
    return 8

  def text_features(self, prompts, length):  # [cond; uncond] rows, as the Generator's
    feats = np.zeros((2 * len(prompts), length, 1), np.float32)
    feats[:len(prompts), 0, 0] = [self.rows[p] for p in prompts]
    feats[len(prompts):, 0, 0] = -1
    return feats, np.ones((2 * len(prompts), length), bool)

  def noise(self, seeds, shape):
    return np.stack([np.random.default_rng(s).standard_normal(shape) for s in seeds]
                    ).astype(np.float32)

  def apply(self, variables, x, t, feats, mask):
    assert len(feats) == len(x)  # conditional rows only (no CFG)
    return self.field(x, t, feats[:, 0, 0])


def test_mean_estimate_against_oracle_fields():
  prompts = [f"p{i}" for i in range(7)]
  target = np.random.default_rng(0).standard_normal((len(prompts), 2, 3, 4)).astype(np.float32)

  def knows_the_mean(x, t, row):  # v = m(caption) - x: every noise draw lands on m (t must be 0)
    return jnp.asarray(target)[row.astype(jnp.int32)] - x + 1e3 * t[:, None, None, None]

  gen = _FakeGenerator(knows_the_mean, prompts)
  got = caption_pathway.mean_estimates(gen, prompts, 64, draws=3, batch_size=3)  # 3 + 3 + 1
  np.testing.assert_allclose(got, target, atol=1e-5)

  def keeps_the_noise(x, t, row):  # x0 + v = x0: the estimate is the mean of distinct draws
    return 0 * x

  draws = 400
  gen = _FakeGenerator(keeps_the_noise, prompts)
  got = caption_pathway.mean_estimates(gen, prompts, 64, draws=draws, batch_size=4)
  assert np.std(got) == pytest.approx(1 / np.sqrt(draws), rel=0.15)
  with pytest.raises(ValueError, match="draws"):
    caption_pathway.mean_estimates(gen, prompts, 64, draws=0)


def test_caption_means_against_their_definition(tmp_path):
  data = str(tmp_path / "records")
  synthetic.write_random_dataset(data, buckets=((2, 2),), num_records=24, latent_channels=3,
                                 text_dim=4, caption_len=(1, 2), vocab_size=3)
  recs = [r for _, r in records.iter_records(data)]
  captions = sorted({r["caption"] for r in recs})
  assert len(captions) > 1 and len(captions) < len(recs)  # several records per caption
  wanted = captions[::-1]
  expected = np.stack([np.mean([r["latent"].astype(np.float64) for r in recs
                                if r["caption"] == c], axis=0) for c in wanted])
  np.testing.assert_allclose(caption_pathway.caption_means(data, wanted), expected, atol=1e-6)
  with pytest.raises(ValueError, match="no training record"):
    caption_pathway.caption_means(data, ["not a caption"])


def test_colour_and_shape_split_on_rendered_objects():
  items = [shapes.item_spec(0, "heldout", i, 64) for i in range(60)]
  items = [it for it in items if it["metadata"]["tag"] == "colors"][:4]
  assert len(items) == 4
  images = [shapes.render(it["objects"], 64) for it in items]
  assert caption_pathway.colour_and_shape(images, items) == {
      "colors_colour_right": 1.0, "colors_shape_right": 1.0}
  other = {"circle": "square", "square": "triangle", "triangle": "circle", "diamond": "circle"}
  wrong_shape = [shapes.render([{**o, "shape": other[o["shape"]]} for o in it["objects"]], 64)
                 for it in items]
  assert caption_pathway.colour_and_shape(wrong_shape, items) == {
      "colors_colour_right": 1.0, "colors_shape_right": 0.0}
  assert caption_pathway.colour_and_shape(images, [{"metadata": {"tag": "counting"}}] * 4) == {}
