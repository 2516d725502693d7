"""Generation: the jitted guided trajectory vs a plain step loop; seeds, sharding, loading, CLIs.

The reference trajectories here are written from the spec (docs/reference.md §1.6, §4.3-4.4),
not through svg_jax.sampling: a Python loop over float64 grids that calls the DiT once for the
conditional and once for the unconditional caption (each padded only to its own length, not the
Generator's shared length), applies renorm / standard CFG in numpy and takes DPM-Solver++ 2M or
Euler steps. Random tiny DiT, decoder and statistics; the offline demo text encoder (random Gemma-2
architecture, locally trained tokenizer); prompts from the real benchmark files.
"""
import io
import json
import os
import subprocess
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import script_runs
from svg_jax import assets
from svg_jax import autoencoder as ae_lib
from svg_jax import config as config_lib
from svg_jax import generate as gen
from svg_jax import latent_stats as ls
from svg_jax import parallel
from svg_jax import sample_folder, text
from svg_jax.convert import decoder as dec_conv
from svg_jax.convert.dit_io import save_dit
from svg_jax.convert.safetensors_io import save_safetensors
from svg_jax.demo import text_encoder as demo
from svg_jax.eval import benchmarks
from svg_jax.input_errors import InputError
from svg_jax.models.decoder import Decoder, DecoderConfig
from svg_jax.models.nextdit import NextDiT, NextDiTConfig
from svg_jax import checkpoint as ckpt_lib
from svg_jax import dit_checkpoint
from svg_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENEVAL = [json.loads(line) for line in open(assets.GENEVAL_PROMPTS)]
DPG = [json.loads(line) for line in open(assets.DPG_PROMPTS)]
SPEC = demo.DemoSpec(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=16, intermediate_size=64)
DIT = NextDiTConfig(in_channels=8, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
                    n_kv_heads=1, multiple_of=16, cap_feat_dim=SPEC.hidden_size,
                    axes_dims=(4, 6, 6), axes_lens=(600, 64, 64), scan_layers=False)
DEC = DecoderConfig(z_channels=8, ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, norm_groups=4)
RES = (32, 48)  # (height, width) pixels -> a 2x3 latent
TOL = 1e-5  # relative to the largest latent value; measured 3.5e-7 (DPM), 6.6e-7 (Euler)


def _random_dit_params(seed):
  """Random values for every leaf (the final layer is zero-initialized, which would give v = 0)."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: NextDiT(DIT).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, DIT.in_channels)), jnp.zeros((1,)),
      jnp.zeros((1, 8, DIT.cap_feat_dim)), jnp.ones((1, 8), bool))["params"]))
  rng = np.random.default_rng(seed)

  def draw(x):
    if len(x.shape) == 1:  # norms and biases
      return (1.0 + rng.normal(0, 0.3, x.shape)).astype(np.float32)
    return rng.normal(0, 1.0 / np.sqrt(x.shape[0]), x.shape).astype(np.float32)

  return jax.tree.map(draw, shapes)


def _decoder_fields():
  return dict(z_channels=DEC.z_channels, ch=DEC.ch, ch_mult=DEC.ch_mult,
              num_res_blocks=DEC.num_res_blocks, norm_groups=DEC.norm_groups)


def _write_config(path, files):
  model = {k: getattr(DIT, k) for k in DIT.__dataclass_fields__}
  with open(path, "w") as f:
    f.write("from svg_jax import config as base\n\n\n"
            "def get_config():\n"
            "  c = base.dit_task_config()\n"
            f"  c.model.update({model!r})\n"
            f"  c.autoencoder.decoder.update({_decoder_fields()!r})\n"
            f"  c.autoencoder.decoder_path = {files['decoder']!r}\n"
            f"  c.autoencoder.stats_path = {files['stats']!r}\n"
            "  return c\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  captions = [it["prompt"] for it in GENEVAL[:40]] + [it["prompt"] for it in DPG[:4]]
  enc = demo.ensure_demo_text_encoder(str(root / "text"), captions, seed=0, spec=SPEC)
  dec_params = jax.jit(Decoder(DEC).init)(jax.random.PRNGKey(1),
                                          jnp.zeros((1, 2, 2, DEC.z_channels)))
  dec_path = str(root / "decoder.safetensors")
  save_safetensors(dec_path, dec_conv.params_to_official(dec_params["params"], DEC))
  rng = np.random.default_rng(2)
  stats_path = str(root / "stats.pt")
  ls.save_latent_stats(stats_path, rng.normal(0, 0.5, DEC.z_channels),
                       rng.uniform(0.5, 2.0, DEC.z_channels))
  params = _random_dit_params(3)
  weights = str(root / "dit.msgpack")
  save_dit(params, weights, "flax", DIT)
  out = dict(text=enc, decoder=dec_path, stats=stats_path, weights=weights, params=params,
             config=str(root / "cfg.py"))
  _write_config(out["config"], out)
  return out


def _config(files):
  c = config_lib.dit_task_config()
  c.model.update({k: getattr(DIT, k) for k in DIT.__dataclass_fields__})
  c.autoencoder.decoder.update(_decoder_fields())
  c.autoencoder.decoder_path = files["decoder"]
  c.autoencoder.stats_path = files["stats"]
  return c


@pytest.fixture(scope="module")
def generator(files):
  return gen.Generator.from_config(_config(files), text_encoder=files["text"],
                                   weights=files["weights"], weights_format="flax")


# ----------------------------------------------------------------------------- reference loop


def _spec_trajectory(generator, prompts, seeds, solver, steps, shift, scale, mode):
  """Plain Python loop: model(cond) and model(uncond) per step, CFG in numpy, float64 updates."""
  model = NextDiT(DIT)
  apply = jax.jit(lambda p, x, t, c, m: model.apply({"params": p}, x, t, c, m))
  enc = generator.text_encoder
  cond, cond_len = enc(prompts)  # padded to this batch's own longest (multiple of 8)
  unc, unc_len = enc([""])  # "" -> <bos> only, padded to 8
  cond_mask = np.arange(cond.shape[1])[None] < np.asarray(cond_len)[:, None]
  unc_mask = np.arange(unc.shape[1])[None] < np.asarray(unc_len)[:, None]
  b = len(prompts)
  unc, unc_mask = np.repeat(np.asarray(unc), b, 0), np.repeat(unc_mask, b, 0)
  h, w = RES[0] // 16, RES[1] // 16
  x = np.stack([np.asarray(jax.random.normal(jax.random.key(s), (h, w, DIT.in_channels)))
                for s in seeds]).astype(np.float64)

  def velocity(x, t):
    xs, ts = jnp.asarray(x, jnp.float32), jnp.full((b,), t, jnp.float32)
    vc = np.asarray(apply(generator.params, xs, ts, cond, cond_mask), np.float64)
    if mode == "none":  # unguided: the conditional velocity alone
      return vc
    vu = np.asarray(apply(generator.params, xs, ts, unc, unc_mask), np.float64)
    v = vu + scale * (vc - vu)
    if mode == "renorm":  # clip each sample's guided velocity to the conditional one's norm
      nc = np.sqrt((vc ** 2).sum(axis=(1, 2, 3), keepdims=True))
      nv = np.sqrt((v ** 2).sum(axis=(1, 2, 3), keepdims=True))
      v = v * np.minimum(1.0, nc / (nv + 1e-12))
    return v

  if solver == "euler":
    t = np.linspace(0, 1, steps)
    t = t / (t + shift - shift * t)
    for i in range(steps - 1):
      x = x + (t[i + 1] - t[i]) * velocity(x, t[i])
    return x
  # DPM-Solver++ 2M, time_uniform_flow grid, 1st-order first and last steps.
  sig = 1 - np.linspace(1, 1e-3, steps + 1)
  sig = (shift * sig / (1 + (shift - 1) * sig))[::-1]
  lam = lambda s: np.log(1 - s) - np.log(s) if s > 0 else np.inf  # noqa: E731
  prev = None
  for i in range(steps):
    s, s_next = sig[i], sig[i + 1]
    x0 = x + s * velocity(x, 1 - s)  # data prediction (x - s eps) / (1 - s)
    if s_next == 0:
      x = x0
    else:
      h = lam(s_next) - lam(s)
      d = x0
      if prev is not None and i < steps - 1:
        r = (lam(s) - lam(sig[i - 1])) / h
        d = x0 + (x0 - prev) / (2 * r)
      x = (s_next / s) * x - (1 - s_next) * np.expm1(-h) * d
    prev = x0
  return x


@pytest.mark.parametrize("solver, steps, mode, scale", [("dpm", 4, "renorm", 4.0),
                                                        ("euler", 3, "standard", 2.5),
                                                        ("dpm", 3, "none", 4.0)])
def test_jitted_generation_equals_the_spec_loop(generator, solver, steps, mode, scale):
  prompts = [GENEVAL[i]["prompt"] for i in (0, 130, 300)]
  seeds = [5, 42, 1234]
  settings = gen.SamplerSettings(steps=steps, cfg_scale=scale, cfg_mode=mode, shift=3.0,
                                 solver=solver)
  # batch 2 over 3 prompts: the last batch is padded (and its padding dropped).
  got = generator.latents(prompts, seeds, RES, settings, batch_size=2)
  want = _spec_trajectory(generator, prompts, seeds, solver, steps, 3.0, scale, mode)
  assert got.shape == (3, 2, 3, DIT.in_channels) and got.dtype == np.float32
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < TOL, err
  # The trajectory is not trivial: guidance (or, unguided, its absence) and the steps matter.
  other_mode, other_scale = ("renorm", 4.0) if mode == "none" else (mode, 1.0)
  other = _spec_trajectory(generator, prompts, seeds, solver, steps, 3.0, other_scale, other_mode)
  assert np.max(np.abs(want - other)) > 100 * TOL * np.max(np.abs(want))
  images = generator.generate(prompts, seeds, RES, settings, batch_size=2)
  assert images.shape == (3, 32, 48, 3) and images.dtype == np.uint8
  dec = ae_lib.to_uint8(generator.autoencoder.decode(want.astype(np.float32)), truncate=True)
  assert np.max(np.abs(images.astype(int) - dec)) <= 1


def test_noise_of_each_seed_is_jax_normal_of_its_key(generator):
  """Row b of `Generator.noise` is jax.random.normal(jax.random.key(seeds[b])) bit for bit: our
  own convention (the official sampler draws torch noise, so no seed reproduces its images)."""
  seeds = [42, 43, 73]
  noise = generator.noise(seeds, (2, 3, 8))
  for row, s in zip(noise, seeds):
    np.testing.assert_array_equal(row, np.asarray(jax.random.normal(jax.random.key(s), (2, 3, 8))))


def test_batch_sharded_over_a_mesh_equals_one_device(files, generator):
  mesh = parallel.make_mesh(dict(data=2, fsdp=1, tensor=1), jax.devices()[:2])
  sharded = gen.Generator(generator.cfg, files["params"], generator.text_encoder,
                          ae_lib.SVGAutoencoder.from_config(_config(files), encoder=False,
                                                            mesh=mesh), mesh=mesh)
  prompts = [GENEVAL[i]["prompt"] for i in (1, 2, 3)]
  settings = gen.SamplerSettings(steps=3)
  a = sharded.latents(prompts, [1, 2, 3], RES, settings, batch_size=1)  # rounded up to 2
  b = generator.latents(prompts, [1, 2, 3], RES, settings, batch_size=3)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b)))


def test_bad_settings_are_clear_errors(generator):
  with pytest.raises(ValueError, match="unknown solver 'rk4'"):
    generator.generate(["a cat"], [0], RES, gen.SamplerSettings(solver="rk4"))
  with pytest.raises(ValueError, match="unknown cfg mode"):
    gen.SamplerSettings(cfg_mode="x").validate()
  with pytest.raises(ValueError, match="width 40 .*multiple of 16"):
    gen.parse_resolution("40x32")
  with pytest.raises(ValueError, match="not 'WIDTHxHEIGHT'"):
    gen.parse_resolution("big")
  assert gen.parse_resolution("768x1344") == (1344, 768)
  with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
    generator.generate(["a", "b"], [0], RES)


def test_make_grid():
  imgs = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
  grid = gen.make_grid(imgs, 2)
  assert grid.shape == (6, 6, 3)
  np.testing.assert_array_equal(grid[2:4, 3:6], imgs[3])
  assert not grid[4:6, 3:6].any()


def test_image_batches_come_one_by_one_and_equal_the_whole_list(generator, monkeypatch):
  """Each batch is sampled and decoded before the next is sampled, and the images are the bytes
  of the whole list's latents decoded at once (`generate`'s output before it went by batches)."""
  prompts = [GENEVAL[i]["prompt"] for i in (0, 7, 130, 300, 301)]
  seeds = [3, 4, 5, 6, 7]
  settings = gen.SamplerSettings(steps=2)
  whole = generator.decode(generator.latents(prompts, seeds, RES, settings, batch_size=2), 2)
  sampled, reported = [], []
  sample = generator.latents_from_features
  monkeypatch.setattr(generator, "latents_from_features",
                      lambda *a, **k: sampled.append(1) or sample(*a, **k))
  batches = generator.image_batches(prompts, seeds, RES, settings, batch_size=2,
                                    progress=lambda done, total: reported.append((done, total)))
  got = []
  for indices, images in batches:
    assert len(sampled) == len(got) + 1  # this batch sampled, the next not yet
    assert images.dtype == np.uint8 and images.shape == (len(indices), 32, 48, 3)
    got.append((indices, images))
  assert [list(i) for i, _ in got] == [[0, 1], [2, 3], [4]]
  assert reported == [(2, 5), (4, 5), (5, 5)]
  np.testing.assert_array_equal(np.concatenate([im for _, im in got]), whole)
  np.testing.assert_array_equal(generator.generate(prompts, seeds, RES, settings, batch_size=2),
                                whole)
  # Bad arguments fail at the call, not at the first batch.
  with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
    generator.image_batches(["a", "b"], [0], RES)


def test_token_counts_are_before_the_cut(generator):
  enc = generator.text_encoder
  short, long = GENEVAL[0]["prompt"], "a photo of a cat " * 100
  counts = enc.token_counts(["", short, long])
  _, mask = enc.tokenize(["", short, long])
  assert counts[0] == 1 and counts[1] == mask[1].sum() < enc.max_length  # "" is <bos> alone
  assert mask[2].sum() == enc.max_length < counts[2]


# ----------------------------------------------------------------------------- checkpoints


def test_loads_ema_and_raw_params_from_a_training_checkpoint(files, generator, tmp_path):
  params = jax.tree.map(jnp.asarray, files["params"])
  tx = optax.adam(1e-3)
  state = state_lib.create_state(params, tx).replace(
      ema_params=jax.tree.map(lambda p: p * 0.5 + 0.1, params), step=jnp.asarray(7, jnp.int32))
  config = _config(files)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  it = iter(grain.MapDataset.range(4).to_iter_dataset())
  ckpt.save(7, state, it, ckpt_lib.config_to_json(config))
  ckpt.close()
  assert dit_checkpoint.saved_model_config(str(tmp_path)) == DIT
  ema = dit_checkpoint.load_params(str(tmp_path), DIT, ema=True)
  raw = dit_checkpoint.load_params(str(tmp_path), DIT, ema=False, step=7)
  for got, want in ((ema, state.ema_params), (raw, state.params)):
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
                 got, want)
  with pytest.raises(FileNotFoundError, match="step 8"):
    dit_checkpoint.load_params(str(tmp_path), DIT, step=8)
  g = gen.Generator.from_config(config, text_encoder=files["text"], checkpoint=str(tmp_path))
  assert g.cfg == DIT and g.checkpoint_step == 7  # the newest step, as loaded (metadata)
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
               g.params, state.ema_params)


def _hf_hidden_state(folder, text, layer):
  """transformers' Gemma-2 hidden state `layer` of `text` (<bos> added by the tokenizer)."""
  import torch
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(folder)
  ids = tok(text, return_tensors="pt").input_ids
  hf = transformers.Gemma2Model.from_pretrained(folder, attn_implementation="eager").eval()
  with torch.no_grad():
    return hf(input_ids=ids, output_hidden_states=True).hidden_states[layer][0].numpy()


def test_a_workdir_samples_with_the_text_conditioning_its_run_saved(files, tmp_path, caplog):
  """A DiT run saves how its captions were encoded (the trainer: `dit_task.text_conditioning`);
  sampling from its workdir encodes prompts the same way: here the `empty` system prompt and the
  last hidden state, neither the sampler's old fixed `base` / -2. A given system type wins, with
  a warning. Features compared with transformers' Gemma-2 on the same folder."""
  params = jax.tree.map(jnp.asarray, files["params"])
  state = state_lib.create_state(params, optax.adam(1e-3))
  saved = {**ckpt_lib.config_to_json(_config(files)),
           dit_checkpoint.TEXT_CONDITIONING: {"kind": "text_features", "hidden_layer": -1,
                                              "system_prompt": "empty"}}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, iter(grain.MapDataset.range(2).to_iter_dataset()), saved)
  ckpt.close()
  prompt = GENEVAL[0]["prompt"]

  def features(g):
    ids, mask = g.text_encoder.tokenize([prompt])
    f, _ = g.text_encoder.encode_tokens(ids, mask)
    return np.asarray(f, np.float32)[0][mask[0]]

  g = gen.Generator.from_config(_config(files), text_encoder=files["text"],
                                checkpoint=str(tmp_path))
  assert g.text_settings == {"system_type": "empty", "hidden_layer": -1}
  ref = _hf_hidden_state(files["text"], prompt, -1)
  np.testing.assert_allclose(features(g), ref, atol=1e-4, rtol=1e-4)
  with caplog.at_level("WARNING"):
    g = gen.Generator.from_config(_config(files), text_encoder=files["text"],
                                  checkpoint=str(tmp_path), system_type="base")
  assert "the run trained on captions with the 'empty' system prompt" in caplog.text
  ref = _hf_hidden_state(files["text"], text.SYSTEM_PROMPTS["base"] + prompt, -1)
  np.testing.assert_allclose(features(g), ref, atol=1e-4, rtol=1e-4)
  # Converted weights carry no run: the official base prompt and hidden state -2.
  g = gen.Generator.from_config(_config(files), text_encoder=files["text"],
                                weights=files["weights"], weights_format="flax")
  assert g.text_settings == {"system_type": "base", "hidden_layer": -2}
  with pytest.raises(InputError, match="hidden_layer 3 out of range for 3 hidden states"):
    gen.Generator.from_config(_config(files), text_encoder=files["text"],
                              weights=files["weights"], weights_format="flax", hidden_layer=3)


# ----------------------------------------------------------------------------- benchmarks


def _tree(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                for f in fs)


def _mtimes(root):
  return {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in _tree(root)}


def _png(path):
  return np.asarray(Image.open(path).convert("RGB"))


def test_geneval_layout_sharding_and_resume(generator, tmp_path):
  items = GENEVAL[:3]
  settings = gen.SamplerSettings(steps=2)
  kw = dict(batch_size=3, images_per_prompt=4, process_count=2, stream=io.StringIO())
  s0 = benchmarks.run_benchmark(generator, items, "geneval", str(tmp_path), RES, settings,
                         process_index=0, **kw)
  assert s0 == dict(prompts=2, skipped=0, images=8, written=8)
  expected0 = [f"{i:05d}/{f}" for i in (0, 2) for f in
               ["metadata.jsonl"] + [f"samples/{k:05d}.png" for k in range(4)]]
  assert _tree(tmp_path) == sorted(expected0)
  benchmarks.run_benchmark(generator, items, "geneval", str(tmp_path), RES, settings, process_index=1,
                    **kw)
  assert _tree(tmp_path) == sorted(expected0 + [f"00001/{f}" for f in
                                                ["metadata.jsonl"] +
                                                [f"samples/{k:05d}.png" for k in range(4)]])
  for i in range(3):
    with open(tmp_path / f"{i:05d}" / "metadata.jsonl") as f:
      assert [json.loads(line) for line in f] == [items[i]]
  # Image k of prompt i comes from seed 42 + 4 i + k.
  img = _png(tmp_path / "00002" / "samples" / "00001.png")
  assert img.shape == (32, 48, 3)
  # (batch and caption length as in the run: the same compiled program)
  want = generator.generate([items[2]["prompt"]], [42 + 8 + 1], RES, settings, batch_size=3,
                            text_length=generator.text_length([it["prompt"] for it in items]))[0]
  assert np.max(np.abs(img.astype(int) - want)) <= 1
  # Resume: finished prompts are not touched, a partial prompt gets its missing sample only.
  before = _mtimes(tmp_path)
  os.remove(tmp_path / "00002" / "samples" / "00003.png")
  s = benchmarks.run_benchmark(generator, items, "geneval", str(tmp_path), RES, settings,
                        process_index=0, **kw)
  assert s == dict(prompts=2, skipped=1, images=1, written=1)
  after = _mtimes(tmp_path)
  changed = sorted(p for p in after if after[p] != before.get(p))
  assert changed == ["00002/samples/00003.png"], changed
  assert not [p for p in _tree(tmp_path) if ".tmp" in p] and not os.path.exists(tmp_path / ".tmp")
  s = benchmarks.run_benchmark(generator, items, "geneval", str(tmp_path), RES, settings,
                        process_index=0, **kw)
  assert s == dict(prompts=2, skipped=2, images=0, written=0) and _mtimes(tmp_path) == after


def test_a_peer_that_finishes_first_leaves_the_others_temporary_files(generator, tmp_path,
                                                                      monkeypatch):
  """Two processes share one benchmark folder (each host of a slice): process 1 (another host)
  runs and finishes while process 0 is between its images; process 0 still writes all its own,
  and the temporary folder goes once both are done."""
  items = GENEVAL[:2]
  settings = gen.SamplerSettings(steps=2)
  kw = dict(batch_size=1, images_per_prompt=2, process_count=2, stream=io.StringIO())

  class PeerFinishesMeanwhile:
    peer_ran = False

    def __getattr__(self, name):
      return getattr(generator, name)

    def generate(self, *args, **kwargs):
      if not self.peer_ran:
        self.peer_ran = True
        with monkeypatch.context() as m:
          m.setattr(benchmarks.socket, "gethostname", lambda: "another-host")
          peer = benchmarks.run_benchmark(generator, items, "geneval", str(tmp_path), RES,
                                          settings, process_index=1, **kw)
        assert peer["written"] == 2
      return generator.generate(*args, **kwargs)

  s = benchmarks.run_benchmark(PeerFinishesMeanwhile(), items, "geneval", str(tmp_path), RES,
                               settings, process_index=0, **kw)
  assert s["written"] == 2
  assert _tree(tmp_path) == sorted(f"{i:05d}/{f}" for i in range(2) for f in
                                   ["metadata.jsonl", "samples/00000.png", "samples/00001.png"])
  assert not os.path.exists(tmp_path / ".tmp")


def _bytes(root):
  return {p: open(os.path.join(root, p), "rb").read() for p in _tree(root) if p.endswith(".png")}


def test_an_image_is_the_same_however_the_prompts_are_split_or_resumed(generator, tmp_path):
  """One caption length for the whole prompt file: a prompt's images do not depend on which
  process made them or on what was left to do when a run resumed (the longest remaining prompt
  set the length, and another padded length moves a pixel by a level now and then)."""
  items = GENEVAL[:3] + [dict(GENEVAL[3], prompt=DPG[0]["prompt"])]  # one much longer prompt
  settings = gen.SamplerSettings(steps=2)
  kw = dict(batch_size=2, images_per_prompt=2, stream=io.StringIO())
  lengths = []

  class Recording:
    def __getattr__(self, name):
      return getattr(generator, name)

    def generate(self, *args, **kwargs):
      lengths.append(kwargs["text_length"])
      return generator.generate(*args, **kwargs)

  whole, split = tmp_path / "whole", tmp_path / "split"
  benchmarks.run_benchmark(Recording(), items, "geneval", str(whole), RES, settings, **kw)
  for index in (0, 1):  # process 0 has only short prompts
    benchmarks.run_benchmark(Recording(), items, "geneval", str(split), RES, settings,
                             process_index=index, process_count=2, **kw)
  for k in range(2):  # resumed with only a short prompt left to do
    os.remove(split / "00000" / "samples" / f"{k:05d}.png")
  benchmarks.run_benchmark(Recording(), items, "geneval", str(split), RES, settings, **kw)
  full = generator.text_length([it["prompt"] for it in items])
  assert full > generator.text_length([it["prompt"] for it in items[:3]])
  assert lengths and set(lengths) == {full}, lengths
  assert _bytes(split) == _bytes(whole) and len(_bytes(whole)) == 8


def test_damaged_files_are_made_again_and_stray_ones_named(generator, tmp_path):
  items = GENEVAL[:2]
  settings = gen.SamplerSettings(steps=2)
  kw = dict(batch_size=2, images_per_prompt=2)
  benchmarks.run_benchmark(generator, items, "geneval", str(tmp_path), RES, settings,
                           stream=io.StringIO(), **kw)
  whole = _bytes(tmp_path)
  cut, empty = (tmp_path / "00000" / "samples" / "00001.png",
                tmp_path / "00001" / "samples" / "00000.png")
  cut.write_bytes(cut.read_bytes()[:100])  # a copy that stopped half-way
  empty.write_bytes(b"")
  (tmp_path / "00001" / "samples" / "00007.png").write_bytes(b"x")
  out = io.StringIO()
  s = benchmarks.run_benchmark(generator, items, "geneval", str(tmp_path), RES, settings,
                               stream=out, **kw)
  assert s == dict(prompts=2, skipped=0, images=2, written=2)
  assert "2 damaged files (not whole PNGs) are made again" in out.getvalue()
  assert ("warning: 1 files in samples/ folders are none of this run's 2 images per prompt"
          in out.getvalue()) and "00001/samples/00007.png" in out.getvalue()
  again = _bytes(tmp_path)
  assert {p: again[p] for p in whole} == whole


def test_batches_are_whole_for_the_devices_and_killed_runs_leave_no_temporary_folder(
    generator, tmp_path, monkeypatch):
  """--batch_size 2 where the batch splits over 4 devices: batches of 4 images, not 2 padded
  to 4 (half the work thrown away); a killed run's temporary folder on this host goes, a live
  process's and another host's stay."""
  calls = []

  class FourDevices:
    def __getattr__(self, name):
      return getattr(generator, name)

    def batch_multiple(self):
      return 4

    def generate(self, prompts, *args, **kwargs):
      calls.append((len(prompts), kwargs["batch_size"]))
      return generator.generate(prompts, *args, **kwargs)

  host = "this-host"
  monkeypatch.setattr(benchmarks.socket, "gethostname", lambda: host)
  shared = tmp_path / benchmarks.TMP_DIR
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  for name in (f"{host}-{dead}", f"{host}-{os.getppid()}", f"other-host-{dead}"):
    (shared / name).mkdir(parents=True)
    (shared / name / "leftover.png").write_bytes(b"x")
  benchmarks.run_benchmark(FourDevices(), GENEVAL[:3], "geneval", str(tmp_path), RES,
                           gen.SamplerSettings(steps=2), batch_size=2, images_per_prompt=2,
                           stream=io.StringIO())
  assert calls == [(4, 4), (2, 4)], calls
  assert sorted(os.listdir(shared)) == sorted([f"{host}-{os.getppid()}", f"other-host-{dead}"])


def test_dpg_grids(generator, tmp_path):
  items = DPG[:2]
  settings = gen.SamplerSettings(steps=2)
  s = benchmarks.run_benchmark(generator, items, "dpg", str(tmp_path), RES, settings, batch_size=3,
                        stream=io.StringIO())
  names = [os.path.splitext(it["filename"])[0] + ".png" for it in items]
  assert s["written"] == 2 and _tree(tmp_path) == sorted(names)
  grid = _png(tmp_path / names[1])
  assert grid.shape == (64, 96, 3)
  want = generator.generate([items[1]["prompt"]] * 4, [46, 47, 48, 49], RES, settings,
                            batch_size=3,
                            text_length=generator.text_length([it["prompt"] for it in items]))
  for k in range(4):
    r, c = divmod(k, 2)
    cell = grid[32 * r:32 * (r + 1), 48 * c:48 * (c + 1)]
    assert np.max(np.abs(cell.astype(int) - want[k])) <= 1, k
  before = _mtimes(tmp_path)
  os.remove(tmp_path / names[0])
  s = benchmarks.run_benchmark(generator, items, "dpg", str(tmp_path), RES, settings, batch_size=3,
                        stream=io.StringIO())
  assert s == dict(prompts=2, skipped=1, images=4, written=1)
  assert _mtimes(tmp_path)[names[1]] == before[names[1]]


def test_prompt_file_errors(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a cat"}\n{"filename": "x.txt"}\nnot json\n')
  with pytest.raises(ValueError,
                     match="line 2: missing or empty \\['prompt'\\].*line 3: not valid JSON"):
    benchmarks.read_prompt_file(str(bad), "geneval")
  with pytest.raises(ValueError, match="line 1: missing or empty \\['filename'\\]"):
    benchmarks.read_prompt_file(str(bad), "dpg")
  with pytest.raises(ValueError, match="unknown benchmark"):
    benchmarks.read_prompt_file(str(bad), "coco")


# ----------------------------------------------------------------------------- the CLIs


def _run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=script_runs.xla_flags(2))
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


def _common(files):
  return [f"--config={files['config']}", f"--text_encoder={files['text']}",
          f"--weights={files['weights']}", "--format=flax", "--steps=2", "--resolution=48x32"]


@pytest.mark.slow  # a subprocess: imports, loads and compiles from scratch
def test_sample_cli(files, tmp_path):
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text(json.dumps({"prompt": GENEVAL[5]["prompt"]}) + "\n")
  out = tmp_path / "out"
  r = _run("sample.py", *_common(files), f"--prompt={GENEVAL[0]['prompt']}",
           f"--prompts_jsonl={jsonl}", "--num_images=2", "--seed=10", "--batch_size=3",
           "--solver=euler", "--cfg=3", "--renorm=0.5", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "4/4 images" in r.stderr  # the progress line (stderr) reached the end
  assert _tree(out) == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png",
                        "metadata.jsonl"]
  assert _png(out / "grid.png").shape == (64, 96, 3)  # 2x2 cells of 32x48
  meta = [json.loads(line) for line in open(out / "metadata.jsonl")]
  assert [(m["file"], m["prompt"], m["seed"]) for m in meta] == [
      ("00000.png", GENEVAL[0]["prompt"], 10), ("00001.png", GENEVAL[0]["prompt"], 11),
      ("00002.png", GENEVAL[5]["prompt"], 12), ("00003.png", GENEVAL[5]["prompt"], 13)]
  assert meta[0]["solver"] == "euler" and meta[0]["cfg"] == 3.0 and meta[0]["width"] == 48
  assert meta[0]["renorm"] == 0.5
  assert meta[0]["weights"] == os.path.abspath(files["weights"]) and meta[0]["ema"] is None
  # The same folder again: refused before anything is sampled; --overwrite replaces the run whole.
  again = ["--prompt=a cat", "--num_images=1", f"--out={out}"]
  r = _run("sample.py", *_common(files), *again)
  assert r.returncode == 2 and "holds an earlier run's images" in r.stderr, r.stderr[-2000:]
  r = _run("sample.py", *_common(files), *again, "--overwrite")
  assert r.returncode == 0, r.stderr[-3000:]
  assert _tree(out) == ["00000.png", "grid.png", "metadata.jsonl"]
  assert [json.loads(line)["prompt"] for line in open(out / "metadata.jsonl")] == ["a cat"]


@pytest.mark.slow  # a subprocess: imports, loads and compiles from scratch
def test_sample_cli_from_a_workdir_takes_the_run_s_text_path_and_resolution(files, tmp_path):
  """`--checkpoint` without --system_type, --hidden_layer or --resolution: the prompts are
  encoded as the run's records were, at the size its own grids sampled (a 64 px demo run sampled
  at the 1024 px default was killed for memory)."""
  state = state_lib.create_state(jax.tree.map(jnp.asarray, files["params"]), optax.adam(1e-3))
  config = _config(files)
  config.validation.resolution = 32
  saved = {**ckpt_lib.config_to_json(config),
           dit_checkpoint.TEXT_CONDITIONING: {"hidden_layer": -1, "system_prompt": "empty"}}
  workdir = tmp_path / "run"
  ckpt = ckpt_lib.Checkpointer(str(workdir), async_save=False)
  ckpt.save(3, state, iter(grain.MapDataset.range(2).to_iter_dataset()), saved)
  ckpt.close()
  out = tmp_path / "out"
  r = _run("sample.py", f"--config={files['config']}", f"--text_encoder={files['text']}",
           f"--checkpoint={workdir}", "--steps=2", "--prompt=a red circle", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  meta = [json.loads(line) for line in open(out / "metadata.jsonl")]
  assert (meta[0]["width"], meta[0]["height"], meta[0]["step"]) == (32, 32, 3)
  assert (meta[0]["system_type"], meta[0]["hidden_layer"]) == ("empty", -1)
  assert _png(out / "00000.png").shape == (32, 32, 3)


# launch/sample.py as a user runs it, with Ctrl-C pressed while the second batch decodes.
_INTERRUPTED_SAMPLE = """
import runpy, sys
sys.path.insert(0, {launch!r})
from svg_jax import generate
decode, calls = generate.Generator.decode, []

def decode_then_interrupt(self, *args, **kwargs):
  calls.append(1)
  if len(calls) == 2:
    raise KeyboardInterrupt
  return decode(self, *args, **kwargs)

generate.Generator.decode = decode_then_interrupt
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow  # a subprocess: imports, loads and compiles from scratch
def test_sample_cli_writes_each_batch_as_it_is_decoded(files, tmp_path):
  """An interrupted run keeps the batches decoded before, their metadata lines and nothing else;
  the folder is then an earlier run (refused without --overwrite or --resume). --resume makes
  the missing images and a cut one again, keeps the others, and gives the uninterrupted run's
  bytes."""
  wrapper = tmp_path / "interrupted_sample.py"
  wrapper.write_text(_INTERRUPTED_SAMPLE.format(launch=os.path.join(REPO, "launch"),
                                                script=os.path.join(REPO, "launch", "sample.py")))
  prompts = [GENEVAL[i]["prompt"] for i in (0, 7, 130)]
  out = tmp_path / "out"
  r = script_runs.run(str(wrapper), *_common(files), *(f"--prompt={p}" for p in prompts),
                      "--num_images=2", "--seed=4", "--batch_size=2", f"--out={out}")
  assert script_runs.error_lines(r.stderr) == [
      f"stopped: 2 of 6 images are written to {out} and listed in its metadata.jsonl "
      "(--resume goes on with it)", "interrupted (Ctrl-C)"], r.stderr[-3000:]
  assert _tree(out) == ["00000.png", "00001.png", "metadata.jsonl"]
  meta = [json.loads(line) for line in open(out / "metadata.jsonl")]
  assert [(m["file"], m["prompt"], m["seed"]) for m in meta] == [
      ("00000.png", prompts[0], 4), ("00001.png", prompts[0], 5)]
  # The whole list's images (same seeds, batch size and caption length), bit for bit: made on
  # one device as the runs are (the same programs; a batch split otherwise may round otherwise).
  one = gen.Generator.from_config(_config(files), text_encoder=files["text"],
                                  weights=files["weights"], weights_format="flax",
                                  mesh=parallel.make_mesh(dict(data=1, fsdp=1, tensor=1),
                                                          jax.devices()[:1]))
  jobs = [p for p in prompts for _ in range(2)]
  want = one.generate(jobs, range(4, 10), RES, gen.SamplerSettings(steps=2), batch_size=2)
  for j in range(2):
    np.testing.assert_array_equal(_png(out / f"{j:05d}.png"), want[j])
  with pytest.raises(sample_folder.InputError, match="holds an earlier run's images"):
    sample_folder.check_folder(str(out), overwrite=False)
  # A copy cut 00001.png short; a kill between a PNG's rename and its line left 00002.png.
  (out / "00001.png").write_bytes((out / "00001.png").read_bytes()[:100])
  (out / "00002.png").write_bytes(b"not this run's")
  kept = os.stat(out / "00000.png").st_mtime_ns
  r = script_runs.run("sample.py", *_common(files), *(f"--prompt={p}" for p in prompts),
                      "--num_images=2", "--seed=4", "--batch_size=2", f"--out={out}", "--resume")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resuming {out}: 1 of 6 images are there, 5 to make" in r.stderr
  assert os.stat(out / "00000.png").st_mtime_ns == kept
  meta = [json.loads(line) for line in open(out / "metadata.jsonl")]
  assert sorted((m["file"], m["seed"]) for m in meta) == [(f"{j:05d}.png", 4 + j)
                                                         for j in range(6)]
  for j in range(6):
    np.testing.assert_array_equal(_png(out / f"{j:05d}.png"), want[j])


@pytest.mark.parametrize("args, where", [
    (["--prompt=a cat", "--prompt="], "--prompt 2: the prompt is empty or blank"),
    (["--prompt=a cat", "--prompts_jsonl=JSONL"], "JSONL line 3: the prompt is empty or blank "
                                                  "(and 1 more)"),
])
def test_sample_cli_refuses_empty_prompts(files, tmp_path, args, where):
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text('{"prompt": "a dog"}\n\n{"prompt": "  "}\n{"prompt": ""}\n')
  args = [a.replace("JSONL", str(jsonl)) for a in args]
  r = script_runs.run("sample.py", *_common(files), *args, f"--out={tmp_path / 'out'}")
  script_runs.assert_one_line(r, "usage error: " + where.replace("JSONL", str(jsonl)),
                              "--allow_empty_prompts")
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow  # a subprocess: imports, loads and compiles from scratch
def test_sample_cli_allows_empty_prompts_and_reports_cut_ones(files, generator, tmp_path):
  short, long = GENEVAL[0]["prompt"], "a photo of a cat " * 100  # 793 tokens, the limit 512
  out = tmp_path / "out"
  r = script_runs.run("sample.py", *_common(files), f"--prompt={short}", "--prompt=",
                      f"--prompt={long}", "--allow_empty_prompts", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert script_runs.error_lines(r.stderr) == [
      "warning: 1 of 3 prompts are longer than the caption length (512 tokens with <bos> and the "
      "system prompt) and are cut to it, as the official sampler cuts them; the first: --prompt 3 "
      "(793 tokens). metadata.jsonl marks their images caption_cut"]
  assert _tree(out) == ["00000.png", "00001.png", "00002.png", "grid.png", "metadata.jsonl"]
  meta = [json.loads(line) for line in open(out / "metadata.jsonl")]
  _, mask = generator.text_encoder.tokenize([short])
  assert [(m["prompt"], m["caption_tokens"], m["caption_cut"]) for m in meta] == [
      (short, int(mask.sum()), False), ("", 1, False), (long, 512, True)]


@pytest.mark.slow  # a subprocess: imports, loads and compiles from scratch
def test_benchmark_cli_writes_the_official_layouts(files, tmp_path):
  out = tmp_path / "geneval"
  r = _run("generate_benchmark.py", *_common(files), "--benchmark=geneval",
           "--limit=2", f"--out={out}")  # the packaged GenEval prompts by default
  assert r.returncode == 0, r.stderr[-3000:]
  assert _tree(out) == sorted(["generation.json"] + [
      f"{i:05d}/{f}" for i in range(2) for f in
      ["metadata.jsonl"] + [f"samples/{k:05d}.png" for k in range(4)]])
  pinned = json.load(open(out / "generation.json"))
  assert pinned["steps"] == 2 and pinned["resolution"] == [32, 48]
  # A rerun with another sampler would mix images: refused, nothing touched.
  before = _mtimes(out)
  r = _run("generate_benchmark.py", *_common(files), "--benchmark=geneval", "--limit=3",
           "--steps=3", f"--out={out}")
  script_runs.assert_one_line(r, f"{out} holds images made with other settings (steps: 2 there, "
                              "3 now)")
  assert _mtimes(out) == before
  out = tmp_path / "dpg"
  r = _run("generate_benchmark.py", *_common(files), "--benchmark=dpg",
           f"--prompts={assets.DPG_PROMPTS}", "--limit=2", "--process_count=2",
           "--process_index=1", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  grid = os.path.splitext(DPG[1]["filename"])[0] + ".png"
  assert _tree(out) == sorted([grid, "generation.json"])
  assert _png(out / grid).shape == (64, 96, 3)
  # A prompt past the caption length: cut, as the official sampler cuts it, and said.
  prompts = tmp_path / "long.jsonl"
  prompts.write_text(json.dumps(GENEVAL[0]) + "\n" +
                     json.dumps(dict(GENEVAL[1], prompt="a red cube " * 300)) + "\n")
  r = _run("generate_benchmark.py", *_common(files), "--benchmark=geneval", f"--prompts={prompts}",
           "--images_per_prompt=1", f"--out={tmp_path / 'long'}", "--cfg_mode=none", "--cfg=7")
  assert r.returncode == 0, r.stderr[-3000:]
  assert ("warning: 1 of 2 prompts are longer than the caption length (512 tokens with <bos> and "
          "the system prompt) and are cut to it, as the official sampler cuts them; the first: "
          "line 2 (") in r.stderr, r.stderr[-3000:]
  # Unguided, the scale decides nothing: another one resumes the folder instead of a refusal.
  r = _run("generate_benchmark.py", *_common(files), "--benchmark=geneval", f"--prompts={prompts}",
           "--images_per_prompt=1", f"--out={tmp_path / 'long'}", "--cfg_mode=none", "--cfg=3")
  assert r.returncode == 0 and "2 already finished, 0 images to generate" in r.stdout, (
      r.stdout[-2000:] + r.stderr[-2000:])


@pytest.mark.slow  # a subprocess: imports, loads and compiles from scratch
def test_evaluate_cli_scores_the_shapes_prompts(files, generator, tmp_path):
  from svg_jax.demo import geneval, shapes

  data = tmp_path / "shapes"
  shapes.write_dataset(str(data), 0, 6, 48)
  out = tmp_path / "eval"
  r = _run("evaluate.py", *_common(files), "--resolution=48", "--system_type=base",
           f"--data={data}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert _tree(out) == ["grid.png", "grid_prompts.txt", "scores.json"]
  items = shapes.read_split(str(data), "heldout")
  report = json.load(open(out / "scores.json"))
  assert report["counts"] == {c: 1 for c in shapes.CATEGORIES}
  assert report["generated_with"]["weights"] == os.path.abspath(files["weights"])
  assert report["settings"]["renorm"] == 1.0 and report["split"] == "heldout"
  assert (out / "grid_prompts.txt").read_text().split("\n")[:6] == [i["prompt"] for i in items]
  # The same prompts, seeds (42 + 4i) and sampler in-process, scored by the library.
  images = generator.generate([i["prompt"] for i in items], [42 + 4 * i for i in range(6)],
                              (48, 48), gen.SamplerSettings(steps=2, shift=1.0))
  want = geneval.score(list(images), [i["metadata"] for i in items])
  assert report["scores"] == pytest.approx(want)
  assert geneval.format_table(want, report["counts"]) in r.stdout


@pytest.mark.parametrize("flag, message", [
    ("--solver=rk4", "--solver=rk4"),
    ("--resolution=100x100", "width 100 and height 100 not a positive multiple of 16"),
])
def test_bad_flags_fail_clearly(files, tmp_path, flag, message):
  r = _run("sample.py", *_common(files), "--prompt=a cat", f"--out={tmp_path}", flag)
  assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- bad input: one line


@pytest.mark.parametrize("script, change, message", [
    ("sample.py", dict(weights="/nonexistent/dit.msgpack"),
     "input error: DiT checkpoint not found: /nonexistent/dit.msgpack"),
    ("sample.py", dict(weights=None, format=None, checkpoint="/nonexistent/run"),
     "input error: training workdir /nonexistent/run does not exist"),
    ("sample.py", dict(text_encoder="/nonexistent/gemma"),
     "input error: text encoder folder /nonexistent/gemma does not exist"),
    ("generate_benchmark.py", dict(weights="/nonexistent/dit.msgpack", benchmark="geneval"),
     "input error: DiT checkpoint not found: /nonexistent/dit.msgpack"),
    ("evaluate.py", dict(text_encoder="/nonexistent/gemma", data="SHAPES", resolution="48"),
     "input error: text encoder folder /nonexistent/gemma does not exist"),
    # A config whose encoder has 8-pixel patches: the resolution is a multiple of 8, not of 16
    # (the run then stops at the weights, before anything is compiled).
    ("sample.py", {"config.autoencoder.encoder.patch_size": 8, "resolution": "72x64",
                   "weights": "/nonexistent/dit.msgpack"}, "DiT checkpoint not found"),
    ("sample.py", {"config.autoencoder.encoder.patch_size": 8, "resolution": "68x64"},
     "usage error: resolution 68x64: width 68 not a positive multiple of 8 (one latent token "
     "covers 8x8 pixels)"),
    # Files of the wrong kind, outputs that cannot be written, values no run takes: before
    # anything is generated.
    ("sample.py", dict(format="official"), "input error: WEIGHTS: not a PyTorch checkpoint"),
    ("sample.py", dict(weights=None, format=None, checkpoint="WEIGHTS"),
     "input error: WEIGHTS is a file, not a training workdir"),
    ("sample.py", dict(out="A_FILE"), "input error: --out A_FILE cannot be made: A_FILE is a file"),
    ("sample.py", dict(seed=-1), "usage error: --seed must be >= 0"),
    ("sample.py", dict(resolution="1040x16"),
     "input error: resolution 1040x16 is 65x1 tokens, more than the DiT's position table holds "
     "(64x64, model.axes_lens): at most 1024x1024"),
    ("sample.py", dict(step=3), "usage error: --step and --ema/--noema apply to --checkpoint"),
    ("generate_benchmark.py", dict(benchmark="geneval", images_per_prompt=0),
     "input error: images per prompt must be >= 1, got 0"),
    ("generate_benchmark.py", dict(benchmark="dpg", images_per_prompt=3),
     "input error: DPG-Bench grids are 2x2"),
    ("generate_benchmark.py", dict(benchmark="geneval", out="A_FILE"),
     "input error: --out A_FILE cannot be made: A_FILE is a file"),
])
def test_a_missing_model_file_or_bad_resolution_is_one_line(files, tmp_path, script, change,
                                                            message):
  from svg_jax.demo import shapes

  given = {"config": files["config"], "text_encoder": files["text"], "weights": files["weights"],
           "format": "flax", "steps": 2, "resolution": "48x32", "out": tmp_path / "out", **change}
  (tmp_path / "a_file").write_text("not a folder")
  names = {"WEIGHTS": str(files["weights"]), "A_FILE": str(tmp_path / "a_file")}
  for key, value in given.items():
    given[key] = names.get(value, value) if isinstance(value, str) else value
  for placeholder, value in names.items():
    message = message.replace(placeholder, value)
  if script == "sample.py":
    given["prompt"] = "a cat"
  if given.get("data") == "SHAPES":
    given["data"] = tmp_path / "shapes"
    shapes.write_dataset(str(given["data"]), 0, 6, 48)
  args = [f"--{k}={v}" for k, v in given.items() if v is not None]
  script_runs.assert_one_line(script_runs.run(script, *args), message)
  assert not os.path.exists(tmp_path / "out")  # nothing was made
