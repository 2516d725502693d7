"""The GPU roofline driver on this machine's CPU (the CUDA plugin is not needed for that): the
FLOPs it reads from the compiled train step's kernels are the model FLOPs the trainer's MFU
counts (analytic) when no layer is recomputed, and under full remat the model's plus the
recomputed forward of the main blocks (`aot.remat_expected_ratio`, analytic too), per device on
a mesh of several."""
import jax
import pytest

from configs import tiny
from research import gpu_roofline
from svg_jax import parallel
from svg_jax.train import aot, remat


@pytest.mark.parametrize("policy, fsdp", [("none", 1), ("dots", 1), ("full", 1), ("dots", 2)])
def test_the_kernels_flops_are_the_models_plus_what_remat_recomputes(policy, fsdp):
  config = tiny.get_config()
  config.mesh.update(dict(data=1, fsdp=fsdp, tensor=1))
  config.model.remat_policy = policy
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:fsdp])
  out = gpu_roofline.policy_report(config, mesh, gpu_roofline.GPUS["h100"], policy, top=3,
                                   hlo_dir="")
  hw, cap_len = remat.step_shape(config)
  expected = 1 / aot.remat_expected_ratio(config, cap_len=cap_len, hw=hw)
  assert out["hlo_over_model_flops"] == pytest.approx(expected, rel=0.02), out
  assert out["ms"] > 0 and 0 < out["mfu_bound"] <= 1 and len(out["top_other"]) == 3
  assert sum(out["share"].values()) == pytest.approx(1, abs=1e-3)
  # FSDP gathers the weights and scatters their gradients: link time, partly hidden by the SMs.
  assert ("link_ms" in out) == (fsdp > 1)
  if fsdp > 1:
    assert out["link_ms"] > 0 and 0 <= out["exposed_link_ms"] <= out["link_ms"]
