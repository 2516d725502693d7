"""The zero-copy msgpack reader against msgpack itself: same values and types for everything our
records use, at every length-field width, bins that are views of the input, and refusals where
msgpack refuses (or where the subset ends)."""
import msgpack
import numpy as np
import pytest

from svg_jax.data import msgpack_view


def _same(ours, want):
  """Equal values of equal types (True is not 1, 1 is not 1.0), maps in the same key order; bins
  come back as memoryviews where msgpack gives bytes, so those compare by content."""
  if isinstance(ours, memoryview):
    ours = bytes(ours)
  if type(ours) is not type(want):
    return False
  if isinstance(want, dict):
    return list(ours) == list(want) and all(_same(ours[k], want[k]) for k in want)
  if isinstance(want, list):
    return len(ours) == len(want) and all(map(_same, ours, want))
  return ours == want


def _random_object(rng, depth=0):
  kind = rng.integers(0, 9 if depth < 3 else 6)
  if kind == 0:
    return int(rng.choice([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
                           -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]))
  if kind == 1:
    return float(rng.standard_normal())
  if kind == 2:
    return [None, True, False][rng.integers(0, 3)]
  if kind == 3:  # str8 / str16 / str32 widths, non-ASCII included
    return "ä" * int(rng.choice([0, 5, 31, 32, 255, 256, 70000]))
  if kind in (4, 5):
    return rng.bytes(int(rng.choice([0, 1, 255, 256, 65535, 65536, 100000])))
  if kind == 6:
    return [_random_object(rng, depth + 1) for _ in range(int(rng.choice([0, 3, 15, 16, 17])))]
  return {f"k{i}": _random_object(rng, depth + 1)
          for i in range(int(rng.choice([0, 2, 15, 16, 17])))}


@pytest.mark.parametrize("seed", range(20))
def test_values_match_msgpack(seed):
  obj = _random_object(np.random.default_rng(seed))
  data = msgpack.packb(obj, use_bin_type=True)
  want = msgpack.unpackb(data, raw=False, strict_map_key=True)
  assert _same(msgpack_view.unpack(data), want)


def test_float32_and_a_record_like_map():
  data = msgpack.packb({"x": 1.5, "a": {"dtype": "bfloat16", "shape": [2, 3], "data": b"\x01" * 12}},
                       use_bin_type=True, use_single_float=True)
  assert _same(msgpack_view.unpack(data), msgpack.unpackb(data))


@pytest.mark.parametrize("n, array_marker, map_marker", [
    (65535, 0xdc, 0xde), (65536, 0xdd, 0xdf)], ids=["16-bit", "32-bit"])
def test_the_widest_array_and_map_length_fields(n, array_marker, map_marker):
  """array16/map16 at their largest and array32/map32 (65,536 entries) the random objects above
  never reach."""
  items = [i % 300 - 40 for i in range(n)]  # fixints, negative fixints, uint8, int8
  keyed = {f"k{i}": v for i, v in enumerate(items)}
  for obj, marker in ((items, array_marker), (keyed, map_marker)):
    data = msgpack.packb(obj, use_bin_type=True)
    assert data[0] == marker
    assert _same(msgpack_view.unpack(data), msgpack.unpackb(data, raw=False, strict_map_key=True))


def test_bins_are_read_only_views_of_the_input():
  payload = np.arange(1000, dtype=np.float32).tobytes()
  data = msgpack.packb({"outer": msgpack.packb({"data": payload}, use_bin_type=True)},
                       use_bin_type=True)
  inner = msgpack_view.unpack(msgpack_view.unpack(data)["outer"])["data"]
  assert isinstance(inner, memoryview) and inner.readonly
  arr = np.frombuffer(inner, np.float32)
  assert np.shares_memory(arr, np.frombuffer(data, np.uint8))  # no copy at either level
  np.testing.assert_array_equal(arr, np.arange(1000, dtype=np.float32))


def test_truncation_and_trailing_bytes_are_refused_like_msgpack():
  data = msgpack.packb({"a": [1, 2.5, "xyz", b"\x00" * 300], "b": None}, use_bin_type=True)
  for cut in range(len(data)):
    with pytest.raises(ValueError):
      msgpack_view.unpack(data[:cut])
    with pytest.raises(Exception):
      msgpack.unpackb(data[:cut])
  with pytest.raises(ValueError, match="trailing"):
    msgpack_view.unpack(data + b"\x00")


@pytest.mark.parametrize("data, why", [
    (msgpack.packb(msgpack.ExtType(1, b"ab")), "outside the supported subset"),
    (msgpack.packb({1: 2}), "map key"),
    (b"\xa2\xff\xfe", "utf-8"),
    (b"\x91" * 40 + b"\x00", "too deep"),
])
def test_what_the_subset_refuses(data, why):
  with pytest.raises(ValueError, match=why):
    msgpack_view.unpack(data)
