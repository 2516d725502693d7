"""Image <-> latent: preprocess, encode (DINOv3 + statistics), decode (statistics^-1 + decoder).

The SVG autoencoder of SVG-T2I (docs/reference.md §2.2-2.4, §3):
  encode: image (uint8 or [0, 1], channel-last) -> ImageNet normalization -> frozen DINOv3
          -> final-norm patch tokens f [B, H/16, W/16, 384] -> z = (f - mean) / (std + 1e-8)
  decode: z -> f = z * std + mean -> pixel decoder -> image in about [-1, 1]
`encode_images` / `decode_latents` are the pure functions (for use inside jitted train steps);
`SVGAutoencoder` holds the frozen weights, configs and statistics and runs them jitted (one
compile per input shape), in fixed-size chunks, with the batch optionally sharded over a mesh.
`preprocess` is the official DiT-training crop: closest aspect-ratio bucket + center crop.
Reconstruction quality (PSNR, SSIM): `eval/image_metrics.py`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
from typing import Any, Collection, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from svg_jax import latent_stats, parallel
from svg_jax.convert.decoder import load_decoder
from svg_jax.convert.dinov3 import load_dinov3
from svg_jax.data import buckets
from svg_jax.data.images import imagenet_normalize, open_rgb
from svg_jax.input_errors import InputError, MissingInput
from svg_jax.latent_stats import LatentStats
from svg_jax.models.decoder import Decoder, DecoderConfig
from svg_jax.models.dinov3 import DINOv3Config, DINOv3ViT
from svg_jax.utils.rounding import round_up


# ----------------------------------------------------------------------------------------------
# Pure functions


def encode_images(encoder_params: Any, mean: Any, std: Any, images: jax.Array,
                  cfg: DINOv3Config, bf16_stats: bool = False) -> jax.Array:
  """Images [B, H, W, 3] (uint8, or float in [0, 1]) -> normalized latents [B, H/p, W/p, C]."""
  x = imagenet_normalize(images)
  feats = DINOv3ViT(cfg).apply({"params": encoder_params}, x)
  return latent_stats.normalize_arrays(feats, mean, std, bf16_stats)


def decode_latents(decoder_params: Any, mean: Any, std: Any, latents: jax.Array,
                   cfg: DecoderConfig) -> jax.Array:
  """Normalized latents [B, h, w, C] -> images [B, h * f, w * f, 3] in about [-1, 1] (fp32)."""
  feats = latent_stats.denormalize_arrays(latents, mean, std)
  return Decoder(cfg).apply({"params": decoder_params}, feats)


def to_uint8(images: Any, *, truncate: bool = False) -> np.ndarray:
  """Images in [-1, 1] -> uint8: (x + 1) / 2, clamped to [0, 1], * 255 rounded half up (as
  torchvision's save_image, which the official reconstruction script writes with), or truncated
  (as the official samplers' `mul(255).byte()` and to_pil_image: one level darker about half
  the time)."""
  x = np.asarray(images, np.float32)
  x = np.clip((x + np.float32(1)) / np.float32(2), 0, 1) * np.float32(255)
  return (x if truncate else np.floor(x + np.float32(0.5))).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(src: Any, resolution: int, patch_size: int = 16, max_ratio: float = 4.0,
               min_side: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
  """An image -> (uint8 [h, w, 3] crop, bucket (w, h)) as the official DiT training crops it.

  src: a path or encoded bytes (decoded by `open_rgb`: RGBA on white, P / L / CMYK / 16-bit to
  RGB; a shorter side below `min_side` is a BadImageError, as precompute refuses it), an RGB PIL
  image, or a uint8 [H, W, 3] array. The bucket is the closest in aspect ratio among the
  official buckets of `resolution`; the crop is the official center crop.
  """
  if isinstance(src, Image.Image):
    if src.mode != "RGB":
      raise ValueError(f"preprocess takes RGB PIL images, got mode {src.mode}; pass the file path "
                       "or bytes to get the official mode conversions")
    image = src
  elif isinstance(src, np.ndarray):
    if src.dtype != np.uint8 or src.ndim != 3 or src.shape[-1] != 3:
      raise ValueError(f"preprocess takes uint8 [H, W, 3] arrays, got {src.dtype} {src.shape}")
    image = Image.fromarray(src, mode="RGB")
  else:
    image, _ = open_rgb(src, min_size=min_side)
  bucket_list = buckets.buckets_for_resolution(resolution, patch_size, max_ratio)
  crop, bucket = buckets.bucket_crop(image, bucket_list)
  return np.asarray(crop, dtype=np.uint8).reshape(bucket[1], bucket[0], 3), bucket


# ----------------------------------------------------------------------------------------------
# The autoencoder object


def config_fingerprints(c: ml_collections.ConfigDict) -> dict[str, str]:
  """Fingerprints of the encoder weights and latent statistics an `autoencoder` config section
  names (only those set), as precompute writes them into a manifest: a trainer compares them
  with its dataset's to refuse latents made with other weights or statistics."""
  out = {}
  if c.encoder_path:
    out["encoder"] = _encoder_fingerprint(c)
  if c.stats_path:
    stats = latent_stats.load_latent_stats(c.stats_path, c.stats_layer)
    out["statistics"] = stats.fingerprint + (":bf16" if c.bf16_stats else "")
  return out


def _encoder_fingerprint(c: ml_collections.ConfigDict) -> str:
  return path_fingerprint(c.encoder_path) + (
      f":prefix={c.encoder_prefix}" if c.encoder_prefix else "")


def path_fingerprint(path: str | os.PathLike, only: Collection[str] | None = None) -> str:
  """sha256 of a weights file, or of a folder's files (names and contents, sorted; those whose
  relative names are in `only`, when given)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return "sha256:" + latent_stats.file_sha256(path)
  if not os.path.isdir(path):
    raise MissingInput(f"{path} does not exist")
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      full = os.path.join(root, name)
      if only is not None and os.path.relpath(full, path) not in only:
        continue
      h.update(f"{os.path.relpath(full, path)}\0{latent_stats.file_sha256(full)}\0".encode())
  return "sha256-dir:" + h.hexdigest()


def _batch_multiple(sharding: NamedSharding | None) -> int:
  """How many shards the leading (batch) axis is split into."""
  if sharding is None or not sharding.spec:
    return 1
  axes = sharding.spec[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[a] for a in axes)


@functools.lru_cache(maxsize=64)
def _jitted_cached(fn, sharding, static: tuple):
  kw = {} if sharding is None else {"out_shardings": sharding}
  return jax.jit(functools.partial(fn, **dict(static)), **kw)


def _jitted(fn, sharding: NamedSharding | None, **static):
  """One jitted function per (function, configs, sharding), shared by every SVGAutoencoder, so
  instances with the same configs reuse compiled executables (jit caches one per input shape)."""
  return _jitted_cached(fn, sharding, tuple(sorted(static.items())))


class SVGAutoencoder:
  """Frozen encoder and/or decoder with the latent statistics.

  encoder_params / decoder_params: Flax param trees (plain, unboxed), or None when that half is
  not needed (e.g. sampling only decodes).
  mesh / sharding: run with the batch split over a device mesh. `sharding` is the NamedSharding
  of 4-D inputs and outputs; given only `mesh`, it is `parallel.batch_sharding(mesh, 4)` (batch
  over the data and fsdp axes). The weights and statistics are replicated on the mesh; batches
  are padded to a multiple of the batch split. Without either, the default device runs it.
  `encode` / `decode` take and return host numpy arrays (one process; a multi-host job calls
  `encode_images` / `decode_latents` inside its own jitted step on global arrays).
  """

  def __init__(self, *, stats: LatentStats, encoder_params: Any = None,
               encoder_cfg: DINOv3Config = DINOv3Config(), decoder_params: Any = None,
               decoder_cfg: DecoderConfig = DecoderConfig(), bf16_stats: bool = False,
               batch_size: int = 0, mesh: Mesh | None = None,
               sharding: NamedSharding | None = None,
               fingerprints: dict[str, str] | None = None):
    if sharding is None and mesh is not None:
      sharding = parallel.batch_sharding(mesh, 4)
    elif sharding is not None and mesh is not None and sharding.mesh != mesh:
      raise ValueError("SVGAutoencoder: `sharding` is on another mesh than `mesh`")
    if encoder_params is None and decoder_params is None:
      raise ValueError("SVGAutoencoder needs encoder params, decoder params or both")
    problems = []
    if encoder_params is not None and encoder_cfg.dim != stats.dim:
      problems.append(f"encoder dim {encoder_cfg.dim} != statistics size {stats.dim}")
    if decoder_params is not None and decoder_cfg.z_channels != stats.dim:
      problems.append(f"decoder z_channels {decoder_cfg.z_channels} != statistics size "
                      f"{stats.dim}")
    if batch_size < 0:
      problems.append(f"batch_size {batch_size} < 0")
    if problems:
      raise InputError("SVGAutoencoder: " + "; ".join(problems))
    self.stats, self.encoder_cfg, self.decoder_cfg = stats, encoder_cfg, decoder_cfg
    self.bf16_stats, self.batch_size, self.sharding = bf16_stats, batch_size, sharding
    self.fingerprints = dict(fingerprints or {})
    self.fingerprints.setdefault("statistics", self.stats_fingerprint)

    put = (jnp.asarray if sharding is None else
           lambda x: jax.device_put(x, NamedSharding(sharding.mesh, P())))
    self._mean, self._std = put(stats.mean), put(stats.std)
    self.encoder_params = None if encoder_params is None else jax.tree.map(put, encoder_params)
    self.decoder_params = None if decoder_params is None else jax.tree.map(put, decoder_params)
    self._encode = _jitted(encode_images, sharding, cfg=encoder_cfg, bf16_stats=bf16_stats)
    self._decode = _jitted(decode_latents, sharding, cfg=decoder_cfg)

  @property
  def stats_fingerprint(self) -> str:
    """The statistics' fingerprint, marked when training-style bf16 rounding is applied."""
    return self.stats.fingerprint + (":bf16" if self.bf16_stats else "")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, encoder: bool = True,
                  decoder: bool = True, mesh: Mesh | None = None,
                  sharding: NamedSharding | None = None,
                  fingerprints: dict[str, str] | None = None) -> "SVGAutoencoder":
    """Load what `config.autoencoder` (or a `config.autoencoder_defaults()` section) points at.

    encoder / decoder: which halves to load; each needs its path set.
    fingerprints: `config_fingerprints` of the same section when the caller has them (the
      encoder's weights file is not hashed a second time).
    """
    c = config.autoencoder if "autoencoder" in config else config
    missing = [f"autoencoder.{k}" for k, want in (("encoder_path", encoder),
                                                  ("decoder_path", decoder)) if want and not c[k]]
    if missing:
      raise InputError(f"set {' and '.join(missing)} (weights are the user's local files)")
    stats = latent_stats.load_latent_stats(c.stats_path, c.stats_layer)
    enc_cfg = DINOv3Config.from_dict(c.encoder.to_dict())
    dec_cfg = DecoderConfig.from_dict(c.decoder.to_dict())
    # Named by the config fields and the file: SVGAutoencoder's own check knows neither.
    wrong = ([f"autoencoder.encoder.dim {enc_cfg.dim}"] if encoder and enc_cfg.dim != stats.dim
             else []) + ([f"autoencoder.decoder.z_channels {dec_cfg.z_channels}"]
                         if decoder and dec_cfg.z_channels != stats.dim else [])
    if wrong:
      raise InputError(f"autoencoder.stats_path {c.stats_path} holds statistics of {stats.dim} "
                       f"channels, but {' and '.join(wrong)}: use the statistics made with "
                       "this encoder")
    enc_params = dec_params = None
    loaded = {}  # the fingerprints of the halves loaded
    if encoder:
      enc_cfg.validate()
      enc_params = load_dinov3(c.encoder_path, enc_cfg, prefix=c.encoder_prefix)
      loaded["encoder"] = (fingerprints or {}).get("encoder") or _encoder_fingerprint(c)
    if decoder:
      dec_cfg.validate()
      dec_params = load_decoder(c.decoder_path, dec_cfg, c.decoder_format)
    return cls(stats=stats, encoder_params=enc_params, encoder_cfg=enc_cfg,
               decoder_params=dec_params, decoder_cfg=dec_cfg, bf16_stats=c.bf16_stats,
               batch_size=c.batch_size, mesh=mesh, sharding=sharding,
               fingerprints=loaded)

  def _chunk_size(self, n: int, default: int = 0) -> int:
    """Rows of each call: `batch_size` (else `default`, else all n), rounded up to a multiple of
    the batch split."""
    return round_up(self.batch_size or default or n, _batch_multiple(self.sharding))

  def _place(self, part: np.ndarray) -> Any:
    return part if self.sharding is None else jax.device_put(part, self.sharding)

  def _own_mesh(self):
    """This autoencoder's mesh as the current one, whatever mesh the caller set: a training run
    on every host's devices decodes its grids on process 0's alone."""
    return contextlib.nullcontext() if self.sharding is None else parallel.use_mesh(
        self.sharding.mesh)

  def _run(self, fn, params, x: np.ndarray, default_chunk: int = 0) -> np.ndarray:
    """Apply `fn` in chunks of a fixed size (the last one padded) with the batch sharded."""
    n = x.shape[0]
    if n == 0:
      raise ValueError("empty batch")
    chunk = self._chunk_size(n, default_chunk)
    outs = []
    with self._own_mesh():
      for start in range(0, n, chunk):
        part = x[start:start + chunk]
        k = part.shape[0]
        if k < chunk:
          part = np.concatenate([part, np.zeros((chunk - k,) + part.shape[1:], part.dtype)])
        outs.append(np.asarray(fn(params, self._mean, self._std, self._place(part)))[:k])
    return outs[0] if len(outs) == 1 else np.concatenate(outs)

  def compile_decode(self, shape: Sequence[int]) -> None:
    """Compiles ahead the program `decode` runs on latents of `shape` [B, h, w, C] (jit keeps
    it), so that call compiles nothing."""
    self._check_latents(shape)
    part = np.zeros((self._chunk_size(int(shape[0])),) + tuple(shape[1:]), np.float32)
    with self._own_mesh():
      self._decode.lower(self.decoder_params, self._mean, self._std, self._place(part)).compile()

  def encode(self, images: Any) -> np.ndarray:
    """uint8 (or [0, 1] float) images [B, H, W, 3] -> normalized latents [B, H/p, W/p, C] fp32."""
    if self.encoder_params is None:
      raise ValueError("this SVGAutoencoder has no encoder (load it with encoder=True)")
    x = np.asarray(images)
    p = self.encoder_cfg.patch_size
    if x.ndim != 4 or x.shape[-1] != self.encoder_cfg.in_channels:
      raise ValueError(f"encode expects images [B, H, W, {self.encoder_cfg.in_channels}], got "
                       f"{x.shape}")
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the patch "
                       f"size {p}; crop it first (preprocess)")
    if x.dtype != np.uint8:
      if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"encode takes uint8 or float [0, 1] images, got {x.dtype}")
      x = x.astype(np.float32)
    return self._run(self._encode, self.encoder_params, x)

  def decode(self, latents: Any, batch_size: int = 0) -> np.ndarray:
    """Normalized latents [B, h, w, C] -> images [B, h * f, w * f, 3] in about [-1, 1], fp32.
    Rows per call: the autoencoder's `batch_size`, else this `batch_size`, else all of them."""
    z = np.asarray(latents, np.float32)
    self._check_latents(z.shape)
    return self._run(self._decode, self.decoder_params, z, batch_size)

  def _check_latents(self, shape: Sequence[int]) -> None:
    if self.decoder_params is None:
      raise ValueError("this SVGAutoencoder has no decoder (load it with decoder=True)")
    if len(shape) != 4 or shape[-1] != self.stats.dim:
      raise ValueError(f"decode expects latents [B, h, w, {self.stats.dim}], got "
                       f"{tuple(shape)}")

  def reconstruct(self, images: Any) -> np.ndarray:
    """encode then decode: uint8 images -> uint8 reconstructions."""
    return to_uint8(self.decode(self.encode(images)))


def list_images(paths: Sequence[str], extensions: Sequence[str] = (
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"), what: str = "--images"
                ) -> list[str]:
  """Files given directly, plus the image files (by extension) directly in given folders, sorted.
  InputError for an empty entry and for a folder without image files (a wrong folder, found
  before any weights load)."""
  if any(not path for path in paths):  # `a.png,,b.png`: an empty name read "  does not exist"
    raise InputError(f"{what} has an empty entry (two commas in a row, or one at an end)")
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, n) for n in os.listdir(path)
                     if n.lower().endswith(tuple(extensions))
                     and os.path.isfile(os.path.join(path, n)))
      if not found:
        raise InputError(f"no image files found in {path} (files ending in "
                         f"{', '.join(extensions)}, directly in the folder)")
      out += found
    elif os.path.exists(path):
      out.append(path)
    else:
      raise MissingInput(f"{path} does not exist")
  if not out:
    raise InputError(f"{what} names no image files")
  return out
