"""Read PyTorch checkpoints without torch, and write ones that torch loads.

`load_torch_file` parses the zip format that `torch.save` writes (default since torch 1.6):
`<archive>/data.pkl` (a pickle whose tensors point at storages through persistent ids),
`<archive>/data/<key>` (raw storage bytes) and `<archive>/byteorder`. Tensors come back as
C-contiguous numpy arrays (bf16 and float8 through `ml_dtypes`).

The pickle is read by a restricted unpickler: `find_class` admits only the globals that tensor
reconstruction needs and maps each to a function of this module, so nothing named in the file is
imported or run. Any other global raises `UnsafeCheckpointError`, unless the caller passes
`allow_unknown_objects=True` (Lightning `.ckpt` files keep arbitrary classes in
`hyper_parameters`); then it becomes an inert `UnknownObject` that only records its arguments.
"""
import collections
import io
import mmap
import os
import pickle
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np

from svg_jax.input_errors import InputError

__all__ = ['DamagedCheckpoint', 'UnsafeCheckpointError', 'UnknownObject', 'load_torch_file',
           'save_torch_file']


class UnsafeCheckpointError(pickle.UnpicklingError, InputError):
  """The checkpoint's pickle names a global that is not needed to rebuild tensors."""


class DamagedCheckpoint(pickle.UnpicklingError, InputError):
  """A torch checkpoint whose records cannot be read: truncated, corrupt or inconsistent."""


# torch dtype name (as pickled: `torch.<name>`) -> numpy dtype.
_DTYPES = {
    'float16': np.dtype(np.float16), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
    'float32': np.dtype(np.float32), 'float64': np.dtype(np.float64),
    'int8': np.dtype(np.int8), 'int16': np.dtype(np.int16),
    'int32': np.dtype(np.int32), 'int64': np.dtype(np.int64),
    'uint8': np.dtype(np.uint8), 'uint16': np.dtype(np.uint16),
    'uint32': np.dtype(np.uint32), 'uint64': np.dtype(np.uint64), 'bool': np.dtype(np.bool_),
    'complex64': np.dtype(np.complex64), 'complex128': np.dtype(np.complex128),
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn),
    'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
    'float8_e4m3fnuz': np.dtype(ml_dtypes.float8_e4m3fnuz),
    'float8_e5m2fnuz': np.dtype(ml_dtypes.float8_e5m2fnuz),
}
# Typed storage classes (`torch.FloatStorage`, ...) that carry the dtype of `_rebuild_tensor_v2`.
_STORAGE_DTYPES = {
    'HalfStorage': 'float16', 'BFloat16Storage': 'bfloat16', 'FloatStorage': 'float32',
    'DoubleStorage': 'float64', 'CharStorage': 'int8', 'ShortStorage': 'int16',
    'IntStorage': 'int32', 'LongStorage': 'int64', 'ByteStorage': 'uint8', 'BoolStorage': 'bool',
    'ComplexFloatStorage': 'complex64', 'ComplexDoubleStorage': 'complex128',
}


class _StorageType:
  """Stand-in for a torch storage class; `dtype` None means an untyped (byte) storage."""

  def __init__(self, name, dtype):
    self.name, self.dtype = name, dtype


class _Storage:
  """Raw bytes of one storage (native byte order) and the dtype the pickle declared."""

  def __init__(self, key, data, dtype):
    self.key, self.data, self.dtype = key, data, dtype


_TORCH_TENSOR = object()  # stands for the class `torch.Tensor` in `_rebuild_from_type_v2`


class UnknownObject:
  """Inert placeholder for a global that the checkpoint names but that is not admitted.

  Nothing is imported or called: the placeholder records the global's name (`global_name`) and
  whatever the pickle hands it: call/`__new__` arguments (`args`, `kwargs`), `state` (BUILD),
  `items` (dict-style SETITEMS) and `list_items` (list-style APPENDS).
  """
  global_name = '?'

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items, obj.list_items = args, kwargs, None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs  # recorded by __new__

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list_items.append(value)

  def extend(self, values):
    self.list_items.extend(values)

  def __repr__(self):
    parts = [repr(a) for a in self.args] + [f'{k}={v!r}' for k, v in self.kwargs.items()]
    extra = ''.join(f', {n}={getattr(self, n)!r}' for n in ('state', 'items', 'list_items')
                    if getattr(self, n))
    return f'<unknown {self.global_name}({", ".join(parts)}){extra}>'


def _torch_size(dims=()):
  return tuple(_as_int(d, 'torch.Size entry') for d in dims)


def _codecs_encode(obj, encoding='utf-8'):
  # Protocol-2 pickles store `bytes` as _codecs.encode(str, 'latin1').
  if not isinstance(obj, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
    raise pickle.UnpicklingError(f'unexpected _codecs.encode arguments {type(obj)} {encoding!r}')
  return obj.encode(encoding)


def _as_int(x, what):
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
    raise pickle.UnpicklingError(f'{what} must be an int, got {x!r}')
  return int(x)


class _Unpickler(pickle.Unpickler):
  """Restricted unpickler; storages are read lazily from the archive by key."""

  def __init__(self, data, *, path, zf, prefix, mm, byteorder, allow_unknown):
    super().__init__(io.BytesIO(data))
    self.path, self.zf, self.prefix, self.mm = path, zf, prefix, mm
    self.byteorder, self.allow_unknown = byteorder, allow_unknown
    self.raw = {}  # storage key -> uint8 array of its bytes (a view of the mmap when stored)
    self.placeholders = {}
    self.rebuilders = {self.rebuild_tensor_v2, self.rebuild_tensor_v3}
    self.admitted = {
        ('torch._utils', '_rebuild_tensor_v2'): self.rebuild_tensor_v2,
        ('torch._utils', '_rebuild_tensor_v3'): self.rebuild_tensor_v3,
        ('torch._utils', '_rebuild_parameter'): self.rebuild_parameter,
        ('torch._utils', '_rebuild_parameter_with_state'): self.rebuild_parameter,
        ('torch._tensor', '_rebuild_from_type_v2'): self.rebuild_from_type_v2,
        ('torch', 'Tensor'): _TORCH_TENSOR,
        ('torch', 'Size'): _torch_size,
        ('torch', 'UntypedStorage'): _StorageType('UntypedStorage', None),
        ('torch.storage', 'UntypedStorage'): _StorageType('UntypedStorage', None),
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('_codecs', 'encode'): _codecs_encode,
    }
    # Protocol-2 pickles spell the builtins module `__builtin__`.
    for module in ('builtins', '__builtin__'):
      for kind in (set, frozenset, bytearray, complex):
        self.admitted[module, kind.__name__] = kind
    for name, dtype in _STORAGE_DTYPES.items():
      self.admitted['torch', name] = _StorageType(name, _DTYPES[dtype])
    for name, dtype in _DTYPES.items():
      self.admitted['torch', name] = dtype

  def find_class(self, module, name):
    found = self.admitted.get((module, name))
    if found is not None:
      return found
    full = f'{module}.{name}'
    if not self.allow_unknown:
      raise UnsafeCheckpointError(
          f'{self.path}: the checkpoint references the global {full!r}, which is not needed to '
          'rebuild tensors; refusing to load it (a pickled module or object, not a state dict: '
          'save `model.state_dict()` instead; in Python, load_torch_file(..., '
          'allow_unknown_objects=True) reads it with inert placeholders).')
    if full not in self.placeholders:
      self.placeholders[full] = type('UnknownObject', (UnknownObject,), {'global_name': full})
    return self.placeholders[full]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'{self.path}: unsupported persistent id {pid!r}')
    _, stype, key, _, numel = pid
    if not isinstance(stype, _StorageType):
      name = getattr(stype, 'global_name', stype)
      raise pickle.UnpicklingError(f'{self.path}: unsupported storage type {name!r}')
    numel = _as_int(numel, 'storage size')
    raw = self.read_storage(key)
    itemsize = 1 if stype.dtype is None else stype.dtype.itemsize
    if raw.size != numel * itemsize:
      raise pickle.UnpicklingError(
          f'{self.path}: storage {key!r} holds {raw.size} bytes but the pickle declares '
          f'{numel} elements of {stype.name} ({numel * itemsize} bytes)')
    return _Storage(key, raw, stype.dtype)

  def read_storage(self, key):
    if key not in self.raw:
      name = f'{self.prefix}data/{key}'
      try:
        info = self.zf.getinfo(name)
      except (KeyError, TypeError):
        raise pickle.UnpicklingError(f'{self.path}: storage record {name!r} is missing') from None
      if self.mm is not None and info.compress_type == zipfile.ZIP_STORED:
        # Uncompressed entry: view it in place (local header is 30 bytes + name + extra).
        hdr = self.mm[info.header_offset:info.header_offset + 30]
        if hdr[:4] != b'PK\x03\x04':
          raise pickle.UnpicklingError(f'{self.path}: corrupt zip header for {name!r}')
        n, e = struct.unpack('<HH', hdr[26:30])
        start = info.header_offset + 30 + n + e
        self.raw[key] = np.frombuffer(self.mm, np.uint8, count=info.file_size, offset=start)
      else:
        self.raw[key] = np.frombuffer(self.zf.read(name), np.uint8)
    return self.raw[key]

  def rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                        backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks  # autograd state has no meaning for numpy arrays
    if not isinstance(storage, _Storage) or storage.dtype is None:
      raise pickle.UnpicklingError(f'{self.path}: _rebuild_tensor_v2 needs a typed storage')
    return self.make_array(storage, storage.dtype, offset, size, stride, metadata)

  def rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks,
                        dtype, metadata=None):
    del requires_grad, backward_hooks
    if not isinstance(storage, _Storage) or not isinstance(dtype, np.dtype):
      raise pickle.UnpicklingError(f'{self.path}: bad _rebuild_tensor_v3 arguments')
    return self.make_array(storage, dtype, offset, size, stride, metadata)

  def rebuild_parameter(self, data, requires_grad, backward_hooks, state=None):
    del requires_grad, backward_hooks, state  # a Parameter is its data here
    if not isinstance(data, np.ndarray):
      raise pickle.UnpicklingError(f'{self.path}: parameter data is not a tensor')
    return data

  def rebuild_from_type_v2(self, func, new_type, args, state):
    del state  # python attributes set on a tensor
    if func not in self.rebuilders or new_type is not _TORCH_TENSOR:
      raise pickle.UnpicklingError(f'{self.path}: unsupported tensor subclass reconstruction')
    return func(*args)

  def make_array(self, storage, dtype, offset, size, stride, metadata):
    offset = _as_int(offset, 'storage offset')
    size = tuple(_as_int(s, 'tensor size') for s in size)
    stride = tuple(_as_int(s, 'tensor stride') for s in stride)
    where = f'{self.path}: tensor on storage {storage.key!r}'
    if len(size) != len(stride):
      raise pickle.UnpicklingError(f'{where}: size {size} and stride {stride} differ in rank')
    if storage.data.size % dtype.itemsize:
      raise pickle.UnpicklingError(f'{where}: storage is not a whole number of {dtype}')
    if min(size + stride + (offset,), default=0) < 0:
      raise pickle.UnpicklingError(f'{where}: negative size, stride or offset')
    if 0 in size:
      return np.zeros(size, dtype)
    # Bounds are checked here because as_strided would read outside the storage silently.
    numel = storage.data.size // dtype.itemsize
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel:
      raise pickle.UnpicklingError(
          f'{where}: size {size}, stride {stride}, offset {offset} reach element {last} of '
          f'a storage with {numel}')
    # Stride over opaque items: as_strided cannot express ml_dtypes in its array interface.
    flat = storage.data.view(f'V{dtype.itemsize}')
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], size, [s * dtype.itemsize for s in stride], writeable=False)
    out = np.array(view, order='C').view(dtype)
    if self.byteorder != sys.byteorder:
      out = out.byteswap()
    metadata = dict(metadata or {})
    if metadata.pop('neg', False):
      out = -out
    if metadata.pop('conj', False):
      out = np.conj(out)
    if any(metadata.values()):
      raise pickle.UnpicklingError(f'{where}: unsupported tensor metadata {metadata}')
    return out


def _archive_prefix(zf, path):
  # torch puts every record under one top-level folder; data.pkl sits directly in it.
  pkls = [n for n in zf.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(pkls) != 1:
    raise InputError(f'{path}: not a torch.save zip archive (found {len(pkls)} top-level '
                     'data.pkl records)')
  return pkls[0][:-len('data.pkl')]


def load_torch_file(path, *, allow_unknown_objects=False):
  """Loads a `torch.save` zip checkpoint into python containers of numpy arrays.

  Parameters (and plain tensors) become numpy arrays, `torch.Size` a tuple, torch dtypes numpy
  dtypes; dicts, OrderedDicts, lists, tuples and scalars keep their type. Raises
  `UnsafeCheckpointError` for any other global unless `allow_unknown_objects`, which turns it
  into an inert `UnknownObject`.
  """
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      head = f.read(2)
    if head[:1] == b'\x80':
      raise InputError(
          f'{path}: legacy (non-zip) torch serialization format, from torch<1.6 or '
          '_use_new_zipfile_serialization=False; re-save it with a newer torch: '
          'torch.save(torch.load(old_path), new_path)')
    raise InputError(f'{path}: not a PyTorch checkpoint (not a zip archive)')
  with open(path, 'rb') as f, zipfile.ZipFile(f) as zf:
    prefix = _archive_prefix(zf, path)
    names = set(zf.namelist())
    byteorder = 'little'  # files without the record were written little-endian
    if prefix + 'byteorder' in names:
      byteorder = zf.read(prefix + 'byteorder').decode('ascii').strip()
      if byteorder not in ('little', 'big'):
        raise InputError(f'{path}: unknown byteorder record {byteorder!r}')
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    unpickler = _Unpickler(zf.read(prefix + 'data.pkl'), path=path, zf=zf, prefix=prefix,
                           mm=mm, byteorder=byteorder, allow_unknown=allow_unknown_objects)
    try:
      return unpickler.load()
    except UnsafeCheckpointError:
      raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:  # truncated or damaged
      text = str(e) if path in str(e) else (
          f'{path}: not a readable torch checkpoint ({type(e).__name__}: {e})')
      raise DamagedCheckpoint(text) from e
    finally:
      # Drop every view into the mapping (results are copies) so it can be unmapped now.
      unpickler.raw.clear()
      unpickler.memo.clear()
      unpickler.admitted.clear()  # breaks the bound-method reference cycle
      del unpickler
      try:
        mm.close()
      except BufferError:
        pass  # a view is still referenced somewhere; the mapping is freed with it


# numpy dtypes torch.from_numpy lacks: write their bits as an unsigned int, then view in torch.
_BITCAST = {np.dtype(d): (np.dtype(f'u{np.dtype(d).itemsize}'), name) for name, d in (
    ('bfloat16', ml_dtypes.bfloat16), ('float8_e4m3fn', ml_dtypes.float8_e4m3fn),
    ('float8_e5m2', ml_dtypes.float8_e5m2), ('float8_e4m3fnuz', ml_dtypes.float8_e4m3fnuz),
    ('float8_e5m2fnuz', ml_dtypes.float8_e5m2fnuz))}


def _to_torch(obj, torch, where):
  if isinstance(obj, dict):
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
      raise TypeError(f'save_torch_file: non-string keys at {where or "top level"}: {bad}')
    kind = collections.OrderedDict if isinstance(obj, collections.OrderedDict) else dict
    return kind((k, _to_torch(v, torch, f'{where}.{k}' if where else k)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    kind = list if isinstance(obj, list) else tuple
    return kind(_to_torch(v, torch, f'{where}[{i}]') for i, v in enumerate(obj))
  scalar = isinstance(obj, (bool, int, float, str)) and not isinstance(obj, np.generic)
  if obj is None or scalar:
    return obj
  if not hasattr(obj, '__array__'):
    raise TypeError(f'save_torch_file: {where}: cannot store a {type(obj).__name__}')
  a = np.asarray(obj)
  if not a.dtype.isnative:
    a = a.astype(a.dtype.newbyteorder('='))
  if not (a.flags.c_contiguous and a.flags.writeable):
    a = np.array(a, order='C')  # torch wants owned, contiguous, writable memory
  if a.dtype in _BITCAST:
    bits, name = _BITCAST[a.dtype]
    return torch.from_numpy(a.view(bits)).view(getattr(torch, name))
  try:
    return torch.from_numpy(a)
  except TypeError as e:
    raise TypeError(f'save_torch_file: {where}: dtype {a.dtype} has no torch equivalent') from e


def save_torch_file(path, flat_dict):
  """Writes `flat_dict` (str -> array) as a `.pth` that `torch.load(weights_only=True)` reads.

  Values may also be nested dicts/lists/tuples (e.g. `{'state_dict': {...}}` for a
  Lightning-style `.ckpt`) and python scalars or strings. Arrays keep their dtype exactly
  (`ml_dtypes.bfloat16` -> `torch.bfloat16`). Needs torch, imported only here.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('save_torch_file needs PyTorch to write a .pth file; install torch '
                      '(reading with load_torch_file does not need it)') from e
  if not isinstance(flat_dict, dict):
    raise TypeError(f'save_torch_file expects a dict, got {type(flat_dict).__name__}')
  torch.save(_to_torch(flat_dict, torch, ''), os.fspath(path))
