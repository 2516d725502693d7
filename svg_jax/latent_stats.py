"""Per-channel statistics of the DINOv3 latent: reading them, normalizing and denormalizing.

SVG-T2I's DiT works on DINOv3 final-norm patch tokens standardized per channel (docs/reference.md §2.3):
  z = (f - mean) / (std + 1e-8)        (training / precompute)
  f = z * std + mean                   (sampling; no epsilon)
with `mean`, `std` one row (official: -1 = layer 11) of the official statistics file, a torch zip
pickle `{"mean": float32 [layers, C], "std": float32 [layers, C]}`. It is read with
`load_torch_file` (no torch at run time). The official DiT training casts the statistics to bf16
before normalizing (the features stay fp32, so the arithmetic is fp32 with bf16-rounded mean and
std; `std + 1e-8` is formed in bf16 as torch does for a bf16 tensor plus a python float);
`normalize_arrays(..., bf16_stats=True)` reproduces that bit for bit.

The offline demo has a random encoder, so its statistics are computed on demo latents
(`StatsAccumulator`) and written by `save_latent_stats` in the same file format, so the demo
reads them through the same `load_latent_stats` as the official file. Another encoder's
statistics over a user's images: svg_jax/latent_stats_job.py (launch/latent_stats.py).

Latents are channel-last ([..., C]); the statistics broadcast over every other axis.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from svg_jax.convert.torch_pickle import load_torch_file, save_torch_file
from svg_jax.input_errors import InputError, MissingInput

EPS = 1e-8  # official: (f - mean) / (std + 1e-8)
OFFICIAL_LAYER = -1  # official `num_layer` default: the last row (layer 11 of ViT-S/16+)


# A run's config check and its loader fingerprint the same encoder weights (~110 MB for ViT-S/16+)
# several times; large files are hashed once per (file, size, modification time). Small ones are
# always re-read: they cost nothing, and a same-size rewrite within the file system's timestamp
# granularity (milliseconds) would otherwise keep the old hash.
_MEMO_MIN_BYTES = 1 << 24
_sha256_memo: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
  st = os.stat(path)
  key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
  if st.st_size >= _MEMO_MIN_BYTES and key in _sha256_memo:
    return _sha256_memo[key]
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  if st.st_size >= _MEMO_MIN_BYTES:
    _sha256_memo[key] = h.hexdigest()
  return h.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class LatentStats:
  """One row of statistics: `mean`, `std` fp32 [C], and where they came from.

  `fingerprint` identifies the values for dataset manifests: "sha256:<file hash>:row<r>" for a
  file (the row is part of it: another row gives other latents), "sha256-arrays:<hash>" for
  statistics built from arrays.
  """
  mean: np.ndarray
  std: np.ndarray
  fingerprint: str
  source: str = ""

  def __post_init__(self):
    mean = np.array(self.mean, np.float32)  # own copies: frozen below
    std = np.array(self.std, np.float32)
    if mean.ndim != 1 or mean.shape != std.shape:
      raise ValueError(f"latent statistics need mean and std of one shape [C], got mean "
                       f"{mean.shape} and std {std.shape}")
    problems = []
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
      problems.append("non-finite values")
    if np.any(std <= 0):
      problems.append(f"{int(np.sum(std <= 0))} std values <= 0")
    if problems:
      raise ValueError(f"invalid latent statistics{' from ' + self.source if self.source else ''}"
                       f": {', '.join(problems)}")
    mean.flags.writeable = False
    std.flags.writeable = False
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "std", std)

  @property
  def dim(self) -> int:
    return int(self.mean.shape[0])

  @classmethod
  def from_arrays(cls, mean: Any, std: Any, source: str = "arrays") -> "LatentStats":
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    h = hashlib.sha256(mean.tobytes() + std.tobytes() + str(mean.shape).encode()).hexdigest()
    return cls(mean, std, f"sha256-arrays:{h}", source)

def load_latent_stats(path: str | os.PathLike, layer: int = OFFICIAL_LAYER) -> LatentStats:
  """Read row `layer` (python indexing: -1 = last) of a statistics file.

  The file is a torch zip pickle holding a dict with float `mean` and `std` of one shape
  [layers, C] (the official file: [12, 384]).
  """
  path = os.fspath(path)
  if not path:
    raise InputError("no latent statistics file given: set config.autoencoder.stats_path to the "
                     "official one (the package ships it: svg_jax/assets/"
                     "dinov3_s16p_layer_patchtoken_stats_dist.pt) or to one written by "
                     "save_latent_stats")
  if not os.path.isfile(path):
    raise MissingInput(f"latent statistics file {path} does not exist")
  obj = load_torch_file(path)
  if not isinstance(obj, dict):
    raise InputError(f"{path}: expected a dict with 'mean' and 'std', got {type(obj).__name__}")
  missing = [k for k in ("mean", "std") if k not in obj]
  unexpected = sorted(str(k) for k in obj if k not in ("mean", "std"))
  if missing or unexpected:
    raise InputError(f"{path}: latent statistics keys do not match {{'mean', 'std'}}: "
                     f"missing {missing}, unexpected {unexpected}")
  mean, std = (np.asarray(obj[k]) for k in ("mean", "std"))
  for name, a in (("mean", mean), ("std", std)):
    is_float = np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16
    if a.ndim != 2 or not is_float:
      raise InputError(f"{path}: '{name}' must be a float [layers, C] array, got {a.dtype} "
                       f"{a.shape}")
  if mean.shape != std.shape:
    raise InputError(f"{path}: 'mean' {mean.shape} and 'std' {std.shape} differ in shape")
  n = mean.shape[0]
  if not -n <= layer < n:
    raise InputError(f"{path}: autoencoder.stats_layer {layer} is out of range for its {n} rows "
                     f"of statistics ({-n}..{n - 1})")
  row = layer % n
  try:
    return LatentStats(mean[row].astype(np.float32), std[row].astype(np.float32),
                       f"sha256:{file_sha256(path)}:row{row}", f"{path} row {row}")
  except ValueError as e:  # values no normalization can use: the file's fault
    raise InputError(str(e)) from None


def save_latent_stats(path: str | os.PathLike, mean: Any, std: Any) -> None:
  """Write mean / std ([C] or [layers, C]) in the official file format (needs torch).

  A [C] pair is written as one row [1, C], which `load_latent_stats(path)` (layer -1) reads.
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if mean.shape != std.shape or mean.ndim not in (1, 2):
    raise ValueError(f"mean {mean.shape} and std {std.shape} must be one shape, [C] or "
                     "[layers, C]")
  LatentStats.from_arrays(mean.reshape(-1), std.reshape(-1))  # validates the values
  if mean.ndim == 1:
    mean, std = mean[None], std[None]
  save_torch_file(path, {"mean": np.ascontiguousarray(mean), "std": np.ascontiguousarray(std)})


class StatsAccumulator:
  """Per-channel mean and (population) std over many latent batches [..., C], in fp64.

  Batches are merged with Chan et al.'s parallel update, so the result does not depend on how
  the latents were split into batches (up to rounding).
  """

  def __init__(self):
    self.count = 0
    self._mean = None
    self._m2 = None

  def update(self, latents: Any) -> None:
    x = np.asarray(latents, np.float64)
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
      return
    if self._mean is not None and x.shape[1] != self._mean.shape[0]:
      raise ValueError(f"latents have {x.shape[1]} channels, earlier batches had "
                       f"{self._mean.shape[0]}")
    n_b, mean_b = x.shape[0], x.mean(axis=0)
    m2_b = ((x - mean_b) ** 2).sum(axis=0)
    if self._mean is None:
      self.count, self._mean, self._m2 = n_b, mean_b, m2_b
      return
    n = self.count + n_b
    delta = mean_b - self._mean
    self._mean = self._mean + delta * (n_b / n)
    self._m2 = self._m2 + m2_b + delta ** 2 * (self.count * n_b / n)
    self.count = n

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) fp32 [C]."""
    if self._mean is None:
      raise ValueError("no latents were accumulated")
    return (self._mean.astype(np.float32),
            np.sqrt(self._m2 / self.count).astype(np.float32))


def write_latent_stats(path: str | os.PathLike, feature_batches: Any) -> LatentStats:
  """Per-channel mean / std of raw features over an iterable of [..., C] batches, written with
  `save_latent_stats` and read back with `load_latent_stats` (the demo's statistics file)."""
  acc = StatsAccumulator()
  for batch in feature_batches:
    acc.update(batch)
  save_latent_stats(path, *acc.result())
  return load_latent_stats(path)


def stats_for_normalize(mean: Any, std: Any, bf16_stats: bool = False):
  """(mean, std + 1e-8) as the official code forms them, as fp32 arrays (jit-friendly).

  bf16_stats: mean and std rounded to bf16 (round to nearest even, as torch's `.to(bfloat16)`),
  and the epsilon added in bf16 (a bf16 tensor plus a python float stays bf16 in torch).
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if bf16_stats:
    mean = mean.astype(jnp.bfloat16).astype(jnp.float32)
    std_b = std.astype(jnp.bfloat16).astype(jnp.float32)
    return mean, (std_b + jnp.float32(EPS)).astype(jnp.bfloat16).astype(jnp.float32)
  return mean, std + jnp.float32(EPS)


def normalize_arrays(f: Any, mean: Any, std: Any, bf16_stats: bool = False):
  """Features f [..., C] (fp32) -> z = (f - mean) / (std + 1e-8), fp32, with the statistics as
  (possibly traced) arrays [C].

  bf16_stats: reproduce the official DiT training, which rounds mean and std to bf16 first.
  """
  mean, denom = stats_for_normalize(mean, std, bf16_stats)
  f = jnp.asarray(f, jnp.float32)
  # XLA rewrites x / broadcast(d) as x * broadcast(1 / d), 1 ulp off torch's division; the
  # barrier hides the broadcast from that rewrite (it is removed before fusion: no cost).
  denom = jax.lax.optimization_barrier(jnp.broadcast_to(denom, f.shape))
  return (f - mean) / denom


def denormalize_arrays(z: Any, mean: Any, std: Any):
  """Normalized latents z [..., C] -> f = z * std + mean with the fp32 statistics (no epsilon),
  as (possibly traced) arrays [C]."""
  return (jnp.asarray(z, jnp.float32) * jnp.asarray(std, jnp.float32)
          + jnp.asarray(mean, jnp.float32))

