"""The official SVG-T2I 2.6B DiT and its training stages (docs/reference.md §1.2, §5).

Variants (`--config configs/svg_t2i_2b.py:<variant>`):
  stage1_256   256px, global batch 512 (official: micro 16 x 32 GPUs), lr 2e-4 constant
  stage2_512   512px, starts from stage 1 params (`--config.train.init_from=<stage1 workdir>`)
  stage3_1024  1024px, starts from stage 2
  stage4_sft   1024px SFT on high-aesthetic data, starts from stage 3
  test_08b     the official 0.8B test model (784,896,640 params) at 1024px, batch 1 per device
The official scripts use the same launcher for every stage, so batch, lr, clip and caption length stay
the same; only the resolution (and with it the timestep shift) and init_from change. Mesh sizes are
overrides: e.g. --config.mesh.fsdp=64 --config.mesh.data=4 on a 256-chip slice.
"""
from svg_jax import config as base
from svg_jax.input_errors import InputError

STAGES = {
    "stage1_256": 256,
    "stage2_512": 512,
    "stage3_1024": 1024,
    "stage4_sft": 1024,
    "test_08b": 1024,
}


def get_config(variant: str = "stage1_256"):
  if variant not in STAGES:
    raise InputError(f"unknown variant {variant!r}; choose one of {sorted(STAGES)}")
  c = base.dit_task_config()
  # Attention auto: splash when compiled for TPUs (svg_jax/models/splash_attention.py), cuDNN's
  # fused kernel for Ampere-or-later GPUs (bf16 compute), xla elsewhere. Remat auto: the trainer
  # compiles the step with each policy, least recomputation first, and trains with the first that
  # fits the device (svg_jax/train/remat.py); AOT tools compile it as full.
  # bf16 matmuls and bf16 activations between ops, as the official trainer's autocast runs them
  # (norms, RoPE, softmax and the accumulations in fp32). Layer loop auto: the stacked layers run
  # unrolled when compiled for a GPU (less memory and time there, a longer compile), as a scan
  # elsewhere; the params are stacked either way, so checkpoints move between the two.
  c.model.update(dict(compute_dtype="bfloat16", activation_dtype="compute", scan_layers=True,
                      layer_loop="auto", remat_policy="auto", attention_backend="auto"))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.data.resolution = STAGES[variant]
  c.data.max_caption_len = 256
  c.train.global_batch_size = 512
  c.train.lr = 2e-4
  if variant == "test_08b":
    c.model.update(dict(dim=1152, n_layers=28, n_heads=16, n_kv_heads=8, axes_dims=(24, 24, 24)))
    c.train.global_batch_size = 8
  return c
