"""The DiT train step for one Hopper GPU, compiled on this CPU without one: its memory under each
remat policy (what `remat_policy = "auto"` will find on the card) and a roofline estimate of where
its time goes (research/hlo_roofline.py).

XLA:GPU compiles for a GPU described by a target config (the facts it would read from the driver)
with none attached: jax's CUDA plugin, installed beside jax at jax's version
(`pip install jax-cuda12-plugin==V jax-cuda12-pjrt==V`; no GPU, driver or CUDA library is needed),
and `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`.
JAX_PLATFORMS=cpu keeps the plugin from looking for a driver. Three checks that ask the attached
device are bypassed here, because the program is compiled, never run: jax's cuDNN version and
compute-capability checks for its fused attention, and svg_jax's check that the cudnn backend runs
on a GPU process. The config's attention backend stands: the 2B stages' "auto" takes cuDNN when
compiling for a GPU (as the trainer does on the card). cuDNN's attention compiles to its custom
calls either way; cuDNN builds the kernels when the program loads on a GPU. GEMMs are compiled
without autotuning (Triton GEMMs with default tiles); on the card, autotuning may pick cuBLAS,
which changes no memory or FLOPs.

  python research/gpu_roofline.py --config configs/svg_t2i_2b.py:stage1_256 --gpu h100 \\
      --global_batch_size 32 --remats none,dots,save_qkv_attn,full

(`--gpus 8`: one host of 8 cards, the config's mesh over them; the program and every figure
are one card's) prints one JSON line per policy: the per-device peak (aot.memory_report),
whether it fits XLA's allocator at its default share of the card (XLA_PYTHON_CLIENT_MEM_FRACTION
0.75) and at the scripts' 0.92 (svg_jax/cli.py; each less `train.remat_headroom`), the compile
time, and the
roofline: estimated milliseconds, the MFU that bounds (model FLOPs, as the trainer counts them,
over estimated time x the bf16 peak), the share of each kernel class and the costliest kernels
outside matmul and attention; on several cards also the collectives' link time at NVLink
bandwidth and the part of it the schedule leaves exposed (`hlo_roofline.timeline`).

Bad input (a flag, the config file, a mesh the --gpus cannot hold) is one line and exit status 2
(`cli.run`), found before anything asks the CUDA plugin.
"""
import dataclasses
import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax: the CUDA plugin skips its driver check
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the configs

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax._src.cudnn import fused_attention_stablehlo  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from research import hlo_roofline  # noqa: E402
from svg_jax import cli, compile_cache, malloc_tuning  # noqa: E402
from svg_jax import config as config_lib  # noqa: E402
from svg_jax import parallel  # noqa: E402
from svg_jax.input_errors import InputError  # noqa: E402
from svg_jax.models import layers, nextdit  # noqa: E402
from svg_jax.train import aot, remat  # noqa: E402
from svg_jax.train import flop_count  # noqa: E402

FLAGS = flags.FLAGS
MEMORY_FRACTIONS = (0.75, float(cli.GPU_MEMORY_FRACTION))  # XLA's default share; the scripts'


@dataclasses.dataclass(frozen=True)
class Gpu:
  """What XLA:GPU reads from the driver, for the SXM cards (NVIDIA's data sheets)."""
  name: str  # the CUDA device name
  memory_bytes: int
  bandwidth: float  # HBM bytes/s
  sms: int = 132
  l2_bytes: int = 50 * 2 ** 20
  clock_ghz: float = 1.98
  bf16_flops: float = 989e12  # dense tensor-core peak
  nvlink_bandwidth: float = 450e9  # NVLink 4: 18 links x 25 GB/s each way

  def target_config(self) -> str:
    """A stream_executor.GpuTargetConfigProto in text format."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {self.sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{self.name}"
"""

  def chip(self) -> hlo_roofline.Chip:
    return hlo_roofline.Chip(self.name, self.bf16_flops, self.bandwidth, self.nvlink_bandwidth)


GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", 81559 * 2 ** 20, 3.35e12),
    "h200": Gpu("NVIDIA H200", 143771 * 2 ** 20, 4.8e12),
}


def compile_without_the_card() -> None:
  """Lets the cuDNN attention path compile in a process whose own devices are CPUs."""
  fused_attention_stablehlo.check_cudnn_version = lambda: 90800
  fused_attention_stablehlo.check_compute_capability = lambda capability: True
  layers._require_platform = lambda backend, platforms: None  # pylint: disable=protected-access


def gpu_mesh(gpu: Gpu, sizes: dict, count: int = 1) -> Mesh:
  """The config's mesh over one host of `count` cards (topology slices x hosts x cards)."""
  topology = topologies.get_topology_desc(platform="cuda", target_config=gpu.target_config(),
                                          topology=f"1x1x{count}")
  shape = parallel.mesh_shape(sizes, count)
  devices = np.array(topology.devices).reshape(shape)
  return Mesh(devices, parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def policy_report(config, mesh, gpu: Gpu, policy: str, top: int, hlo_dir: str) -> dict:
  hw, cap_len = remat.step_shape(config)
  compiled, setup, seconds = aot.compile_step(remat.with_policy(config, policy), mesh,
                                              cap_len=cap_len, hw=hw)
  peak = aot.memory_report(compiled, setup)["total"]
  hlo = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{policy}.hlo"), "w") as f:
      f.write(hlo)
  found = hlo_roofline.kernels(hlo)
  roof = hlo_roofline.summary(found, gpu.chip(), top=top)
  timed = hlo_roofline.timeline(hlo, gpu.chip())
  devices = mesh.devices.size  # the HLO is one device's program
  model_flops = flop_count.dit_train_flops(config_lib.nextdit_config(config),
                                           int(config.train.global_batch_size), hw,
                                           cap_len) / devices
  headroom = float(config.train.remat_headroom)
  return {
      "policy": policy, "peak_gib": round(peak / aot.GIB, 2),
      **{f"fits_{f}": peak <= f * gpu.memory_bytes * (1 - headroom) for f in MEMORY_FRACTIONS},
      "compile_s": round(seconds, 1), "xla_recomputed": aot.xla_recomputed(hlo),
      "ms": round(1e3 * timed["seconds"], 2),
      "mfu_bound": round(model_flops / (timed["seconds"] * gpu.bf16_flops), 4),
      **({"link_ms": round(1e3 * timed["link_seconds"], 2),
          "exposed_link_ms": round(1e3 * (timed["seconds"] - timed["compute_seconds"]), 2)}
         if devices > 1 else {}),
      "hlo_over_model_flops": round(roof["flops"] / model_flops, 4),
      "launches": roof["launches"], "share": roof["share"], "top_other": roof["top_other"],
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  gpu = GPUS[FLAGS.gpu]
  with config.unlocked():
    if FLAGS.gpus == 1:
      config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    if FLAGS.global_batch_size:
      config.train.global_batch_size = FLAGS.global_batch_size
  try:  # before the CUDA plugin is asked for the cards
    parallel.mesh_shape(dict(config.mesh), FLAGS.gpus)
  except ValueError as e:
    raise InputError(f"--gpus {FLAGS.gpus} with the config's {e}") from e
  compile_without_the_card()
  jax.config.update("jax_optimization_level", FLAGS.optimization_level)
  try:
    mesh = gpu_mesh(gpu, dict(config.mesh), FLAGS.gpus)
  except NotImplementedError as e:  # "topology not implemented for cuda": no plugin installed
    raise SystemExit(f"research/gpu_roofline.py needs jax's CUDA plugin: pip install "
                     f"jax-cuda12-plugin=={jax.__version__} jax-cuda12-pjrt=={jax.__version__} "
                     "(no GPU, driver or CUDA library needed)") from e
  about = dict(gpu=gpu.name, gpus=FLAGS.gpus, jax=jax.__version__,
               config=config_flags.get_config_filename(FLAGS["config"]),
               global_batch_size=int(config.train.global_batch_size))
  for policy in FLAGS.remats:
    out = policy_report(config, mesh, gpu, policy, FLAGS.top, FLAGS.hlo_dir)
    print(json.dumps({**out, **about}), flush=True)
  if FLAGS.auto:
    print(json.dumps({**auto_choice(config, mesh, gpu), **about}), flush=True)


def auto_choice(config, mesh, gpu: Gpu) -> dict:
  """What `remat_policy = "auto"` takes on the card: the trainer's own resolution (its metrics
  event), with the card's memory at the scripts' share as the budget."""
  config = remat.with_policy(config, "auto")
  with config.unlocked():
    config.train.remat_memory_budget_gib = (gpu.memory_bytes * float(cli.GPU_MEMORY_FRACTION)
                                            / aot.GIB)
  with tempfile.TemporaryDirectory() as workdir:  # no checkpoint to take a saved policy from
    try:
      return remat.resolve(config, mesh, workdir)[1]
    except remat.RematBudgetError as e:
      return {"event": remat.EVENT, "policy": None, "error": str(e)}


def define_flags() -> None:
  """The command line's flags (defined when run, not when imported: the tests import this file
  beside other scripts that define --config)."""
  cli.define_config_file("config", None, "ml_collections config file[:variant]")
  flags.mark_flag_as_required("config")
  flags.DEFINE_enum("gpu", "h100", sorted(GPUS), "the card to compile for")
  flags.DEFINE_integer("global_batch_size", 0, "0: the config's", lower_bound=0)
  flags.DEFINE_integer("gpus", 1, "cards of one host (NVLink): the config's mesh over them",
                       lower_bound=1)
  flags.DEFINE_enum("optimization_level", "UNKNOWN", ["UNKNOWN", "O0", "O1", "O2", "O3"],
                    "jax_optimization_level (O1 and up: XLA:GPU pipelines the collectives of "
                    "loops and double-buffers them)")
  flags.DEFINE_list("remats", ["none", "dots", "save_qkv_attn", "full"], "policies to compile")
  flags.register_validator("remats", lambda remats: set(remats) <= set(nextdit.REMAT_POLICIES),
                           message="--remats: policies of " + ", ".join(nextdit.REMAT_POLICIES))
  flags.DEFINE_string("hlo_dir", "", "where to write each policy's optimized HLO (none: not "
                      "written)")
  flags.DEFINE_integer("top", 8, "kernels listed outside matmul and attention", lower_bound=0)
  flags.DEFINE_bool("auto", False, "also print what remat auto takes on the card (its own "
                    "compiles; --remats= to skip the per-policy reports)")


if __name__ == "__main__":
  # It compiles, never runs, and times its compiles: without the malloc settings (they slow XLA's
  # compiles, svg_jax/malloc_tuning.py) or the persistent compilation cache (a cached compile takes
  # no time), unless the environment asks for them.
  os.environ.setdefault(malloc_tuning.OPT_OUT, "1")
  os.environ.setdefault(compile_cache.ENV, "")
  define_flags()
  cli.run(main)
