"""svg_jax.text: system prompts, tokenization rules against the HF tokenizer call, TextEncoder.

The tokenizer is the demo's Gemma-style one (a sentencepiece model converted by transformers into
its GemmaTokenizer); no real Gemma tokenizer can be downloaded here. Our `tokenize` pads itself, so
comparing it with the official call `tok(texts, padding=True, pad_to_multiple_of=8,
truncation=True, max_length=...)` checks our padding and truncation against transformers'.
"""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from svg_jax import text
from svg_jax.demo import shapes
from svg_jax.demo import text_encoder as demo_text_encoder
from svg_jax.models.gemma2 import Gemma2Config, Gemma2Encoder

CAPTIONS = [shapes.item_spec(0, "train", i, 64)["prompt"] for i in range(60)]
BATCH = [
    CAPTIONS[0],
    "",
    CAPTIONS[7] + ", on a grey background with a soft shadow under every shape",
    "a photo of 3 Zebras \u00fcber  double  spaces ",  # unseen words, digits, non-ASCII
    CAPTIONS[2],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tok"))
  demo_text_encoder.write_demo_tokenizer(folder, CAPTIONS, vocab_size=400)
  return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
  return text.load_tokenizer(tok_dir)


def _official(tok, texts, max_length):
  """The official encode_prompt's tokenizer call."""
  out = tok(texts, padding=True, pad_to_multiple_of=8, max_length=max_length, truncation=True,
            return_tensors="np")
  return out["input_ids"], out["attention_mask"]


def test_system_prompts():
  assert text.system_prompt("base") == text.BASE_SYSTEM_PROMPT
  assert text.system_prompt("empty") == ""
  for name in ("base", "align", "aesthetics", "real", "4grid"):
    p = text.system_prompt(name)
    assert p.startswith("You are an assistant designed to generate ")
    assert p.endswith(" <Prompt Start> ")  # the caption follows with no separator
  assert "highest degree of image-text alignment" in text.SUPER_HIGH_QUALITY_SYSTEM_PROMPT
  assert len(set(text.SYSTEM_PROMPTS.values())) == len(text.SYSTEM_PROMPTS)
  with pytest.raises(ValueError, match="enhance.*not implemented"):
    text.system_prompt("enhance")
  with pytest.raises(ValueError, match="unknown system_type 'fancy'"):
    text.system_prompt("fancy")


def test_training_caption_picks_variant():
  assert text.training_caption({"path": "a.png", "prompt": "a cat"}) == (
      "a cat", text.BASE_SYSTEM_PROMPT)
  item = {"image_path": "a.png", "super_high_quality_caption": "a dog", "prompt": "x"}
  assert text.training_caption(item) == ("a dog", text.SUPER_HIGH_QUALITY_SYSTEM_PROMPT)
  with pytest.raises(ValueError, match="neither"):
    text.training_caption({"path": "a.png"})


def test_with_system_prompt():
  assert text.with_system_prompt("a cat", "SYS ") == "SYS a cat"
  assert text.with_system_prompt("", "SYS ") == ""
  with pytest.raises(TypeError, match="caption must be a str"):
    text.with_system_prompt(None, "SYS ")


def test_load_tokenizer(tok, tok_dir):
  assert tok.padding_side == "right"  # GemmaTokenizer's own default is left
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    text.load_tokenizer(os.path.join(tok_dir, "nope"))


def test_load_tokenizer_refuses_missing_bos(tok_dir, tmp_path):
  # A tokenizer whose post-processor does not add <bos> (Gemma features need it).
  folder = str(tmp_path / "nobos")
  shutil.copytree(tok_dir, folder)
  path = os.path.join(folder, "tokenizer.json")
  with open(path) as f:
    spec = json.load(f)
  assert spec["post_processor"]["type"] == "TemplateProcessing"
  spec["post_processor"] = None
  with open(path, "w") as f:
    json.dump(spec, f)
  with pytest.raises(ValueError, match="must add <bos>"):
    text.load_tokenizer(folder)


@pytest.mark.parametrize("max_length", [512, 256, 40, 16, 8])
@pytest.mark.parametrize("prompt", ["base", "empty"])
def test_tokenize_matches_hf_call(tok, max_length, prompt):
  sys_prompt = text.system_prompt(prompt)
  ids, mask = text.tokenize(tok, BATCH, sys_prompt, max_length)
  texts = [c if c == "" else sys_prompt + c for c in BATCH]
  ref_ids, ref_mask = _official(tok, texts, max_length)
  assert ids.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask.astype(bool))
  assert ids.shape[1] % 8 == 0
  lengths = mask.sum(1)
  assert lengths.max() <= max_length
  assert ids.shape[1] == -(-lengths.max() // 8) * 8  # longest, rounded up to a multiple of 8
  # Right padding: valid tokens first, then the pad id.
  for row, n in enumerate(lengths):
    assert mask[row, :n].all() and not mask[row, n:].any()
    assert (ids[row, n:] == tok.pad_token_id).all()


def test_empty_prompt_is_bos_only(tok):
  ids, mask = text.tokenize(tok, ["", CAPTIONS[1]], text.BASE_SYSTEM_PROMPT, 256)
  assert mask[0].sum() == 1 and ids[0, 0] == tok.bos_token_id
  assert (ids[0, 1:] == tok.pad_token_id).all()
  ids, mask = text.tokenize(tok, [""], text.BASE_SYSTEM_PROMPT, 256)
  assert ids.shape == (1, 8) and mask.sum() == 1  # alone it pads to one multiple of 8


def test_system_prompt_only_for_non_empty(tok):
  ids, mask = text.tokenize(tok, [CAPTIONS[3], ""], text.BASE_SYSTEM_PROMPT, 512)
  expected = tok(text.BASE_SYSTEM_PROMPT + CAPTIONS[3])["input_ids"]
  assert expected[0] == tok.bos_token_id and tok.bos_token_id not in expected[1:]
  assert ids[0, :mask[0].sum()].tolist() == expected
  assert ids[1, :mask[1].sum()].tolist() == [tok.bos_token_id]
  prompt_ids = tok(text.BASE_SYSTEM_PROMPT)["input_ids"]
  assert expected[:len(prompt_ids) - 1] == prompt_ids[:-1]  # the prompt comes first


def test_truncation_keeps_bos_and_prefix(tok):
  ids, mask = text.tokenize(tok, [CAPTIONS[0], ""], text.BASE_SYSTEM_PROMPT, 16)
  full = tok(text.BASE_SYSTEM_PROMPT + CAPTIONS[0])["input_ids"]
  assert len(full) > 16
  assert ids.shape == (2, 16) and mask[0].sum() == 16 and mask[1].sum() == 1
  assert ids[0].tolist() == full[:16]


def test_pad_to(tok):
  ids, mask = text.tokenize(tok, BATCH, text.BASE_SYSTEM_PROMPT, 256)
  ids2, mask2 = text.tokenize(tok, BATCH, text.BASE_SYSTEM_PROMPT, 256, pad_to=96)
  assert ids2.shape == (len(BATCH), 96)
  np.testing.assert_array_equal(ids2[:, :ids.shape[1]], ids)
  np.testing.assert_array_equal(mask2[:, :ids.shape[1]], mask)
  assert not mask2[:, ids.shape[1]:].any()
  with pytest.raises(ValueError, match="pad_to=8 is shorter"):
    text.tokenize(tok, BATCH, text.BASE_SYSTEM_PROMPT, 256, pad_to=8)


def test_max_length_must_be_multiple_of_8(tok):
  # transformers refuses the same combination in the official call.
  with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
    _official(tok, BATCH, 33)
  with pytest.raises(ValueError, match="max_length 33 is not a multiple of pad_multiple 8"):
    text.tokenize(tok, BATCH, text.BASE_SYSTEM_PROMPT, 33)


def test_tokenize_bad_input(tok):
  with pytest.raises(ValueError, match="at least one caption"):
    text.tokenize(tok, [], text.BASE_SYSTEM_PROMPT, 256)
  with pytest.raises(TypeError, match="single str"):
    text.tokenize(tok, "a cat", text.BASE_SYSTEM_PROMPT, 256)
  with pytest.raises(TypeError, match="caption must be a str"):
    text.tokenize(tok, ["a cat", 3], text.BASE_SYSTEM_PROMPT, 256)


def _small_encoder(tok, feature_dtype="float32"):
  cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, num_layers=3, num_heads=2,
                     num_kv_heads=1, head_dim=16, intermediate_size=64, query_pre_attn_scalar=16,
                     sliding_window=16)
  import jax
  params = Gemma2Encoder(cfg).init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32),
                                   jnp.ones((1, 8), jnp.int32))["params"]
  return text.TextEncoder(cfg, params, tok, max_length=256, feature_dtype=feature_dtype)


def test_text_encoder_padding_invariance(tok):
  enc = _small_encoder(tok)
  feats, lengths = enc(BATCH)
  _, mask = enc.tokenize(BATCH)
  assert feats.shape == (len(BATCH), mask.shape[1], 32) and feats.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(lengths), mask.sum(1))
  assert not np.asarray(feats)[~mask].any()  # padding is zeroed
  # A caption's features do not depend on the batch it is padded with (right padding + masks).
  for row, caption in enumerate(BATCH):
    alone, n = enc([caption])
    n = int(n[0])
    np.testing.assert_allclose(np.asarray(alone)[0, :n], np.asarray(feats)[row, :n], atol=1e-5)
  empty, n = enc([text.UNCONDITIONAL])
  assert empty.shape == (1, 8, 32) and int(n[0]) == 1
  np.testing.assert_allclose(np.asarray(empty)[0, 0], np.asarray(feats)[1, 0], atol=1e-5)


def test_text_encoder_bf16_features(tok):
  f32, _ = _small_encoder(tok)(BATCH[:2])
  bf16, _ = _small_encoder(tok, "bfloat16")(BATCH[:2])
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(bf16), np.asarray(f32.astype(jnp.bfloat16)))
  with pytest.raises(ValueError, match="feature_dtype"):
    _small_encoder(tok, "float16")
