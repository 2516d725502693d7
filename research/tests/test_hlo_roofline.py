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


@pytest.mark.parametrize("take,xla_sees_it", [
    (lambda w: w[3] * 2, True),  # a static slice
    (lambda w: w[3].astype(jnp.bfloat16) * 2, True),  # then a conversion
    (lambda w: jax.lax.split(w.astype(jnp.bfloat16), [1] * 8)[3][0] * 2, False),  # convert first
], ids=["slice", "slice_convert", "convert_slice"])
def test_a_kernel_that_slices_a_stack_reads_the_slice(take, xla_sees_it):
  """One layer of a stack of 8 taken in a fused kernel (the unrolled layer loop's weights) reads
  that layer's elements at the stack's 4 bytes, not the stack. XLA's own analysis agrees where
  the slice comes first; where a conversion does, it charges the whole stack."""
  w = jax.ShapeDtypeStruct((8, 256, 256), jnp.float32)
  compiled = _compiled(take, w)
  found = hlo_roofline.kernels(compiled.as_text())
  read = 256 * 256 * 4
  written = 256 * 256 * jnp.dtype(compiled.out_info.dtype).itemsize
  assert _total(found, "bytes") == read + written
  assert (_xla(compiled, "bytes accessed") == read + written) == xla_sees_it


def test_time_is_the_larger_of_compute_and_memory():
  chip = hlo_roofline.Chip("test", 1e12, 1e9)
  kernel = hlo_roofline.Kernel("k", "main", "matmul", flops=2e12, bytes=1e9, count=1)
  assert hlo_roofline.kernel_seconds(kernel, chip) == 2.0
  kernel = hlo_roofline.Kernel("k", "main", "copy", flops=0.0, bytes=3e9, count=1)
  assert hlo_roofline.kernel_seconds(kernel, chip) == 3.0


def test_without_collectives_the_timeline_is_the_kernels_sum():
  x = jax.ShapeDtypeStruct((16, 256), jnp.float32)
  w = jax.ShapeDtypeStruct((8, 256, 256), jnp.float32)
  hlo = _compiled(lambda x, w: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0],
                  x, w).as_text()
  chip = hlo_roofline.Chip("test", 1e12, 1e9, 1e9)
  timed = hlo_roofline.timeline(hlo, chip)
  assert timed["link_seconds"] == 0
  assert timed["seconds"] == pytest.approx(timed["compute_seconds"])
  assert timed["seconds"] == pytest.approx(hlo_roofline.summary(hlo_roofline.kernels(hlo),
                                                                chip)["seconds"])


@pytest.mark.parametrize("op, per_device_bytes", [
    # A ring over n devices: all-gather receives the n - 1 other shards, reduce-scatter sends
    # n - 1 partial shards, all-reduce does both (4 KB of f32 per device here, n = 8).
    ("all_gather", 7 * 4000),
    ("psum_scatter", 7 / 8 * 4000),
    ("psum", 2 * 7 / 8 * 4000),
])
def test_a_collective_moves_what_a_ring_moves_through_each_link(op, per_device_bytes):
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(jax.devices()[:8], ("x",))

  def body(block):  # each device's [1, 1000] block of an [8, 1000] array
    if op == "all_gather":
      return jax.lax.all_gather(block, "x", tiled=True)
    if op == "psum_scatter":
      return jax.lax.psum_scatter(block.reshape(8, 125), "x", tiled=True)
    return jax.lax.psum(block, "x")

  fn = jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
  hlo = _compiled(fn, jax.ShapeDtypeStruct((8, 1000), jnp.float32)).as_text()
  found = [k for k in hlo_roofline.kernels(hlo) if k.kind == "collective"]
  assert [k.bytes for k in found] == [pytest.approx(per_device_bytes)], hlo


_OVERLAP_HLO = """HloModule overlap, is_scheduled=true

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (p: f32[1000], q: f32[250000]) -> (f32[8000], f32[250000]) {
  %p = f32[1000]{0} parameter(0)
  %q = f32[250000]{0} parameter(1)
  %ag = (f32[1000]{0}, f32[8000]{0}) all-gather-start(%p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %work = f32[250000]{0} negate(%q)
  %gathered = f32[8000]{0} all-gather-done(%ag)
  %more = f32[250000]{0} negate(%work)
  ROOT %out = (f32[8000]{0}, f32[250000]{0}) tuple(%gathered, %more)
}
"""


@pytest.mark.parametrize("link, exposed", [(28e6, 0.0), (28e3, 1.0 - 2e-3)])
def test_an_async_collective_overlaps_the_kernels_between_its_start_and_done(link, exposed):
  """The all-gather moves 28 KB (7 of 8 shards of 4 KB); each negate moves 2 MB, 2 ms at 1 GB/s.
  A fast link hides it behind the first negate; a slow one (1 s) stalls the second until it is
  done."""
  chip = hlo_roofline.Chip("test", 1e12, 1e9, link)
  timed = hlo_roofline.timeline(_OVERLAP_HLO, chip)
  assert timed["compute_seconds"] == pytest.approx(4e-3)
  assert timed["link_seconds"] == pytest.approx(28e3 / link)
  assert timed["seconds"] - timed["compute_seconds"] == pytest.approx(exposed)
