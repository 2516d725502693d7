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
from svg_jax import parallel
from svg_jax.demo.text_encoder import ensure_demo_text_encoder
from svg_jax.models.gemma2 import Gemma2Encoder
from svg_jax.models.nextdit import NextDiT, NextDiTConfig
from svg_jax.text import TextEncoder
from svg_jax.train import dit_step, state as state_lib


def test_token_mode_equals_feature_mode(tmp_path):
  items = [shape_items.make_item(0, "train", i, 64) for i in range(40)]
  captions = [it["prompt"] for it in items]
  enc = TextEncoder.from_pretrained(ensure_demo_text_encoder(str(tmp_path / "te"), captions))
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
  params = model.init(jax.random.PRNGKey(0), latent, np.zeros(8, np.float32),
                      np.asarray(feats), mask)["params"]
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


def test_trainer_runs_the_text_encoder_on_token_id_datasets(tmp_path):
  """`launch/train.py`'s loop on a token-id dataset: Gemma-2 runs inside the step (online mode).
  The encoder the loop's setup hands the step gives transformers' hidden states of
  `text.encoder_dir` at `text.hidden_layer`. (Comparing losses with a features run would not show
  this: the DiT's zero-initialized gates leave the first steps' loss almost free of the text.)"""
  from svg_jax.data import synthetic
  from svg_jax.train import dit_task, loop, trainer

  captions = [shape_items.make_item(0, "train", i, 64)["prompt"] for i in range(20)]
  te = ensure_demo_text_encoder(str(tmp_path / "te"), captions)
  enc = TextEncoder.from_pretrained(te)
  data = str(tmp_path / "data")
  synthetic.write_random_dataset(data, buckets=((4, 4),), num_records=32, latent_channels=8,
                                 text_kind="token_ids", vocab_size=len(enc.tokenizer),
                                 caption_len=(1, 6))
  np.save(os.path.join(data, dit_task.EMPTY_TEXT_FILE), enc.tokenize([""])[0][0, :1])
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
