"""The parameter update of a train step against PyTorch's own optimizer code, the official
trainer's: `torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW`, and an EMA by torch's
`swa_utils` averaging function, with the recipe of the 2B stage configs (docs/reference.md §5:
clip 2.0, betas (0.9, 0.95), eps 1e-15, constant lr 2e-4, EMA 0.95), and with weight decay."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim import swa_utils

from configs import svg_t2i_2b
from svg_jax.train import state as state_lib

SHAPES = {"w1": (6, 5), "b1": (5,), "w2": (5, 3, 2)}


def _torch_run(params, grads_per_step, train_cfg):
  tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
  ema = {k: t.detach().clone() for k, t in tensors.items()}
  average = swa_utils.get_ema_multi_avg_fn(float(train_cfg.ema_decay))
  opt = torch.optim.AdamW(list(tensors.values()), lr=float(train_cfg.lr),
                          betas=(float(train_cfg.b1), float(train_cfg.b2)),
                          eps=float(train_cfg.eps), weight_decay=float(train_cfg.weight_decay))
  norms = []
  for step, grads in enumerate(grads_per_step):
    for k, t in tensors.items():
      t.grad = torch.tensor(grads[k], dtype=torch.float64)
    norms.append(float(torch.nn.utils.clip_grad_norm_(list(tensors.values()),
                                                      float(train_cfg.grad_clip))))
    opt.step()
    keys = list(tensors)
    average([ema[k] for k in keys], [tensors[k].detach() for k in keys], torch.tensor(step))
  return ({k: t.detach().numpy() for k, t in tensors.items()},
          {k: t.numpy() for k, t in ema.items()}, norms)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_clip_adamw_and_ema_match_torch(weight_decay):
  train_cfg = svg_t2i_2b.get_config("stage1_256").train
  assert (train_cfg.lr_schedule, float(train_cfg.grad_clip), float(train_cfg.eps)) == (
      "constant", 2.0, 1e-15)
  train_cfg.weight_decay = weight_decay
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  # Gradient norms about 8, 0.5, 3, 0.05: clipped and unclipped steps alternate.
  grads_per_step = [{k: (scale * rng.normal(size=s) / 4).astype(np.float32)
                     for k, s in SHAPES.items()} for scale in (8.0, 0.5, 3.0, 0.05)]
  tx = state_lib.make_optimizer(train_cfg)
  update = jax.jit(lambda st, g: state_lib.apply_gradients(st, g, tx, float(train_cfg.ema_decay)))
  state = state_lib.create_state(jax.tree.map(jnp.asarray, params), tx)
  for grads in grads_per_step:
    state = update(state, jax.tree.map(jnp.asarray, grads))
  ours = jax.device_get(state)
  want_params, want_ema, norms = _torch_run(params, grads_per_step, train_cfg)
  assert norms[0] > 2.0 > norms[1] and norms[2] > 2.0 > norms[3]
  assert int(ours.step) == len(grads_per_step)
  for k in SHAPES:
    moved = np.abs(want_params[k] - params[k]).max()
    assert moved > 1e-4  # four steps of lr 2e-4 moved every tensor
    np.testing.assert_allclose(ours.params[k], want_params[k], rtol=0, atol=1e-3 * moved, err_msg=k)
    np.testing.assert_allclose(ours.ema_params[k], want_ema[k], rtol=0, atol=1e-3 * moved,
                               err_msg=k)
