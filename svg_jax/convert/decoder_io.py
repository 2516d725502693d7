"""Read and write pixel-decoder weights in every supported format, through the one key map
(svg_jax/convert/decoder.py); the decoder's counterpart of dit_io.py.

Formats:
  flax         read: a `task = "decoder"` training workdir (or its `checkpoints/` folder), whose
               Orbax checkpoint of the latest step (or `step`) gives the decoder params (decoder
               training keeps no EMA), or a msgpack file of our params tree; written as that
               msgpack file (fp32)
  official     the official SVG autoencoder checkpoint (docs/reference.md §3.2): a Lightning
               `.ckpt` whose `state_dict` holds `decoder.*` (the `encoder.`, `loss.`, ... keys of
               the other components are ignored), or a `.pth` state dict. Written as
               `{"state_dict": {"decoder.*": tensor}}`, what the official
               `DinoDecoder.init_from_ckpt` reads (`torch.load(path)["state_dict"]`)
  safetensors  official key names (`decoder.*`) in one .safetensors file: what the demo exports
               and `autoencoder.decoder_path` reads
  diffusers    a folder for `diffusers.models.autoencoders.vae.Decoder`, a plain torch module
               without `from_pretrained`: `config.json` holds its constructor kwargs exactly
               (`decoder.diffusers_config`), `diffusion_pytorch_model.safetensors` its state dict:
                 model = Decoder(**json.load(open(f"{folder}/config.json")))
                 model.load_state_dict(safetensors.torch.load_file(
                     f"{folder}/diffusion_pytorch_model.safetensors"))
Reading never needs torch and never executes code from a file; writing `official` needs torch.
"""
from __future__ import annotations

import os
from pathlib import Path

import flax
import jax
import numpy as np

from svg_jax import checkpoint, parallel
from svg_jax.convert import decoder as keymap
from svg_jax.convert import safetensors_io, torch_pickle, weights_io
from svg_jax.input_errors import InputError
from svg_jax.models.decoder import Decoder, DecoderConfig

FORMATS = ("flax", "official", "safetensors", "diffusers")


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise InputError(f"unknown decoder checkpoint format {fmt!r}; choose one of {FORMATS}")


def load_decoder_weights(path: str | os.PathLike, fmt: str, cfg: DecoderConfig,
                         step: int | None = None) -> dict:
  """Load weights in format `fmt` as fp32 Flax params for `cfg`.

  step: the checkpoint step of a training workdir (flax only; default the latest)."""
  _check_format(fmt)
  path = Path(path)
  weights_io.check_source(path, fmt, "decoder")
  if step is not None and not (fmt == "flax" and path.is_dir()):
    raise ValueError("a step applies to a training workdir only (flax format, a folder)")
  if fmt == "flax":
    tree = (_workdir_params(path, cfg, step) if path.is_dir()
            else weights_io.load_flax_msgpack(path))
    return keymap.params_from_tree(tree, cfg)
  if fmt == "official":
    return keymap.state_to_params(keymap.read_torch_state(path), cfg, "official")
  if fmt == "safetensors":
    return keymap.state_to_params(safetensors_io.load_safetensors(path), cfg, "official")
  config, state = weights_io.load_diffusers_folder(path)
  if config is not None:
    keymap.check_diffusers_config(config, cfg)
  return keymap.diffusers_to_params(state, cfg)


def save_decoder_weights(params, path: str | os.PathLike, fmt: str, cfg: DecoderConfig,
                         dtype=np.float32) -> None:
  """Write params in format `fmt` (tensors as `dtype` except flax, which stays fp32); files
  appear atomically (written to a temp name, then renamed)."""
  _check_format(fmt)
  if fmt == "flax":
    weights_io.save_flax_msgpack(path, keymap.params_from_tree(params, cfg))
    return
  if fmt == "diffusers":
    state = {k: v.astype(dtype) for k, v in keymap.params_to_diffusers(params, cfg).items()}
    weights_io.save_diffusers_folder(path, state, keymap.diffusers_config(cfg))
    return
  state = {k: v.astype(dtype) for k, v in keymap.params_to_official(params, cfg).items()}
  if fmt == "official":
    weights_io.atomic_write(
        path, lambda tmp: torch_pickle.save_torch_file(tmp, {"state_dict": state}))
  else:
    weights_io.atomic_write(path, lambda tmp: safetensors_io.save_safetensors(tmp, state))


def _workdir_params(workdir: Path, cfg: DecoderConfig, step: int | None) -> dict:
  """The decoder params of a training run's Orbax checkpoint (the run's folder or its
  `checkpoints/`), on the host. The saved shapes are checked against `cfg` before anything is
  read, so a run of another model fails fast with the key lists of every other format."""
  run, step = weights_io.training_checkpoint(workdir, step, "decoder")
  ckpt = checkpoint.Checkpointer(run, read_only=True)
  try:
    meta = ckpt.manager.item_metadata(step)["state"]
    saved = (meta.tree if hasattr(meta, "tree") else meta).get("params")
  finally:
    ckpt.close()
  if not isinstance(saved, dict):
    raise ValueError(f"{workdir} step {step}: the saved training state has no params")
  shapes = {tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  keymap.check_param_shapes(shapes, cfg, f"decoder training checkpoint {workdir} step {step}")
  z = jax.ShapeDtypeStruct((1, 1, 1, cfg.z_channels), jax.numpy.float32)
  boxed = jax.eval_shape(lambda z: Decoder(cfg).init(jax.random.PRNGKey(0), z)["params"], z)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = parallel.abstract_arrays(flax.linen.meta.unbox(boxed), device)
  return jax.device_get(checkpoint.load_state_item(run, "params", abstract, step,
                                                  what="decoder params"))
