"""safetensors reader/writer (bf16 included) and sharded loading, against `safetensors.torch`
and the Hugging Face shard writer."""
import json
import os

import huggingface_hub
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from test_torch_pickle import bits, torch_bits  # the same bit-exact comparisons
from svg_jax.convert.safetensors_io import (load_safetensors, load_sharded_safetensors,
                                            save_safetensors)
from svg_jax.input_errors import InputError, MissingInput

NP = {
    torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16, torch.float32: np.float32,
    torch.float64: np.float64, torch.int8: np.int8, torch.int16: np.int16,
    torch.int32: np.int32, torch.int64: np.int64, torch.uint8: np.uint8, torch.bool: np.bool_,
    torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64,
    torch.complex64: np.complex64,
}
NP = {k: np.dtype(v) for k, v in NP.items()}


def random_tensors(rng):
  """One tensor per dtype with random bit patterns, plus 0-d and empty ones."""
  out = {}
  for dtype, npdtype in NP.items():
    if dtype == torch.bool:
      t = torch.from_numpy(rng.integers(0, 2, (3, 5)).astype(bool))
    else:
      raw = rng.integers(0, 256, (3, 5 * npdtype.itemsize), dtype=np.uint8)
      t = torch.from_numpy(raw).view(dtype)
    out[f'{str(dtype).split(".")[-1]}.weight'] = t
  out['scalar'] = torch.tensor(2.5, dtype=torch.bfloat16)
  out['empty'] = torch.zeros(0, 4, dtype=torch.float32)
  return out


def assert_matches_torch(ours, ref):
  assert sorted(ours) == sorted(ref)
  for k, t in ref.items():
    a = ours[k]
    assert a.dtype == NP[t.dtype] and a.shape == tuple(t.shape), k
    np.testing.assert_array_equal(bits(a), torch_bits(t), err_msg=k)


def assert_torch_equal(loaded, ref):
  assert sorted(loaded) == sorted(ref)
  for k, t in ref.items():
    assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape, k
    np.testing.assert_array_equal(torch_bits(loaded[k]), torch_bits(t), err_msg=k)


def test_reads_files_written_by_safetensors_torch(tmp_path):
  ref = random_tensors(np.random.default_rng(0))
  safetensors.torch.save_file(ref, tmp_path / 'm.safetensors')
  assert_matches_torch(load_safetensors(tmp_path / 'm.safetensors'), ref)


def test_written_files_read_by_safetensors_torch(tmp_path):
  ref = random_tensors(np.random.default_rng(1))
  arrays = {k: np.frombuffer(torch_bits(t).tobytes(), NP[t.dtype]).reshape(t.shape)
            for k, t in ref.items()}
  # Layouts the backend alone would get wrong or that need conversion.
  base = arrays['float32.weight']
  arrays['transposed'] = base.T
  arrays['strided_bf16'] = arrays['bfloat16.weight'][:, ::2]
  arrays['big_endian'] = arrays['float64.weight'].astype('>f8')
  arrays['jax_bf16'] = jnp.linspace(-2, 2, 5, dtype=jnp.bfloat16)
  ref['transposed'] = ref['float32.weight'].t()
  ref['strided_bf16'] = ref['bfloat16.weight'][:, ::2]
  ref['big_endian'] = ref['float64.weight']
  ref['jax_bf16'] = torch.linspace(-2, 2, 5, dtype=torch.bfloat16)
  save_safetensors(tmp_path / 'o.safetensors', arrays, metadata={'format': 'pt', 'who': 'us'})
  assert_torch_equal(safetensors.torch.load_file(tmp_path / 'o.safetensors'), ref)
  with safetensors.safe_open(tmp_path / 'o.safetensors', 'pt') as f:
    assert f.metadata() == {'format': 'pt', 'who': 'us'}
  assert_matches_torch(load_safetensors(tmp_path / 'o.safetensors'), ref)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.safetensors'):
    load_safetensors(tmp_path / 'nope.safetensors')
  (tmp_path / 'bad.safetensors').write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}xx')
  with pytest.raises(ValueError, match='bad.safetensors: not a valid safetensors file'):
    load_safetensors(tmp_path / 'bad.safetensors')
  safetensors.torch.save_file({'q': torch.ones(2).to(torch.float8_e4m3fn), 'w': torch.ones(1)},
                              tmp_path / 'f8.safetensors')
  with pytest.raises(ValueError, match="'q': 'F8_E4M3'"):
    load_safetensors(tmp_path / 'f8.safetensors')
  with pytest.raises(TypeError, match="unsupported dtypes {'q': 'float8_e4m3fn'}"):
    save_safetensors(tmp_path / 'x.safetensors', {'q': np.ones(2, ml_dtypes.float8_e4m3fn)})
  with pytest.raises(TypeError, match='names must be str'):
    save_safetensors(tmp_path / 'x.safetensors', {1: np.ones(2)})
  with pytest.raises(TypeError, match='metadata must be a dict of str -> str'):
    save_safetensors(tmp_path / 'x.safetensors', {'a': np.ones(2)}, metadata={'step': 3})


def _hf_sharded(tmp_path, rng):
  state = {f'layers.{i}.w': torch.from_numpy(rng.standard_normal((64, 32), np.float32))
           .to(torch.bfloat16) for i in range(5)}
  state['norm.b'] = torch.randn(32)
  huggingface_hub.save_torch_state_dict(state, tmp_path, max_shard_size='10KB')
  return state


def test_sharded_checkpoint_from_hf_writer(tmp_path):
  state = _hf_sharded(tmp_path, np.random.default_rng(2))
  index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 1  # really sharded
  assert_matches_torch(load_sharded_safetensors(tmp_path), state)
  assert_matches_torch(load_sharded_safetensors(tmp_path / 'model.safetensors.index.json'), state)


def test_single_file_and_diffusers_names(tmp_path):
  ref = {'a': torch.randn(3, 2), 'b': torch.randn(4).to(torch.bfloat16)}
  (tmp_path / 'single').mkdir()
  safetensors.torch.save_file(ref, tmp_path / 'single' / 'model.safetensors')
  assert_matches_torch(load_sharded_safetensors(tmp_path / 'single'), ref)
  (tmp_path / 'diffusers').mkdir()
  safetensors.torch.save_file(ref, tmp_path / 'diffusers' / 'diffusion_pytorch_model.safetensors')
  assert_matches_torch(load_sharded_safetensors(tmp_path / 'diffusers'), ref)
  assert_matches_torch(
      load_sharded_safetensors(tmp_path / 'diffusers' / 'diffusion_pytorch_model.safetensors'), ref)


def test_sharded_errors(tmp_path):
  _hf_sharded(tmp_path, np.random.default_rng(3))
  index_path = tmp_path / 'model.safetensors.index.json'
  index = json.loads(index_path.read_text())
  shards = sorted(set(index['weight_map'].values()))
  # A key the index promises but its shard lacks, and one the shard holds unannounced.
  moved = dict(index, weight_map=dict(index['weight_map'], **{'extra.w': shards[0]}))
  index_path.write_text(json.dumps(moved))
  with pytest.raises(ValueError, match=r"missing keys \['extra.w'\]"):
    load_sharded_safetensors(tmp_path)
  dropped = {k: v for k, v in index['weight_map'].items() if k != 'norm.b'}
  index_path.write_text(json.dumps(dict(index, weight_map=dropped)))
  with pytest.raises(ValueError, match=r"unexpected keys \['norm.b'\]"):
    load_sharded_safetensors(tmp_path)
  index_path.write_text(json.dumps(index))
  os.remove(tmp_path / shards[-1])
  with pytest.raises(FileNotFoundError, match=f'missing shard files.*{shards[-1]}'):
    load_sharded_safetensors(tmp_path)
  index_path.write_text('{"metadata": {}}')
  with pytest.raises(ValueError, match='no "weight_map"'):
    load_sharded_safetensors(index_path)
  index_path.write_text('{"weight_map": ')
  with pytest.raises(InputError, match='model.safetensors.index.json: not a safetensors index'):
    load_sharded_safetensors(tmp_path)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(MissingInput, match='empty is a folder but not a Hugging Face model folder'):
    load_sharded_safetensors(tmp_path / 'empty')
  with pytest.raises(MissingInput, match='no such'):
    load_sharded_safetensors(tmp_path / 'absent')


def test_a_folder_without_weights_is_bad_input_naming_it(tmp_path):
  """A folder of other files (images, a DINOv3 .pth) is not a model folder: one line that names
  the folder, what it should hold and what it holds, still a FileNotFoundError for callers."""
  for name in ('cat.png', 'dinov3.pth', 'config.json'):
    (tmp_path / name).write_bytes(b'x')
  with pytest.raises(MissingInput) as e:
    load_sharded_safetensors(tmp_path)
  message = str(e.value)
  assert isinstance(e.value, InputError) and isinstance(e.value, FileNotFoundError)
  assert '\n' not in message
  assert message.startswith(f'{tmp_path} is a folder but not a Hugging Face model folder')
  for fragment in ('model.safetensors.index.json', "'cat.png'", "'dinov3.pth'", '3 entries'):
    assert fragment in message, message


def test_converted_files_readable_as_open_makes_them(tmp_path):
  """safetensors creates its files for their owner only; what the converters write through the
  atomic writer gets the mode a plain `open` gives, so others on shared storage can read it."""
  from svg_jax.convert import weights_io
  weights_io.atomic_write(tmp_path / "w.safetensors",
                          lambda tmp: save_safetensors(tmp, {"a": np.zeros(3, np.float32)}))
  (tmp_path / "plain").write_bytes(b"")
  mode = os.stat(tmp_path / "w.safetensors").st_mode & 0o777
  assert mode == os.stat(tmp_path / "plain").st_mode & 0o777, oct(mode)
  assert set(load_safetensors(tmp_path / "w.safetensors")) == {"a"}
