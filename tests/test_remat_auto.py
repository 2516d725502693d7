"""`model.remat_policy = "auto"` (svg_jax/train/remat.py) on the CPU, with budgets set by
`train.remat_memory_budget_gib`.

- XLA's memory_analysis of the real train step of configs/tiny.py (scanned layers, as the 2B
  stages) falls with every policy of the order, least recomputation first: the named-checkpoint
  policy saves memory against the saved Linear outputs and needs more than full remat.
- A huge budget picks "none", a budget between two figures the middle policy, a budget below
  every figure is one config-error line; the chosen step's peak is within the budget.
- The named policies compute the loss and gradients of "none" (JAX's own remat is the reference).
- The batch "auto" compiles for is the loader's (shapes, dtypes, shardings), the inputs of the
  step the trainer runs. (That the trainer then loads the chosen step from the compilation cache
  is not checked: on the CPU the candidates compile for analysis only and are not reused.)
- Through the trainer: the choice is a metrics.jsonl event and the policy of the checkpoints'
  config, and a resume keeps it even where a new choice would fail.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svg_jax import checkpoint as ckpt_lib
from svg_jax import parallel
from svg_jax.data import synthetic
from svg_jax.models.nextdit import NextDiT, NextDiTConfig, REMAT_POLICIES
from svg_jax.train import aot, dit_task, loop, remat, trainer

import tiny_trainer
from configs import tiny

GIB = 2 ** 30
CPU_ORDER = ("none", "dots", "dots_no_batch", "save_qkv_attn", "full")


def _tiny(**train):
  c = tiny.get_config()
  c.model.update(dict(scan_layers=True, remat_policy="auto"))
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  c.train.global_batch_size = 16
  c.train.remat_headroom = 0.0
  c.train.update(train)
  return c


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.fixture(scope="module")
def figures(mesh):
  """policy -> the compiled step's per-device peak (one compile each, shared by the tests)."""
  config = _tiny()
  hw, cap = remat.step_shape(config)
  return {p: remat.candidate_peak(config, mesh, p, hw=hw, cap_len=cap)
          for p in remat.candidates("cpu")}


def _measure(figures):
  return lambda policy: figures[policy]


def test_cpu_candidates_and_their_figures(figures):
  assert remat.candidates("cpu") == CPU_ORDER
  assert remat.candidates("gpu") == REMAT_POLICIES  # offload_qkv_attn between save and full
  peaks = [figures[p]["peak_bytes"] for p in CPU_ORDER]
  print({p: round(b / 2 ** 20, 1) for p, b in zip(CPU_ORDER, peaks)}, "MiB")
  assert all(a > b for a, b in zip(peaks, peaks[1:])), peaks


def test_a_huge_budget_picks_none(figures, mesh, tmp_path):
  config, event = remat.resolve(_tiny(remat_memory_budget_gib=1e6), mesh, str(tmp_path),
                                measure=_measure(figures))
  assert config.model.remat_policy == "none"
  assert event["policy"] == "none" and event["source"] == "measured"
  assert [c["policy"] for c in event["candidates"]] == ["none"]


def test_a_budget_between_two_figures_picks_the_middle_policy(figures, mesh, tmp_path):
  low, high = figures["save_qkv_attn"]["peak_bytes"], figures["dots_no_batch"]["peak_bytes"]
  budget = (low + high) / 2
  config, event = remat.resolve(_tiny(remat_memory_budget_gib=budget / GIB), mesh,
                                str(tmp_path), measure=_measure(figures))
  assert config.model.remat_policy == event["policy"] == "save_qkv_attn"
  assert [c["policy"] for c in event["candidates"]] == list(CPU_ORDER[:4])
  assert [c["fits"] for c in event["candidates"]] == [False, False, False, True]
  assert event["candidates"][-1]["peak_gib"] * GIB <= budget


def test_the_chosen_policys_compiled_peak_is_within_the_budget(figures, mesh, tmp_path):
  """The same budget with the chooser's own compiles (no shared figures)."""
  budget = (figures["dots"]["peak_bytes"] + figures["none"]["peak_bytes"]) / 2
  config, event = remat.resolve(_tiny(remat_memory_budget_gib=budget / GIB), mesh,
                                str(tmp_path))
  assert config.model.remat_policy == "dots"
  hw, cap = remat.step_shape(config)
  again = remat.candidate_peak(config, mesh, "dots", hw=hw, cap_len=cap)
  assert again["peak_bytes"] <= budget


@pytest.mark.parametrize("squeezed, picked", [
    # XLA squeezed dots (it recomputes to fit its own limit): the next policy that fits as it is
    (("dots",), "dots_no_batch"),
    # every policy that fits was squeezed: the first of them, rather than no run at all
    (("dots", "dots_no_batch", "save_qkv_attn", "full"), "dots"),
])
def test_a_policy_xla_had_to_squeeze_gives_way_to_one_that_fits_as_it_is(figures, mesh, tmp_path,
                                                                          squeezed, picked):
  """The CPU's compiles with XLA:GPU's verdict on some (`aot.xla_recomputed` > 0), and a budget
  that every policy but "none" fits."""
  budget = (figures["dots"]["peak_bytes"] + figures["none"]["peak_bytes"]) / 2
  rows = {p: dict(r, xla_recomputed=7 if p in squeezed else 0) for p, r in figures.items()}
  config, event = remat.resolve(_tiny(remat_memory_budget_gib=budget / GIB), mesh,
                                str(tmp_path), measure=_measure(rows))
  assert config.model.remat_policy == event["policy"] == picked
  tried = [c["policy"] for c in event["candidates"]]
  assert tried[-1] == ("dots_no_batch" if picked == "dots_no_batch" else "full"), tried
  assert [c["xla_recomputed"] for c in event["candidates"]] == [
      7 if p in squeezed else 0 for p in tried]


def test_a_budget_below_full_is_one_config_error_line(figures, mesh, tmp_path):
  budget = figures["full"]["peak_bytes"] * 0.9
  with pytest.raises(loop.ConfigError) as info:
    remat.resolve(_tiny(remat_memory_budget_gib=budget / GIB), mesh, str(tmp_path),
                  measure=_measure(figures))
  text = str(info.value)
  assert isinstance(info.value, remat.RematBudgetError) and "\n" not in text
  assert text.startswith("model.remat_policy auto: no policy fits")
  assert all(f"{p} " in text for p in CPU_ORDER)


def test_a_set_policy_is_left_alone(mesh, tmp_path):
  config = _tiny()
  config.model.remat_policy = "dots"
  assert remat.resolve(config, mesh, str(tmp_path)) == (config, None)


# ----------------------------------------------------------------------------- same function

CFG = NextDiTConfig(
    patch_size=1, in_channels=16, dim=96, n_layers=2, n_refiner_layers=1, n_heads=6, n_kv_heads=2,
    multiple_of=32, cap_feat_dim=32, axes_dims=(4, 6, 6))


def _loss_and_grads(cfg, params, inputs):
  model = NextDiT(cfg)

  def loss(p):
    return jnp.mean(jnp.square(model.apply({"params": p}, *inputs)))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def without_remat():
  """scan -> (config, params, inputs, loss, gradients) of remat "none"."""
  rng = np.random.default_rng(0)
  inputs = (rng.standard_normal((2, 4, 6, CFG.in_channels)).astype(np.float32),
            np.array([0.3, 0.8], np.float32),
            rng.standard_normal((2, 8, CFG.cap_feat_dim)).astype(np.float32),
            np.arange(8)[None] < np.array([[3], [8]]))
  out = {}
  for scan in (True, False):
    base = dataclasses.replace(CFG, scan_layers=scan, remat_policy="none")
    params = NextDiT(base).init(jax.random.PRNGKey(1), *inputs)["params"]
    params = jax.tree.map(  # non-zero adaLN / final layers, so every block gets gradients
        lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(2), x.shape), params)
    out[scan] = (base, params, inputs, *_loss_and_grads(base, params, inputs))
  return out


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("policy", ["save_qkv_attn", "offload_qkv_attn", "auto"])
def test_named_policies_give_the_loss_and_gradients_of_none(without_remat, policy, scan):
  base, params, inputs, ref_value, ref_grads = without_remat[scan]
  value, grads = _loss_and_grads(dataclasses.replace(base, remat_policy=policy), params, inputs)
  assert abs(float(value) - float(ref_value)) <= 1e-6 * abs(float(ref_value))
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  flat = jax.tree.leaves(grads)
  assert len(flat) == len(flat_ref) > 20
  for (path, r), g in zip(flat_ref, flat):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- the trainer

MODEL = dict(in_channels=8, cap_feat_dim=16, dim=64, n_heads=4, n_kv_heads=2, axes_dims=(4, 6, 6),
             n_layers=2, n_refiner_layers=1, multiple_of=32, scan_layers=True, remat_policy="auto")


def _train_config(data_dir, **train):
  defaults = dict(global_batch_size=8, log_every=1, checkpoint_every=2)
  return tiny_trainer.config(data_dir, MODEL, **{**defaults, **train})


def _events(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r.get("event") == remat.EVENT]


def test_a_process_that_cannot_read_the_saved_policy_takes_the_others(mesh, tmp_path):
  """The checkpoint's policy is a vote over the processes (the loop's max): a process whose read
  failed takes the policy another process read instead of measuring alone."""
  votes = []

  def agree(vote, after_compiles=False):  # the other process read "dots" from the newest checkpoint
    votes.append(vote)
    return max(vote, 1 + REMAT_POLICIES.index("dots"))

  def measure(policy):
    raise AssertionError(f"measured {policy}")

  config, event = remat.resolve(_tiny(), mesh, str(tmp_path), agree, measure=measure)
  assert votes == [0]
  assert config.model.remat_policy == "dots" and event == {
      "event": remat.EVENT, "policy": "dots", "source": "checkpoint"}


def test_the_trainer_records_the_choice_and_a_resume_keeps_it(tmp_path):
  data = str(tmp_path / "data")
  synthetic.write_random_dataset(data, buckets=[(4, 4)], num_records=32, latent_channels=8,
                                 text_dim=16, caption_len=(1, 8))
  workdir = str(tmp_path / "run")
  trainer.train(_train_config(data, num_steps=2, remat_memory_budget_gib=1e6), workdir)
  (first,) = _events(workdir)
  assert first["policy"] == "none" and first["source"] == "measured"
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    assert ckpt.all_steps() == [2]
    assert ckpt.read_config(2)["model"]["remat_policy"] == "none"
  finally:
    ckpt.close()
  # A budget no policy fits (1 KiB): a new choice would fail, the resume keeps its policy.
  summary = trainer.train(_train_config(data, num_steps=3, remat_memory_budget_gib=2 ** -20),
                          workdir)
  assert summary["resumed_from"] == 2 and summary["step"] == 3
  assert [(e["step"], e["policy"], e["source"]) for e in _events(workdir)] == [
      (0, "none", "measured"), (2, "none", "checkpoint")]


def test_auto_compiles_for_the_batch_the_loader_gives(tmp_path):
  data = str(tmp_path / "data")
  synthetic.write_random_dataset(data, buckets=[(4, 4)], num_records=32, latent_channels=8,
                                 text_dim=16, caption_len=(1, 8))
  config = _train_config(data, num_steps=1)
  mesh = parallel.make_mesh(dict(config.mesh))
  setup = dit_task.DiTSetup(config, mesh)
  iterator = setup.make_data_iterator()
  try:
    real = setup.device_batch(next(iterator))
  finally:
    iterator.close()
  hw, cap_len = remat.step_shape(config)
  assert (hw, cap_len) == ((4, 4), real["text_mask"].shape[1])
  abstract = aot.abstract_batch(config, mesh, cap_len=cap_len, hw=hw)
  assert sorted(abstract) == sorted(real)
  for key, x in real.items():
    a = abstract[key]
    assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding), key
