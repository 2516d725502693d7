"""Read and write `.safetensors` files (single or sharded) as flat dicts of numpy arrays.

Built on the `safetensors` package's numpy backend, which handles bf16 through `ml_dtypes`; this
module adds what it leaves to the caller: arrays are made C-contiguous before writing (the
backend would otherwise write the bytes of a strided view's base), dtypes it cannot map are
refused by name, and sharded checkpoints (`*.safetensors.index.json` with a `weight_map`) are
assembled with missing shards and missing/unexpected keys reported.
"""
import json
import os

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from svg_jax.input_errors import InputError, MissingInput

__all__ = ['load_safetensors', 'save_safetensors', 'load_sharded_safetensors']

# Header dtype -> numpy dtype, for the dtypes safetensors' numpy backend reads and writes.
_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8,
    'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16, 'U8': np.uint8,
    'BOOL': np.bool_, 'C64': np.complex64,
}
_SUPPORTED = {np.dtype(d) for d in _DTYPES.values()}


def load_safetensors(path):
  """Returns {name: np.ndarray} for every tensor in the file (bf16 as `ml_dtypes.bfloat16`)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingInput(f'safetensors file not found: {path}')
  try:
    with safetensors.safe_open(path, framework='np') as f:
      dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
      bad = {k: d for k, d in dtypes.items() if d not in _DTYPES}
      if bad:
        raise InputError(f'{path}: tensors with dtypes that numpy loading does not support: {bad}')
      return {k: f.get_tensor(k) for k in dtypes}
  except safetensors.SafetensorError as e:
    raise InputError(f'{path}: not a valid safetensors file: {e}') from e


def save_safetensors(path, flat, metadata=None):
  """Writes {name: array} (numpy, jax or anything `np.asarray` takes) to `path`.

  `metadata` is an optional {str: str} stored in the header's `__metadata__`.
  """
  if not isinstance(flat, dict):
    raise TypeError(f'save_safetensors expects a dict of arrays, got {type(flat).__name__}')
  bad_keys = [k for k in flat if not isinstance(k, str)]
  if bad_keys:
    raise TypeError(f'save_safetensors: tensor names must be str, got {bad_keys}')
  if metadata is not None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise TypeError(f'save_safetensors: metadata must be a dict of str -> str, got {metadata!r}')
  arrays = {k: np.asarray(v) for k, v in flat.items()}
  bad = {k: str(a.dtype) for k, a in arrays.items() if a.dtype.newbyteorder('=') not in _SUPPORTED}
  if bad:
    raise TypeError(f'save_safetensors: unsupported dtypes {bad}')
  # Contiguous copies where needed: the backend writes `nbytes` from the data pointer.
  arrays = {k: np.asarray(a, order='C') for k, a in arrays.items()}
  safetensors.numpy.save_file(arrays, os.fspath(path), metadata=metadata)


def _resolve(dir_or_index):
  """Returns ('index' | 'single', path) for a directory, an index json or a .safetensors file."""
  path = os.fspath(dir_or_index)
  if os.path.isfile(path):
    return ('index' if path.endswith('.json') else 'single'), path
  if not os.path.isdir(path):
    raise MissingInput(f'no such safetensors file or directory: {path}')
  names = sorted(os.listdir(path))
  for kind, candidates in (
      ('index', ['model.safetensors.index.json']), ('single', ['model.safetensors']),
      ('index', [n for n in names if n.endswith('.safetensors.index.json')]),
      ('single', [n for n in names if n.endswith('.safetensors')])):
    found = [n for n in candidates if n in names]
    if len(found) == 1:
      return kind, os.path.join(path, found[0])
    if len(found) > 1:
      raise InputError(f'{path}: ambiguous, several candidates {found}; pass the file to use')
  # A folder the user named that holds no weights: bad input (one line), not a bug.
  shown = names[:10] + (['...'] if len(names) > 10 else [])
  raise MissingInput(f'{path} is a folder but not a Hugging Face model folder: expected '
                     f'model.safetensors.index.json, model.safetensors or one other '
                     f'*.safetensors[.index.json] file in it (found {len(names)} entries: '
                     f'{shown})')


def load_sharded_safetensors(dir_or_index):
  """Loads a (possibly sharded) safetensors checkpoint into one flat dict.

  Accepts a directory (holding `model.safetensors.index.json`, `model.safetensors`, or a single
  other `*.safetensors.index.json` / `*.safetensors` such as diffusers'
  `diffusion_pytorch_model.*`), an index json, or a `.safetensors` file. Every shard named in the
  index's `weight_map` must exist and hold exactly the keys the index assigns to it.
  """
  kind, path = _resolve(dir_or_index)
  if kind == 'single':
    return load_safetensors(path)
  try:
    with open(path, encoding='utf-8') as f:
      index = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f'{path}: not a safetensors index (invalid JSON: {e})') from e
  weight_map = index.get('weight_map') if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise InputError(f'{path}: index has no "weight_map" dict')
  by_shard = {}
  for key, shard in weight_map.items():
    by_shard.setdefault(shard, set()).add(key)
  root = os.path.dirname(path)
  missing = {s: len(keys) for s, keys in by_shard.items()
             if not os.path.isfile(os.path.join(root, s))}
  if missing:
    raise MissingInput(f'{path}: missing shard files (with the number of tensors each '
                       f'should hold): {missing}')
  out = {}
  for shard, keys in sorted(by_shard.items()):
    tensors = load_safetensors(os.path.join(root, shard))
    absent = sorted(keys - tensors.keys())
    extra = sorted(tensors.keys() - keys)
    if absent or extra:
      raise InputError(f'{path}: shard {shard} does not match the weight_map: missing keys '
                       f'{absent}, unexpected keys {extra}')
    out.update(tensors)
  return out
