"""The chips a run may be on: peak dense bf16 FLOP/s (the MFU denominator), the facts of TPU
generations that AOT compiles build slices from, and which chip a jax device is."""
from typing import NamedTuple

import jax


# Peak dense bf16 TFLOP/s per chip (NVIDIA's data sheets give twice these "with sparsity");
# None where MFU is meaningless (CPU). The H200 has the H100's tensor cores (only its memory is
# larger and faster), so the SXM H100's peak; the PCIe and NVL H100s run at lower clocks.
PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0, "a100": 312.0,
               "h100": 989.0, "h100_pcie": 756.0, "h100_nvl": 835.0, "h200": 989.0, "cpu": None}


class TpuGeneration(NamedTuple):
  """The rest of a TPU generation's facts (Cloud TPU system-architecture pages), as
  launch/aot_compile.py --target builds its slices; the peak is `PEAK_TFLOPS` above."""
  # HBM per chip a program may use: XLA:TPU's "available HBM" (libtpu 0.0.42.1 refuses a larger
  # program with it); the spec sheets say 32, 16, 95 and 32 GB.
  hbm_gib: float
  torus_dims: int  # slices are AxB (2: v5e, v6e) or AxBxC (3: v4, v5p)
  cores_per_chip: int  # Cloud accelerator types count TensorCores: v4-32, v5p-32 are 16 chips
  chip_config: str  # libtpu chip config with one JAX device per chip (v4's megacore)
  max_chips: int  # the largest single slice
  host_bounds: tuple  # chips of one host as an (x, y, z) box


TPU_GENERATIONS = {
    "v4": TpuGeneration(30.75, 3, 2, "megacore", 4096, (2, 2, 1)),
    "v5e": TpuGeneration(15.75, 2, 1, "default", 256, (2, 2, 1)),
    "v5p": TpuGeneration(95.74, 3, 2, "default", 4096, (2, 2, 1)),
    "v6e": TpuGeneration(31.25, 2, 1, "default", 256, (2, 2, 1)),
}


def detect_chip(device=None) -> str:
  """Maps a jax device to a `PEAK_TFLOPS` key ("cpu" for anything unknown)."""
  device = device or jax.devices()[0]
  return chip_of(device.platform, device.device_kind)


def chip_of(platform: str, device_kind: str) -> str:
  """A `PEAK_TFLOPS` key from a platform ("tpu", "gpu", ...) and a device name as jax's
  `device_kind` or torch's `cuda.get_device_name` gives it ("cpu" for anything unknown)."""
  kind = device_kind.lower()
  if platform == "tpu":
    if "v6" in kind:
      return "v6e"
    if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
      return "v5e"
    if "v5" in kind:
      return "v5p"
    if "v4" in kind:
      return "v4"
  if platform == "gpu":
    if "h100" in kind:
      return "h100_pcie" if "pcie" in kind else "h100_nvl" if "nvl" in kind else "h100"
    for chip in ("h200", "a100"):
      if chip in kind:
        return chip
  return "cpu"


def peak_tflops(chip: str) -> float | None:
  if chip == "auto":
    chip = detect_chip()
  if chip not in PEAK_TFLOPS:
    raise ValueError(f"train.chip {chip!r} is not one of {['auto'] + sorted(PEAK_TFLOPS)}")
  return PEAK_TFLOPS[chip]
