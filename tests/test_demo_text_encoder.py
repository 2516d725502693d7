"""The demo text encoder folder: loads like real Gemma-2 files, matches transformers, deterministic.

References nobody here wrote: transformers' Gemma2Model / Gemma2Config / AutoTokenizer read the
folder, and sentencepiece itself encodes with the trained `tokenizer.model`.
"""
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers

from svg_jax import generate, text
from svg_jax.convert import gemma2 as convert
from svg_jax.demo import shapes
from svg_jax.demo import text_encoder as demo

TOL = 1e-4
CAPTIONS = ([shapes.item_spec(0, "train", i, 64)["prompt"] for i in range(240)]
            + [shapes.item_spec(0, "heldout", i, 64)["prompt"] for i in range(60)])
FILES = {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
         "tokenizer_config.json", demo.MARKER}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return demo.ensure_demo_text_encoder(str(tmp_path_factory.mktemp("demo") / "enc"), CAPTIONS,
                                       seed=0)


def _hf_hidden_states(folder, ids, mask):
  model, info = transformers.Gemma2Model.from_pretrained(
      folder, attn_implementation="eager", output_loading_info=True)
  assert not any(info.values()), info  # no missing / unexpected / mismatched keys
  model.eval()
  assert model.config._attn_implementation == "eager"
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def test_folder_loads_like_real_weights(folder):
  assert set(os.listdir(folder)) == FILES
  assert not [n for n in os.listdir(os.path.dirname(folder)) if ".tmp-" in n]
  tok = text.load_tokenizer(folder)
  cfg = convert.config_from_hf_json(folder)
  params = convert.load_gemma2(folder, cfg)  # the full key set, as a real checkpoint
  assert cfg.vocab_size == len(tok) == params["embed_tokens"].shape[0]
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      128, 4, 4, 2, 32)
  hf = transformers.Gemma2Config.from_pretrained(folder)
  for ours, theirs in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                       ("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads"),
                       ("num_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
                       ("intermediate_size", "intermediate_size"),
                       ("query_pre_attn_scalar", "query_pre_attn_scalar"),
                       ("sliding_window", "sliding_window"),
                       ("attn_logit_softcapping", "attn_logit_softcapping")):
    assert getattr(cfg, ours) == getattr(hf, theirs), ours
  assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (
      tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
  # The norms were given random offsets, so (1 + w) is exercised by the parity test below.
  assert np.abs(params["layers_0"]["input_layernorm"]["weight"]).max() > 0.05


@pytest.mark.parametrize("hidden_layer", [-2, -1])
def test_features_match_transformers(folder, hidden_layer):
  enc = text.TextEncoder.from_pretrained(folder, hidden_layer=hidden_layer, max_length=256)
  batch = [CAPTIONS[0], "", CAPTIONS[5] + " and " + CAPTIONS[9], CAPTIONS[250]]
  ids, mask = enc.tokenize(batch)
  feats, lengths = enc.encode_tokens(ids, mask)
  ref = _hf_hidden_states(folder, ids, mask)[hidden_layer]
  err = float(np.abs(np.asarray(feats) - ref)[mask].max())
  print(f"hidden_states[{hidden_layer}] max abs err {err:.2e} (max |ref| {np.abs(ref).max():.2f})")
  assert err <= TOL
  np.testing.assert_array_equal(np.asarray(lengths), mask.sum(1))
  assert mask[1].sum() == 1 and ids[1, 0] == enc.tokenizer.bos_token_id

  # "" as the sampler's negative prompt (generate.Generator._uncond): <bos> alone
  empty, empty_mask = generate.encode_prompts(enc, [text.UNCONDITIONAL], 8)
  ref_empty = _hf_hidden_states(folder, ids[1:2, :8], mask[1:2, :8])[hidden_layer]
  assert int(empty_mask.sum()) == 1
  assert float(np.abs(np.asarray(empty)[0, 0] - ref_empty[0, 0]).max()) <= TOL


def test_tokenizer_round_trip(folder):
  tok = text.load_tokenizer(folder)
  sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
  assert sp.get_piece_size() == len(tok)
  texts = sorted(set(CAPTIONS))
  for prompt in ("base", "align", "4grid"):
    texts += [text.system_prompt(prompt) + c for c in CAPTIONS[:12]]
  pieces = 0
  for t in texts:
    ids = tok(t)["input_ids"]
    assert tok.unk_token_id not in ids, t
    assert ids == [tok.bos_token_id] + sp.encode(t), t  # transformers' conversion is faithful
    assert tok.decode(ids, skip_special_tokens=True) == t
    pieces += len(ids)
  # Not spelled out in bytes: common caption words are single pieces.
  assert pieces / sum(len(t) for t in texts) < 0.3
  assert len(tok("a photo of a red circle")["input_ids"]) <= 8


def test_deterministic(folder, tmp_path):
  same = demo.ensure_demo_text_encoder(str(tmp_path / "same"), list(reversed(CAPTIONS)), seed=0)
  other = demo.ensure_demo_text_encoder(str(tmp_path / "other"), CAPTIONS, seed=1)
  for name in sorted(FILES):
    with open(os.path.join(folder, name), "rb") as f:
      ref = f.read()
    with open(os.path.join(same, name), "rb") as f:
      assert f.read() == ref, name
    with open(os.path.join(other, name), "rb") as f:
      # The seed only draws the weights; the tokenizer depends on the captions alone.
      assert (f.read() == ref) == (name not in ("model.safetensors", demo.MARKER)), name


def test_idempotent_and_refuses_mismatch(folder, tmp_path):
  stamp = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in FILES}
  assert demo.ensure_demo_text_encoder(folder, CAPTIONS, seed=0) == folder
  assert stamp == {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in FILES}
  with pytest.raises(ValueError, match=r"built differently \(differs in \['seed'\]\)"):
    demo.ensure_demo_text_encoder(folder, CAPTIONS, seed=1)
  with pytest.raises(ValueError, match="captions_sha256"):
    demo.ensure_demo_text_encoder(folder, CAPTIONS[:10], seed=0)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  with pytest.raises(ValueError, match="not a demo text encoder"):
    demo.ensure_demo_text_encoder(str(foreign), CAPTIONS, seed=0)
  with pytest.raises(ValueError, match="no non-empty captions"):
    demo.ensure_demo_text_encoder(str(tmp_path / "none"), ["", ""], seed=0)
  assert not (tmp_path / "none").exists()
  with open(os.path.join(folder, demo.MARKER)) as f:
    assert json.load(f)["seed"] == 0


def test_a_marker_from_before_weight_kinds_is_a_random_encoder(folder, tmp_path):
  old = tmp_path / "old"
  old.mkdir()
  with open(os.path.join(folder, demo.MARKER)) as f:
    marker = json.load(f)
  del marker["spec"]["weights"]  # as the demo wrote it before it had weight kinds
  with open(old / demo.MARKER, "w") as f:
    json.dump(marker, f)
  assert demo.ensure_demo_text_encoder(str(old), CAPTIONS, seed=0) == str(old)
  with pytest.raises(demo.BuiltDifferently, match=r"differs in \['spec'\]"):
    demo.ensure_demo_text_encoder(str(old), CAPTIONS, seed=0,
                                  spec=demo.DemoSpec(weights="word_context"))


@pytest.fixture(scope="module")
def context_folder(tmp_path_factory):
  return demo.ensure_demo_text_encoder(str(tmp_path_factory.mktemp("demo") / "context"), CAPTIONS,
                                       seed=0, spec=demo.DemoSpec(weights="word_context"))


def test_word_context_weights_give_each_token_its_word_and_the_previous_one(context_folder):
  """Read by transformers, the constructed checkpoint's hidden_states[-2] at token t is
  [word vector of t, 1, word vector of t - 1, 1], the word vectors taken from its embedding table
  (Gemma's sqrt(hidden) scaling applied); our encoder gives the same features."""
  enc = text.TextEncoder.from_pretrained(context_folder, max_length=256)
  batch = [CAPTIONS[3], CAPTIONS[7] + " and " + CAPTIONS[11], CAPTIONS[260], ""]
  ids, mask = enc.tokenize(batch)
  ref = _hf_hidden_states(context_folder, ids, mask)[-2]
  model = transformers.Gemma2Model.from_pretrained(context_folder)
  table = model.embed_tokens.weight.detach().numpy() * np.sqrt(model.config.hidden_size)
  half = table.shape[1] // 2
  words = table[:, :half - 1]
  for row in range(len(batch)):
    for t in np.flatnonzero(mask[row]):
      previous = ids[row, t - 1] if t else ids[row, 0]  # <bos> can only attend to itself
      expected = np.concatenate([words[ids[row, t]], [1.0], words[previous], [1.0]])
      np.testing.assert_allclose(ref[row, t], expected, atol=2e-3, err_msg=f"{row}, {t}")
  feats, _ = enc.encode_tokens(ids, mask)
  assert float(np.abs(np.asarray(feats) - ref)[mask].max()) <= TOL
  # Distinct words stay apart (the random init puts "red" and "blue" at cosine 0.77).
  red, blue = (words[enc.tokenizer.convert_tokens_to_ids(w)] for w in ("▁red", "▁blue"))
  assert abs(float(red @ blue)) < 0.5


def test_word_context_weights_refuse_other_shapes_and_unknown_kinds(tmp_path):
  cfg = demo.model_config(demo.DemoSpec(num_kv_heads=1), 64)
  with pytest.raises(ValueError, match="num_kv_heads x head_dim"):
    demo.word_context_params(cfg, 0)
  with pytest.raises(ValueError, match="unknown demo text encoder weights"):
    demo.ensure_demo_text_encoder(str(tmp_path / "x"), CAPTIONS, seed=0,
                                  spec=demo.DemoSpec(weights="trained"))
  assert not (tmp_path / "x").exists()
