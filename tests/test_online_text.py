"""Online text mode: the step runs the frozen Gemma-2 on token ids and gives the same loss and
gradients as the step on precomputed features of the same captions (caption dropout included)."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import shape_items
from svg_jax import config as config_lib
from svg_jax import dit_checkpoint, parallel
from svg_jax.data import records
from svg_jax.demo.text_encoder import ensure_demo_text_encoder
from svg_jax.models.gemma2 import Gemma2Encoder
from svg_jax.models.nextdit import NextDiT, NextDiTConfig
from svg_jax.text import TextEncoder
from svg_jax.train import dit_step, state as state_lib


def test_token_mode_equals_feature_mode(encoders):
  # The module's demo Gemma-2 (built once for the module, from the first 20 shape captions).
  captions = [shape_items.make_item(0, "train", i, 64)["prompt"] for i in range(20)]
  enc = TextEncoder.from_pretrained(encoders[0])
  batch_captions = captions[:8]
  length = 48
  ids, mask = enc.tokenize(batch_captions, pad_to=length)
  feats, _ = enc.encode_tokens(ids, mask)
  empty_ids, empty_mask = enc.tokenize([""], pad_to=8)
  empty_feats = np.asarray(enc.encode_tokens(empty_ids, empty_mask)[0])[0, :1]

  config = config_lib.dit_task_config()
  config.train.caption_dropout = 0.5  # both branches of the dropout in one batch
  config.data.resolution = 64
  cfg = NextDiTConfig(in_channels=8, dim=64, n_layers=1, n_refiner_layers=1, n_heads=2,
                      n_kv_heads=1, multiple_of=32, cap_feat_dim=enc.cfg.hidden_size,
                      axes_dims=(8, 12, 12), scan_layers=False)
  config.model.update(cfg.__dict__)
  model = NextDiT(cfg)
  rng = np.random.default_rng(0)
  latent = rng.standard_normal((8, 4, 4, 8)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), latent, np.zeros(8, np.float32),
                               np.asarray(feats), mask)["params"]  # jitted: faster than op by op
  tx = state_lib.make_optimizer(config.train)
  unboxed = state_lib.unbox(params)
  # Params off their zero init (gates, output layer): else the loss barely depends on the text.
  leaves, treedef = jax.tree.flatten(unboxed)
  noise = [0.1 * rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
  unboxed = jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise)])

  by_features = dit_step.make_train_step(model, tx, config, empty_feats)
  by_tokens = dit_step.make_train_step(model, tx, config, np.asarray(empty_ids[0, :1]),
                                       text_model=Gemma2Encoder(enc.cfg))
  key = jax.random.PRNGKey(3)
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  with parallel.mesh_context(mesh, config.axis_rules):
    _, m_feat = jax.jit(by_features)(state_lib.create_state(unboxed, tx),
                                     {"latent": latent, "text": feats, "text_mask": mask}, key)
    _, m_tok = jax.jit(by_tokens)(state_lib.create_state(unboxed, tx),
                                  {"latent": latent, "token_ids": ids, "text_mask": mask}, key,
                                  enc.params)
  assert 0 < float(m_feat["caption_dropped"]) < 1  # some captions dropped, some kept
  assert float(m_feat["caption_dropped"]) == float(m_tok["caption_dropped"])
  np.testing.assert_allclose(float(m_tok["loss"]), float(m_feat["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m_tok["grad_norm"]), float(m_feat["grad_norm"]), rtol=1e-4)


def test_trainer_runs_the_text_encoder_on_token_id_datasets(encoders, tmp_path):
  """`launch/train.py`'s loop on a token-id dataset: Gemma-2 runs inside the step (online mode).
  The encoder the loop's setup hands the step gives transformers' hidden states of
  `text.encoder_dir` at `text.hidden_layer`. (Comparing losses with a features run would not show
  this: the DiT's zero-initialized gates leave the first steps' loss almost free of the text.)"""
  from svg_jax.data import synthetic
  from svg_jax.train import dit_task, loop, trainer

  captions = [shape_items.make_item(0, "train", i, 64)["prompt"] for i in range(20)]
  te = encoders[0]  # the module's demo Gemma-2, built from these captions
  enc = TextEncoder.from_pretrained(te)
  data = str(tmp_path / "data")
  synthetic.write_random_dataset(data, buckets=((4, 4),), num_records=32, latent_channels=8,
                                 text_kind="token_ids", vocab_size=len(enc.tokenizer),
                                 caption_len=(1, 6))
  np.save(os.path.join(data, dit_task.EMPTY_TEXT_FILE), enc.tokenize([""])[0][0, :1])
  manifest = records.read_manifest(data)  # as precompute records its system prompt rule
  records.write_manifest(data, {**manifest, "precompute": {"system_prompt": "empty"}})
  config = config_lib.dit_task_config()
  config.model.update(dict(in_channels=8, dim=64, n_layers=1, n_refiner_layers=1, n_heads=2,
                           n_kv_heads=1, multiple_of=32, cap_feat_dim=enc.cfg.hidden_size,
                           axes_dims=(8, 12, 12), scan_layers=False, compute_dtype="float32",
                           remat_policy="none"))
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  config.data.update(dict(path=data, max_caption_len=16, resolution=64))
  config.autoencoder.stats_path = ""  # random records: no statistics to check them against
  config.train.update(dict(global_batch_size=8, num_steps=3, log_every=1, checkpoint_every=3))
  with pytest.raises(loop.ConfigError, match="text.encoder_dir"):
    trainer.validate_config(config)
  layer = -3  # not the default -2, so a setup that ignored the setting is caught
  config.text.update(dict(encoder_dir=te, hidden_layer=layer))
  out = trainer.train(config, str(tmp_path / "run"))
  assert out["step"] == 3 and np.isfinite(out["last_record"]["loss"])
  # Saved with the run, for samplers: how its captions became features.
  assert dit_checkpoint.saved_text_conditioning(str(tmp_path / "run")) == {
      "kind": "token_ids", "hidden_layer": layer, "system_prompt": "empty"}

  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  # The setup `trainer.train` builds for this config (on one device), as its step holds it.
  text_model, text_params = trainer.get(config.task).make_setup(config, mesh).text_encoder
  ids, mask = enc.tokenize([captions[0], "", captions[3] + " and " + captions[7]])
  with parallel.mesh_context(mesh, config.axis_rules):
    feats, _ = text_model.apply({"params": text_params}, ids, mask)
  hf = transformers.Gemma2Model.from_pretrained(te, attn_implementation="eager").eval()
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
             attention_mask=torch.tensor(mask, dtype=torch.long),
             output_hidden_states=True).hidden_states[layer].numpy()
  assert float(np.abs(np.asarray(feats) - ref)[mask].max()) <= 1e-4


# ------------------------------------------------------------------ config checks of online mode


def _records(path, te=None, kind="token_ids", vocab=64, **fingerprint):
  """Synthetic records whose manifest names the tokenizer of `te` as precompute would."""
  from svg_jax import precompute
  from svg_jax.data import synthetic

  fps = {k: f"test-{k}" for k in records.FINGERPRINT_KEYS}
  if te is not None:
    fields = {"tokenizer": precompute.tokenizer_fingerprint(te), **fingerprint,
              "max_length": "256", "system_prompt": fingerprint.pop("system_prompt", "auto"),
              "mode": "token_ids" if kind == "token_ids" else "features"}
    fps["text_encoder"] = ";".join(f"{k}={v}" for k, v in fields.items())
  synthetic.write_random_dataset(str(path), buckets=((4, 4),), num_records=8, latent_channels=8,
                                 text_kind=kind, vocab_size=vocab, caption_len=(1, 6),
                                 fingerprints=fps)
  return str(path)


def _config(data, te, cap_feat_dim=128):
  config = config_lib.dit_task_config()
  config.model.update(dict(in_channels=8, dim=64, n_layers=1, n_refiner_layers=1, n_heads=2,
                           n_kv_heads=1, multiple_of=32, cap_feat_dim=cap_feat_dim,
                           axes_dims=(8, 12, 12), scan_layers=False, remat_policy="none"))
  config.data.update(dict(path=data, max_caption_len=16, resolution=64))
  config.autoencoder.stats_path = ""
  config.train.global_batch_size = 8
  config.text.encoder_dir = te
  return config


def _problems(config):
  from svg_jax.train import dit_task
  return dit_task.config_problems(config, 1)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  """Two demo Gemma-2 folders whose tokenizers differ (trained on other captions)."""
  root = tmp_path_factory.mktemp("encoders")
  captions = [shape_items.make_item(0, "train", i, 64)["prompt"] for i in range(20)]
  a = ensure_demo_text_encoder(str(root / "a"), captions)
  b = ensure_demo_text_encoder(str(root / "b"), [c.upper() + " xyz" for c in captions])
  return a, b


def test_records_of_another_tokenizer_are_refused(encoders, tmp_path):
  import shutil
  a, b = encoders
  data = _records(tmp_path / "data", te=a)
  assert not _problems(_config(data, a))
  problems = [p for p in _problems(_config(data, b)) if "tokenizer" in p]
  assert len(problems) == 1 and "data.path holds token ids of the tokenizer" in problems[0]
  assert (precompute_fp(a) in problems[0] and b in problems[0]
          and precompute_fp(b) in problems[0])
  # A precompute.tokenizer_dir holding only a's tokenizer files names the same tokenizer.
  tok = tmp_path / "tok"
  tok.mkdir()
  for name in os.listdir(a):
    if name.startswith(("tokenizer", "special_tokens")):
      shutil.copy(os.path.join(a, name), tok / name)
  assert not _problems(_config(_records(tmp_path / "by_tok", te=str(tok)), a))
  # ... also beside other files (it was refused: the whole folder was hashed), and records of an
  # earlier version, which recorded the hash of the whole text_encoder_dir, still pass.
  (tok / "notes.txt").write_text("where these files came from")
  assert precompute_fp(str(tok)) == precompute_fp(a)
  assert not _problems(_config(_records(tmp_path / "by_tok_notes", te=str(tok)), a))
  earlier = _records(tmp_path / "earlier", te=a, tokenizer=model_fp(a))
  assert model_fp(a) != precompute_fp(a) and not _problems(_config(earlier, a))
  # The held-out records are checked the same way.
  config = _config(data, a)
  config.data.eval_path = _records(tmp_path / "eval", te=b)
  problems = [p for p in _problems(config) if "tokenizer" in p]
  assert len(problems) == 1 and problems[0].startswith("data.eval_path holds token ids")


def precompute_fp(folder):
  from svg_jax import precompute
  return precompute.tokenizer_fingerprint(folder)


def model_fp(folder):
  """The fingerprint of a whole folder: precompute's `model=` field."""
  from svg_jax import autoencoder
  return autoencoder.path_fingerprint(folder)


def test_token_ids_past_the_vocab_are_a_config_problem(encoders, tmp_path):
  """Ids >= vocab_size embed as NaN: before this check, 'training diverged' at step 1."""
  import json
  import shutil
  from svg_jax.data import records
  small = str(tmp_path / "small")
  shutil.copytree(encoders[0], small)
  n = len(transformers.AutoTokenizer.from_pretrained(small))
  with open(os.path.join(small, "config.json")) as f:
    hf = json.load(f)
  hf["vocab_size"] = n - 1
  with open(os.path.join(small, "config.json"), "w") as f:
    json.dump(hf, f)
  data = _records(tmp_path / "data", te=small)  # the same tokenizer: its size from the folder
  problems = [p for p in _problems(_config(data, small)) if "vocab_size" in p]
  assert problems == [f"data.path holds token ids of a tokenizer of {n} tokens, more than the "
                      f"text encoder's vocab_size {n - 1} (text.encoder_dir {small!r})"]
  # Without a tokenizer fingerprint, precompute's recorded tokenizer_size is checked.
  data = _records(tmp_path / "data2")
  manifest = records.read_manifest(data)
  manifest["precompute"] = {"tokenizer_size": n}
  records.write_manifest(data, manifest)
  assert [p for p in _problems(_config(data, small)) if "vocab_size" in p]
  assert not [p for p in _problems(_config(data, encoders[0])) if "vocab_size" in p]


def test_empty_text_of_the_wrong_kind_is_one_config_problem(encoders, tmp_path, caplog):
  from svg_jax.train import dit_task
  a = encoders[0]
  data = _records(tmp_path / "data", te=a)
  config = _config(data, a)
  bos = transformers.AutoTokenizer.from_pretrained(a).bos_token_id
  for spec in ("stand_in", "auto"):  # no empty_text.npy in the folder: the tokenizer's <bos>
    config.data.empty_text = spec
    assert not _problems(config)
    np.testing.assert_array_equal(dit_task.load_empty_text(config, online=True), [bos])
  np.save(os.path.join(data, dit_task.EMPTY_TEXT_FILE), np.asarray([bos], np.int32))
  config.data.empty_text = "stand_in"
  with caplog.at_level("INFO"):
    dit_task.load_empty_text(config, online=True)
    dit_task.load_empty_text(config)
  assert "no empty_text.npy" not in caplog.text and "data.empty_text is stand_in" in caplog.text
  floats = str(tmp_path / "floats.npy")
  np.save(floats, np.ones((1, 128), np.float32))
  config.data.empty_text = floats
  problems = [p for p in _problems(config) if "empty_text" in p]
  assert problems == [f"data.empty_text {floats!r} holds float32 [1, 128]; it must be the empty "
                      "prompt's token ids (int [tokens]), as data.path holds token ids"]
  # Features records with token ids as the empty prompt.
  feats = _records(tmp_path / "feats", kind="text_features")
  config = _config(feats, "", cap_feat_dim=16)
  ids = str(tmp_path / "ids.npy")
  np.save(ids, np.asarray([bos], np.int32))
  config.data.empty_text = ids
  problems = [p for p in _problems(config) if "empty_text" in p]
  assert problems == [f"data.empty_text {ids!r} holds int32 [1]; it must be the empty prompt's "
                      "features (float [tokens, dim]), as data.path holds text features"]


def test_features_records_check_the_encoder_of_the_validation_prompts(encoders, tmp_path):
  """text.encoder_dir encodes the validation prompts: its hidden size is a config problem (it
  was a ValueError in validation), an encoder unlike the records' one a warning."""
  from svg_jax.train import dit_task
  a, b = encoders
  data = _records(tmp_path / "data", kind="text_features")  # dim 16
  config = _config(data, a, cap_feat_dim=16)
  assert "the text encoder's hidden size 128 != model.cap_feat_dim 16" in _problems(config)
  assert dit_task.text_source_warning(config) is None  # synthetic: nothing to compare
  made = _records(tmp_path / "made", te=a, kind="text_features", model=model_fp(a),
                  layer="-2", system_prompt="base")
  config = _config(made, a, cap_feat_dim=16)
  assert dit_task.text_source_warning(config) is None
  # Features made under the official rule ("auto": base, or align for the best captions).
  auto = _config(_records(tmp_path / "auto", te=a, kind="text_features", model=model_fp(a),
                          layer="-2", system_prompt="auto"), a, cap_feat_dim=16)
  auto.validation.system_prompt = "empty"
  assert "system prompt auto (base or align) vs validation.system_prompt empty" in (
      dit_task.text_source_warning(auto))
  for trained in ("align", "base"):
    auto.validation.system_prompt = trained
    assert dit_task.text_source_warning(auto) is None
  config.text.update(dict(encoder_dir=b, hidden_layer=-3))
  config.validation.system_prompt = "real"
  warning = dit_task.text_source_warning(config)
  assert (f"weights {model_fp(a)} vs {model_fp(b)}" in warning
          and "hidden layer -2 vs text.hidden_layer -3" in warning
          and "system prompt base vs validation.system_prompt real" in warning)


def test_online_step_flops_count_the_text_encoder(encoders):
  import types
  from svg_jax.convert.gemma2 import config_from_hf_json
  from svg_jax.train import dit_task, flop_count
  config = _config("", encoders[0])
  model_cfg = config_lib.nextdit_config(config)
  text_cfg = config_from_hf_json(encoders[0], hidden_layer=-2)
  batch = {"latent": np.zeros((8, 4, 4, 8)), "text_mask": np.zeros((8, 16), bool)}
  setup = types.SimpleNamespace(model_cfg=model_cfg, config=config, text_encoder=(None, None))
  _, _, dit = dit_task.DiTSetup.batch_counts(setup, batch)
  assert dit == flop_count.dit_train_flops(model_cfg, 8, (4, 4), 16)
  setup.text_encoder = (Gemma2Encoder(text_cfg), None)
  _, _, online = dit_task.DiTSetup.batch_counts(setup, batch)
  gemma = flop_count.gemma2_forward_flops(text_cfg, 8, 16)
  assert gemma > 0 and online == dit + gemma


def test_grid_prompts_are_encoded_by_the_trainers_sharded_gemma(encoders, monkeypatch):
  """Online mode: the validation prompts go through the Gemma-2 params the trainer placed over
  its mesh (a second copy was read from disk and held whole on one device), and their features
  are transformers' hidden states of the same tokens."""
  from test_demo_text_encoder import TOL, _hf_hidden_states

  from svg_jax.train import dit_task, validation
  config = _config("", encoders[0])
  config.validation.system_prompt = "base"
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices())
  with parallel.mesh_context(mesh, config.axis_rules):
    model, params, _ = dit_task.load_text_encoder(config, mesh)
  spread = [x for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated]
  assert spread, "the text params are not split over the mesh"

  def read_again(*args, **kwargs):
    raise AssertionError("the validation loaded a second copy of the text encoder")

  monkeypatch.setattr(validation.text.convert, "load_gemma2", read_again)
  encoder = validation.grid_text_encoder(config, mesh, model, params)
  prompts = [shape_items.make_item(0, "heldout", i, 64)["prompt"] for i in range(3)]
  arrays = validation.prompt_features(encoder, prompts)
  ids, mask = encoder.tokenize(prompts, pad_to=arrays["features"].shape[1])
  ref = _hf_hidden_states(encoders[0], ids, mask)[-2]
  np.testing.assert_array_equal(arrays["mask"], mask)
  err = float(np.abs(arrays["features"] - ref)[mask].max())
  assert err <= TOL, err
