"""The trainer tests' config: configs/tiny.py's DiT task with a test model on a records folder."""
from configs import tiny


def config(data_dir: str, model: dict, **train):
  """configs/tiny.py with `model` over its model section, records from `data_dir` with captions
  padded to one 16-token bucket, and `train` over its train section."""
  c = tiny.get_config()
  c.model.update(model)
  c.data.path = data_dir
  c.data.caption_len_buckets = (16,)
  c.data.max_caption_len = 16
  c.train.update(train)
  return c
