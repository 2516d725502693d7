"""The DiT of a training workdir, for sampling: the model config its run saved and its EMA or raw
params, placed on a mesh (replicated) or on one device."""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, SingleDeviceSharding

from svg_jax import parallel
from svg_jax.models.nextdit import NextDiTConfig, abstract_params
from svg_jax import checkpoint as ckpt_lib
from svg_jax.input_errors import InputError, MissingInput

# Implementation-only model fields a sampler may choose for its own hardware.
HARDWARE_FIELDS = ("compute_dtype", "activation_dtype", "attention_backend", "remat_policy",
                   "layer_loop", "scan_unroll")


# The key of the saved config under which a DiT run keeps how its captions were encoded (hidden
# layer, system prompt rule; train/dit_task.text_conditioning), for samplers to follow.
TEXT_CONDITIONING = "text_conditioning"


def checkpoint_step(workdir: str, step: int | None = None) -> int:
  """`step` when the training workdir has it, else (None) its newest finished step: the one step
  a sampler then reads both the model config and the params of, while training may add more."""
  if os.path.isfile(workdir):
    raise InputError(f"{workdir} is a file, not a training workdir (a weights file loads with "
                     "--weights and --format)")
  if not os.path.isdir(workdir):
    raise MissingInput(f"training workdir {workdir} does not exist")
  directory = ckpt_lib.checkpoint_dir(workdir)
  steps = ckpt_lib.finished_steps(directory)  # a listing: no manager to open and close
  try:
    return ckpt_lib.resolve_step(max(steps, default=None), step, steps, directory)
  except FileNotFoundError as e:  # the workdir given has no (such) finished checkpoint
    raise MissingInput(str(e)) from None


def saved_config(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(the step, the config dict its run saved with it) of a training workdir (`step` None: its
  newest finished one)."""
  step = checkpoint_step(workdir, step)
  return step, ckpt_lib.read_saved_config(ckpt_lib.checkpoint_dir(workdir), step)


def saved_model_config(workdir: str, step: int | None = None,
                       base: ml_collections.ConfigDict | None = None) -> NextDiTConfig:
  """The NextDiTConfig a training run saved with its checkpoint (newest step by default); the
  `HARDWARE_FIELDS` come from `base`'s model section when given."""
  step, saved = saved_config(workdir, step)
  if saved.get("task", "dit") != "dit":
    raise InputError(f"{workdir} is a `task = \"{saved['task']}\"` training run, not a DiT's")
  if "model" not in saved:
    raise InputError(f"the config saved in {workdir} at step {step} has no `model` section")
  model = dict(saved["model"])
  if base is not None:
    for k in HARDWARE_FIELDS:
      model[k] = base.model[k]
  known = {f.name for f in dataclasses.fields(NextDiTConfig)}
  unknown = sorted(set(model) - known)
  if unknown:
    raise ValueError(f"the saved model config has unknown fields {unknown}")
  model = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
  cfg = NextDiTConfig(**model)
  cfg.validate()
  return cfg


def saved_text_conditioning(workdir: str, step: int | None = None) -> dict:
  """How the run of a training workdir encoded its captions (`TEXT_CONDITIONING`: `hidden_layer`,
  `system_prompt`, `kind`, each only where its data said), {} for runs saved before it was."""
  _, saved = saved_config(workdir, step)
  facts = saved.get(TEXT_CONDITIONING)
  return dict(facts) if isinstance(facts, dict) else {}


def saved_sample_resolution(workdir: str, step: int | None = None) -> int | None:
  """The square side in pixels a training run's own grids sampled at (`validation.resolution`,
  else `data.resolution`, as its saved config says), None when it does not say."""
  _, saved = saved_config(workdir, step)
  for section, field in (("validation", "resolution"), ("data", "resolution")):
    value = (saved.get(section) or {}).get(field)
    if isinstance(value, int) and value > 0:
      return value
  return None


def load_params(workdir: str, cfg: NextDiTConfig, *, ema: bool = True, step: int | None = None,
                mesh: Mesh | None = None):
  """EMA (`ema_params`) or raw (`params`) DiT params of a training workdir's checkpoint."""
  sharding = (SingleDeviceSharding(jax.devices()[0]) if mesh is None
              else parallel.replicated(mesh))
  abstract = parallel.abstract_arrays(nn.meta.unbox(abstract_params(cfg)), sharding)
  item = "ema_params" if ema else "params"
  return ckpt_lib.load_state_item(workdir, item, abstract, step, what=f"DiT {item}")
