"""Torch-free checkpoint reader/writer, checked against real `torch.save` / `torch.load`."""
import argparse
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from svg_jax import assets
from svg_jax.convert.torch_pickle import (UnknownObject, UnsafeCheckpointError, load_torch_file,
                                          save_torch_file)
from svg_jax.input_errors import InputError

STATS = assets.OFFICIAL_LATENT_STATS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch dtype -> the numpy dtype our reader must produce.
NP = {
    torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16, torch.float32: np.float32,
    torch.float64: np.float64, torch.int8: np.int8, torch.int16: np.int16,
    torch.int32: np.int32, torch.int64: np.int64, torch.uint8: np.uint8, torch.bool: np.bool_,
    torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64,
    torch.complex64: np.complex64, torch.complex128: np.complex128,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn, torch.float8_e5m2: ml_dtypes.float8_e5m2,
}
NP = {k: np.dtype(v) for k, v in NP.items()}


def bits(a):
  """Flat unsigned-int view of an array's bytes (per component for complex), so NaNs compare."""
  a = np.ascontiguousarray(a).reshape(-1)
  if a.dtype == np.bool_:
    return a
  unit = a.dtype.itemsize // 2 if a.dtype.kind == 'c' else a.dtype.itemsize
  return a.view(f'u{unit}')


def torch_bits(t):
  t = t.detach().resolve_conj().resolve_neg().contiguous()
  if NP[t.dtype].itemsize <= 2 and t.dtype.is_floating_point:  # no numpy() for bf16/float8
    t = t.view(torch.uint8 if t.element_size() == 1 else torch.uint16)
  return bits(t.numpy())


def random_tensor(dtype, shape, rng):
  """Random bit patterns (NaN payloads, infs, subnormals, -0 included)."""
  if dtype == torch.bool:
    return torch.from_numpy(rng.integers(0, 2, shape).astype(bool))
  size = torch.empty((), dtype=dtype).element_size()
  raw = rng.integers(0, 256, (*shape, size), dtype=np.uint8)
  return torch.from_numpy(raw).view(dtype).reshape(shape)


def assert_same(ours, ref, where='root'):
  """Recursive bit-exact comparison of our load against torch's load of the same file."""
  if isinstance(ref, torch.Tensor):
    assert isinstance(ours, np.ndarray), where
    assert ours.shape == tuple(ref.shape) and ours.dtype == NP[ref.dtype], where
    assert ours.flags.c_contiguous and ours.flags.writeable, where  # a copy, not the file
    np.testing.assert_array_equal(bits(ours), torch_bits(ref), err_msg=where)
  elif isinstance(ref, torch.Size):
    assert type(ours) is tuple and ours == tuple(ref), where
  elif isinstance(ref, torch.dtype):
    assert ours == NP[ref], where
  elif isinstance(ref, dict):
    assert type(ours) is type(ref) and list(ours) == list(ref), where
    for k in ref:
      assert_same(ours[k], ref[k], f'{where}.{k}')
  elif isinstance(ref, (list, tuple)):
    assert type(ours) is type(ref) and len(ours) == len(ref), where
    for i, (o, r) in enumerate(zip(ours, ref)):
      assert_same(o, r, f'{where}[{i}]')
  else:
    assert type(ours) is type(ref) and ours == ref, where


def test_every_dtype_and_view_kind_bit_exact(tmp_path):
  rng = np.random.default_rng(0)
  obj = {}
  for dtype in NP:
    t = random_tensor(dtype, (4, 6), rng)
    name = str(dtype).split('.')[-1]
    obj[name] = {
        'full': t, 'transposed': t.t(), 'strided': t[1:, ::2], 'row': t[2],
        'offset': t.reshape(-1)[5:17], 'scalar': t[1, 3], 'empty': t[:, 6:],
        'broadcast': t[0, :3].expand(2, 3),  # stride 0
    }
  path = tmp_path / 'dtypes.pt'
  torch.save(obj, path)
  # Each dtype's views share one storage in the file, so offsets and strides are exercised.
  records = [n for n in zipfile.ZipFile(path).namelist() if '/data/' in n]
  assert len(records) == len(NP)
  ours = load_torch_file(path)
  assert_same(ours, torch.load(path, weights_only=True))
  assert_same(ours, obj)
  for views in ours.values():  # every result is its own copy, not a view of a shared buffer
    arrays = list(views.values())
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[:i])


def test_containers_parameters_and_plain_values(tmp_path):
  rng = np.random.default_rng(1)
  tagged = torch.randn(3)
  tagged.note = 'x'  # python attribute -> torch._tensor._rebuild_from_type_v2
  param_with_state = torch.nn.Parameter(torch.randn(2, 2))
  param_with_state.tag = 1  # -> torch._utils._rebuild_parameter_with_state
  obj = {
      'nested': [random_tensor(torch.bfloat16, (2, 3), rng),
                 (torch.arange(4), {'deep': torch.zeros(0, 3, dtype=torch.float16)})],
      'ordered': collections.OrderedDict(b=torch.tensor(1.5), a=torch.tensor([True, False])),
      'param': torch.nn.Parameter(torch.randn(3, 2)),
      'frozen': torch.nn.Parameter(torch.randn(2), requires_grad=False),
      'param_with_state': param_with_state, 'tagged': tagged,
      'size': torch.Size([2, 3]), 'dtype': torch.bfloat16, 'bytes': b'\x00\xffab',
      'int': 7, 'float': 0.25, 'str': 's', 'none': None, 'bool': True, 'set': {1, 2},
      'zero_d': torch.tensor(3, dtype=torch.int64),
  }
  path = tmp_path / 'containers.pt'
  torch.save(obj, path)
  assert_same(load_torch_file(path), torch.load(path, weights_only=False))


def test_conj_and_neg_bits(tmp_path):
  x = torch.tensor([1 + 2j, 3 - 1j, -0.5 + 0j], dtype=torch.complex64)
  for name, t in {'conj': x.conj(), 'neg': x.conj().imag}.items():
    assert t.is_conj() or t.is_neg()
    path = tmp_path / f'{name}.pt'
    torch.save({'t': t}, path)
    assert_same(load_torch_file(path), torch.load(path, weights_only=True))


def _rewrite(src, dst, replace, compression=zipfile.ZIP_STORED):
  """Copies a zip archive, replacing the records whose name ends with a key of `replace`."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w', compression) as zout:
    for info in zin.infolist():
      data = zin.read(info.filename)
      for suffix, new in replace.items():
        if info.filename.endswith(suffix):
          data = new(data) if callable(new) else new
      zout.writestr(info.filename, data)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.int64, torch.complex64,
                                   torch.bool, torch.uint16])
def test_big_endian_file(tmp_path, dtype):
  t = random_tensor(dtype, (3, 4), np.random.default_rng(2))
  torch.save({'t': t[1:]}, tmp_path / 'le.pt')
  unit = t.element_size() // (2 if dtype.is_complex else 1)
  swap = lambda b: np.frombuffer(b, f'u{unit}').byteswap().tobytes()
  _rewrite(tmp_path / 'le.pt', tmp_path / 'be.pt', {'/data/0': swap, '/byteorder': b'big'})
  assert_same(load_torch_file(tmp_path / 'be.pt'), {'t': t[1:]})
  if dtype != torch.uint16:
    # torch swaps typed storages back on load; uint16 goes through an untyped (byte) storage
    # (_rebuild_tensor_v3), which torch 2.13 leaves unswapped, so it is no reference there.
    assert_same(load_torch_file(tmp_path / 'be.pt'), torch.load(tmp_path / 'be.pt'))


def test_compressed_archive(tmp_path):
  # Re-zipped with deflate: storages cannot be viewed in place and are read instead.
  t = random_tensor(torch.bfloat16, (4, 3), np.random.default_rng(6))
  torch.save({'t': t.t(), 'u': t[2:]}, tmp_path / 'a.pt')
  _rewrite(tmp_path / 'a.pt', tmp_path / 'z.pt', {}, zipfile.ZIP_DEFLATED)
  assert zipfile.ZipFile(tmp_path / 'z.pt').infolist()[0].compress_type == zipfile.ZIP_DEFLATED
  assert_same(load_torch_file(tmp_path / 'z.pt'), {'t': t.t(), 'u': t[2:]})


def test_reads_without_torch(tmp_path):
  rng = np.random.default_rng(3)
  obj = {'w': random_tensor(torch.bfloat16, (5, 3), rng).t(), 'b': torch.randn(4)}
  torch.save(obj, tmp_path / 'x.pt')
  code = ('import json, sys; sys.modules["torch"] = None\n'  # any `import torch` now fails
          'from svg_jax.convert.torch_pickle import load_torch_file\n'
          'r = load_torch_file(sys.argv[1])\n'
          'print(json.dumps({k: [str(v.dtype), v.shape, v.view(f"u{v.itemsize}").tolist()]\n'
          '                  for k, v in r.items()}))')
  # ~0.8 s on 2 busy cores; the timeout stops a hung child long before pytest's global limit.
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'x.pt')], cwd=REPO,
                       capture_output=True, text=True, check=True, timeout=60).stdout
  got = json.loads(out)
  for k, t in obj.items():
    assert got[k][:2] == [str(NP[t.dtype]), list(t.shape)], k
    np.testing.assert_array_equal(np.array(got[k][2]).reshape(-1), torch_bits(t), err_msg=k)


# ---------------------------------------------------------------- malicious and malformed files


def _archive(path, pkl, storages=()):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', pkl)
    z.writestr('archive/byteorder', 'little')
    z.writestr('archive/version', '3\n')
    for key, data in dict(storages).items():
      z.writestr(f'archive/data/{key}', data)
  return path


def _unicode(s):
  b = s.encode()
  return b'X' + struct.pack('<I', len(b)) + b


def _short(s):
  return b'\x8c' + bytes([len(s)]) + s.encode()


def _evil_pickles(marker):
  shell = _unicode(f'touch {marker}')
  write = _unicode(f'open({str(marker)!r}, "w").write("pwned")')
  return {
      'GLOBAL os.system': b'\x80\x02cos\nsystem\n' + shell + b'\x85R.',
      'STACK_GLOBAL os.system': b'\x80\x04' + _short('os') + _short('system') + b'\x93' + shell
                                + b'\x85R.',
      'INST subprocess.call': b'((' + _unicode('sh') + _unicode('-c') + _unicode(
          f'touch {marker}') + b'lisubprocess\ncall\n.',
      'REDUCE builtins.exec': b'\x80\x02cbuiltins\nexec\n' + write + b'\x85R.',
      'REDUCE builtins.eval': b'\x80\x02cbuiltins\neval\n' + write + b'\x85R.',
  }


@pytest.mark.parametrize('kind', list(_evil_pickles('m')))
def test_malicious_pickle_refused(tmp_path, kind):
  marker = tmp_path / 'PWNED_xyz'
  pkl = _evil_pickles(marker)[kind]
  path = _archive(tmp_path / 'evil.pth', pkl)
  module_global = kind.split(' ')[1]
  with pytest.raises(UnsafeCheckpointError, match=module_global.replace('.', r'\.')) as err:
    load_torch_file(path)
  assert str(path) in str(err.value)
  assert not marker.exists()
  # Placeholders stay inert: the global is recorded, never imported or called.
  obj = load_torch_file(path, allow_unknown_objects=True)
  assert isinstance(obj, UnknownObject) and obj.global_name == module_global
  assert not marker.exists()
  # Sanity of the fixture: an unrestricted unpickler really does run it.
  pickle.loads(pkl)
  assert marker.exists()


class _Evil:

  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def test_malicious_object_inside_real_torch_save(tmp_path):
  marker = tmp_path / 'PWNED_xyz'
  path = tmp_path / 'evil.pt'
  torch.save({'w': torch.ones(2), 'evil': _Evil(f'touch {marker}')}, path)
  with pytest.raises(UnsafeCheckpointError, match=rf'{os.system.__module__}\.system'):
    load_torch_file(path)
  assert not marker.exists()


class _Call:
  """Pickles as `fn(*args)`; used to craft tensor records with chosen (bad) arguments."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


class _Ref:

  def __init__(self, pid):
    self.pid = pid


class _Pickler(pickle.Pickler):

  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, _Ref) else None


def _crafted(tmp_path, offset, size, stride, numel=4, key='0'):
  buf = io.BytesIO()
  storage = _Ref(('storage', torch.FloatStorage, key, 'cpu', numel))
  _Pickler(buf, protocol=2).dump({'t': _Call(torch._utils._rebuild_tensor_v2, storage, offset,
                                             size, stride, False, collections.OrderedDict())})
  data = np.arange(4, dtype=np.float32).tobytes()
  return _archive(tmp_path / 'crafted.pth', buf.getvalue(), {'0': data})


def test_crafted_tensor_record_matches_torch(tmp_path):
  path = _crafted(tmp_path, 1, (2,), (2,))
  assert_same(load_torch_file(path), torch.load(path, weights_only=True))
  np.testing.assert_array_equal(load_torch_file(path)['t'], [1.0, 3.0])


@pytest.mark.parametrize('offset,size,stride,numel,key,message', [
    (0, (1000,), (1,), 4, '0', 'reach element 999'),
    (2, (2, 2), (1, 1), 4, '0', 'reach element 4'),
    (0, (2,), (-1,), 4, '0', 'negative'),
    (0, (2,), (1, 1), 4, '0', 'differ in rank'),
    (0, (2,), (1,), 8, '0', 'holds 16 bytes'),
    (0, (2,), (1,), 4, '7', 'missing'),
])
def test_malformed_tensor_records(tmp_path, offset, size, stride, numel, key, message):
  path = _crafted(tmp_path, offset, size, stride, numel, key)
  with pytest.raises(pickle.UnpicklingError, match=message) as err:
    load_torch_file(path)
  assert str(path) in str(err.value)
  assert isinstance(err.value, InputError)  # the scripts' one line, not a traceback


class AttrDict(dict):
  """Dict subclass as Lightning's AttributeDict (pickled with NEWOBJ + SETITEMS)."""


def test_lightning_style_ckpt(tmp_path):
  rng = np.random.default_rng(4)
  state = collections.OrderedDict(
      (f'decoder.{n}', random_tensor(torch.float32, s, rng)) for n, s in
      [('conv_in.weight', (4, 3, 3, 3)), ('conv_in.bias', (4,)), ('norm.weight', (4,))])
  ckpt = {
      'epoch': 3, 'global_step': 1200, 'pytorch-lightning_version': '2.4.0',
      'state_dict': state,
      'hyper_parameters': {'args': argparse.Namespace(lr=1e-4, layers=[1, 2]),
                           'cfg': AttrDict(base=64)},
      'optimizer_states': [{'state': {0: {'exp_avg': torch.randn(4)}},
                            'param_groups': [{'lr': 1e-4, 'params': [0]}]}],
  }
  path = tmp_path / 'last.ckpt'
  torch.save(ckpt, path)
  with pytest.raises(UnsafeCheckpointError, match=r'argparse\.Namespace'):
    load_torch_file(path)
  ours = load_torch_file(path, allow_unknown_objects=True)
  assert_same(ours['state_dict'], state)
  assert_same(ours['optimizer_states'], ckpt['optimizer_states'])
  assert ours['epoch'] == 3 and ours['pytorch-lightning_version'] == '2.4.0'
  args, cfg = ours['hyper_parameters']['args'], ours['hyper_parameters']['cfg']
  assert args.global_name == 'argparse.Namespace'
  assert args.state == {'lr': 1e-4, 'layers': [1, 2]}
  assert cfg.global_name.endswith('.AttrDict') and cfg.items == {'base': 64}


def test_legacy_and_foreign_files(tmp_path):
  torch.save({'w': torch.ones(2)}, tmp_path / 'old.pt', _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match='legacy.*re-save'):
    load_torch_file(tmp_path / 'old.pt')
  (tmp_path / 'junk.pt').write_bytes(b'hello')
  with pytest.raises(ValueError, match='not a PyTorch checkpoint'):
    load_torch_file(tmp_path / 'junk.pt')
  with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as z:
    z.writestr('a.txt', 'x')
  with pytest.raises(ValueError, match='not a torch.save zip archive'):
    load_torch_file(tmp_path / 'other.zip')


def test_official_dinov3_stats_file():
  ours = load_torch_file(STATS)
  assert sorted(ours) == ['mean', 'std']
  assert_same(ours, torch.load(STATS, weights_only=True))
  mean, std = ours['mean'], ours['std']
  assert mean.shape == std.shape == (12, 384) and mean.dtype == std.dtype == np.float32
  np.testing.assert_allclose(
      mean[11][:6], [-0.131083, 0.010059, -0.161521, 0.037100, 0.016241, -0.107212], atol=1e-6)
  np.testing.assert_allclose(
      std[11][:6], [0.392849, 0.375289, 0.370822, 0.395598, 0.345220, 0.405549], atol=1e-6)
  np.testing.assert_allclose(mean[11].sum(dtype=np.float64), 6.76233, atol=1e-5)
  np.testing.assert_allclose(std[11].sum(dtype=np.float64), 148.42415, atol=1e-5)
  assert std[11].argmin() == 234 and std[11].argmax() == 104
  np.testing.assert_allclose([std[11].min(), std[11].max()], [0.1629, 1.5530], atol=1e-4)


# ---------------------------------------------------------------- writer


def test_writer_round_trip_through_torch_load(tmp_path):
  rng = np.random.default_rng(5)
  arrays = {}
  for tdtype, npdtype in NP.items():
    raw = rng.integers(0, 256, (3, 5 * npdtype.itemsize), dtype=np.uint8)
    a = raw.view(npdtype) if npdtype != np.bool_ else raw % 2 == 1
    arrays[str(tdtype).split('.')[-1]] = a
  arrays['transposed_view'] = arrays['float32'].T[1:]
  arrays['bf16_strided'] = arrays['bfloat16'][:, ::2]
  arrays['zero_d'] = np.array(2.5, ml_dtypes.bfloat16)
  arrays['empty'] = np.zeros((0, 4), np.float16)
  arrays['big_endian'] = arrays['float64'].astype('>f8')
  read_only = arrays['int32'].copy()
  read_only.flags.writeable = False
  arrays['read_only'] = read_only
  arrays['jax_bf16'] = jnp.linspace(-3, 3, 7, dtype=jnp.bfloat16)
  obj = {'state_dict': arrays, 'epoch': 3, 'names': ['a', 'b'],
         'ordered': collections.OrderedDict(x=np.ones(2, np.float32))}
  path = tmp_path / 'ours.pth'
  save_torch_file(path, obj)
  ref = torch.load(path, weights_only=True)
  for k, a in arrays.items():
    t = ref['state_dict'][k]
    a = np.asarray(a)
    assert NP[t.dtype] == a.dtype.newbyteorder('='), k
    assert tuple(t.shape) == a.shape, k
    np.testing.assert_array_equal(torch_bits(t), bits(a.astype(a.dtype.newbyteorder('='))),
                                  err_msg=k)
  assert ref['epoch'] == 3 and ref['names'] == ['a', 'b']
  assert type(ref['ordered']) is collections.OrderedDict
  assert_same(load_torch_file(path), ref)


def test_writer_errors(tmp_path, monkeypatch):
  with pytest.raises(TypeError, match=r'non-string keys.*\[1\]'):
    save_torch_file(tmp_path / 'a.pth', {1: np.ones(2)})
  with pytest.raises(TypeError, match=r'w\.x: cannot store a object'):
    save_torch_file(tmp_path / 'a.pth', {'w': {'x': object()}})
  with pytest.raises(TypeError, match=r'w: dtype <U1 has no torch equivalent'):
    save_torch_file(tmp_path / 'a.pth', {'w': np.array(['a'])})
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match='save_torch_file needs PyTorch'):
    save_torch_file(tmp_path / 'a.pth', {'w': np.ones(2)})
