"""The roofline's counts against XLA's own cost analysis (XLA:CPU programs: the HLO text is the
same language on every backend) and against the arithmetic of loops XLA's analysis counts once."""
import jax
import jax.numpy as jnp
import pytest

from research import hlo_roofline


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def _xla(compiled, key):
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis[key])


def _total(found, field):
  return sum(getattr(k, field) * k.count for k in found)


def test_a_matmul_counts_the_flops_xla_counts():
  a = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  b = jax.ShapeDtypeStruct((128, 32), jnp.float32)
  compiled = _compiled(lambda a, b: a @ b, a, b)
  found = hlo_roofline.kernels(compiled.as_text())
  assert _total(found, "flops") == _xla(compiled, "flops") == 2 * 64 * 128 * 32
  assert {k.kind for k in found if k.flops} == {"matmul"}


def test_an_elementwise_kernel_moves_the_bytes_xla_counts():
  x = jax.ShapeDtypeStruct((1000,), jnp.float32)
  compiled = _compiled(lambda x: jnp.sin(x) * 2 + 1, x)
  found = hlo_roofline.kernels(compiled.as_text())
  assert _total(found, "flops") == 0
  assert _total(found, "bytes") == _xla(compiled, "bytes accessed") == 8000


@pytest.mark.parametrize("layers", [8, 16])
def test_a_loop_over_stacked_weights_counts_every_trip_and_one_layer_a_trip(layers):
  """XLA's cost analysis counts a while body once; a run executes it `layers` times. Each trip
  reads one layer of the stack, not the stack."""
  x = jax.ShapeDtypeStruct((16, 256), jnp.float32)
  w = jax.ShapeDtypeStruct((layers, 256, 256), jnp.float32)

  def net(x, w):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

  compiled = _compiled(net, x, w)
  found = hlo_roofline.kernels(compiled.as_text())
  assert _total(found, "flops") == layers * 2 * 16 * 256 * 256
  layer = 256 * 256 * 4
  looped = [k for k in found if k.count == layers]
  assert looped, [(k.name, k.count) for k in found]
  # A trip's kernels move a few layers' bytes (a slice copied, then read by the product), far
  # from the stack of 8 or 16 that counting whole operands would charge every trip.
  assert layer <= sum(k.bytes for k in looped) < 4 * layer


def test_time_is_the_larger_of_compute_and_memory():
  chip = hlo_roofline.Chip("test", 1e12, 1e9)
  kernel = hlo_roofline.Kernel("k", "main", "matmul", flops=2e12, bytes=1e9, count=1)
  assert hlo_roofline.kernel_seconds(kernel, chip) == 2.0
  kernel = hlo_roofline.Kernel("k", "main", "copy", flops=0.0, bytes=3e9, count=1)
  assert hlo_roofline.kernel_seconds(kernel, chip) == 3.0
