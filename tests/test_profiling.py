"""The profile summary against XLA's own account of a program: every op it counts is an
instruction of the compiled HLO, each ran as often as the program runs it, a while loop counts
its body once per iteration and not itself, and a dot is a matmul."""
import re

import jax
import jax.numpy as jnp
import pytest

from svg_jax.train import profiling

CALLS, TRIPS = 3, 4


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
  def f(w, x):
    return jax.lax.fori_loop(0, TRIPS, lambda i, x: jnp.tanh(x @ w), x)

  g = jax.jit(f)
  w, x = jnp.full((256, 256), 0.01), jnp.ones((128, 256))
  g(w, x).block_until_ready()
  directory = str(tmp_path_factory.mktemp("trace"))
  with jax.profiler.trace(directory):
    for _ in range(CALLS):
      g(w, x).block_until_ready()
  hlo = g.lower(w, x).compile().as_text()
  return profiling.latest_trace(directory), hlo


def test_every_op_is_a_compiled_instruction_counted_per_run(traced):
  path, hlo = traced
  _, ops = profiling.summarize(path)
  instructions = dict(re.findall(r"^\s*(?:ROOT )?%([\w.-]+) = [^ ]+ (\w[\w-]*)\(", hlo, re.M))
  assert ops and all(o.op in instructions for o in ops), [o.op for o in ops]
  assert not [o for o in ops if instructions[o.op] == "while"]  # its body's ops hold its time
  # The loop body's ops run TRIPS times a call; the dot (fused or not) is a matmul.
  body = re.search(r"\n%region_0[^\n]*\{(.*?)\n\}", hlo, re.S).group(1)
  in_body = [o for o in ops if re.search(rf"%{re.escape(o.op)} = ", body)]
  assert in_body and all(o.count == TRIPS * CALLS for o in in_body)
  dots = [o for o in in_body if re.search(rf"%{re.escape(o.op)} = \S+ (dot|fusion)\(.*", body)
          and o.kind == "matmul"]
  assert len(dots) == 1 and dots[0].seconds == max(o.seconds for o in ops)


def test_the_report_adds_up(traced):
  path, _ = traced
  _, ops = profiling.summarize(path)
  text = profiling.report(path, CALLS, top=3)
  classes = profiling.by_class(ops)
  assert sum(classes.values()) == pytest.approx(sum(o.seconds for o in ops))
  lines = text.splitlines()
  assert lines[1] == "by class:" and len(lines) == 2 + len(classes) + 1 + min(3, len(ops))
  first = lines[2].split()
  assert first[0] == next(iter(classes))
  assert float(first[1]) == pytest.approx(1e3 * next(iter(classes.values())) / CALLS, abs=1e-3)


@pytest.mark.parametrize("op, kernel, kind", [
    ("custom-call.12", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("cublas-gemm.3", "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", "matmul"),
    ("custom-call.4", "cudnn_generated_fort_native_sdpa_sm90_knob_7", "attention"),
    ("all-reduce-start.1", "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
    ("loop_transpose_fusion.2", "loop_transpose_fusion_2", "copy"),
    ("input_reduce_fusion.7", "input_reduce_fusion_7", "reduction"),
    ("loop_multiply_fusion.31", "loop_multiply_fusion_31", profiling.OTHER),
])
def test_gpu_kernels_fall_in_their_class(op, kernel, kind):
  """Names of the form XLA:GPU, cuBLAS, cuDNN and NCCL give their kernels."""
  assert profiling.op_class(op, kernel) == kind
