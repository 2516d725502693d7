"""How this process reads a Grain dataset: reader threads and a prefetch buffer, and, with
`num_workers`, worker processes that end when this process does (a killed trainer left them
running). What the DiT's record loader (pipeline.py) and the decoder's image loader
(image_pipeline.py) share."""
from __future__ import annotations

import functools
import os

import grain
from absl import flags

from svg_jax.utils import orphan_watch


def _end_with_reader(reader_pid: int, worker_index: int, worker_count: int) -> None:
  """Grain's worker init: the worker ends when the process it loads for does, however that ends."""
  del worker_index, worker_count
  orphan_watch.exit_with_parent(reader_pid)


def read(ds: grain.MapDataset, *, num_threads: int, prefetch_buffer_size: int,
         num_workers: int = 0) -> grain.IterDataset:
  """`ds` as the iterable dataset this process reads (worker processes when num_workers > 0)."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=prefetch_buffer_size))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags
      flags.FLAGS.mark_as_parsed()  # outside an absl app: use the flag defaults
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                              worker_init_fn=functools.partial(_end_with_reader, os.getpid()))
  return it_ds
