"""Shapes dataset items with their images, rendered in memory (`write_dataset` renders the same
item into its PNG)."""
from svg_jax.demo import shapes


def make_item(seed: int, split: str, index: int, image_size: int,
              layouts: str = "jittered") -> dict:
  """`shapes.item_spec` plus "image": uint8 [S, S, 3]."""
  item = shapes.item_spec(seed, split, index, image_size, layouts)
  item["image"] = shapes.render(item["objects"], image_size)
  return item
