"""The error every converter raises when a checkpoint and a model config disagree."""

from svg_jax.input_errors import InputError


class KeyMismatchError(InputError):
  """A checkpoint does not match the model: lists missing, unexpected and mis-shaped keys."""

  def __init__(self, what: str, missing=(), unexpected=(), misshaped=(), model: str = "model"):
    parts = [f"{what} does not match the {model} config"]
    for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      items = sorted(items)
      if items:
        shown = ", ".join(items[:30]) + (f", ... ({len(items)} in all)" if len(items) > 30 else "")
        parts.append(f"{name} keys: {shown}")
    super().__init__("; ".join(parts))
    self.missing, self.unexpected, self.misshaped = set(missing), set(unexpected), set(misshaped)
