"""The demo's wiring (the full run is `bash launch/demo.sh`, minutes long, not a test)."""
import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import script_runs

from svg_jax import config as config_lib
from svg_jax.demo import configs as demo_configs
from svg_jax.demo import pipeline as demo
from svg_jax.demo import shapes
from svg_jax.input_errors import InputError
from svg_jax.train import dit_task
from svg_jax.utils import ctrl_c

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("preset", sorted(demo_configs.PRESETS))
def test_demo_dit_matches_its_encoder_and_is_wide_enough(tmp_path, preset):
  stages = demo.Stages(demo.DemoSettings(workdir=str(tmp_path), preset=preset))
  decoder = stages.decoder_config()
  dit = stages.dit_config(str(tmp_path / "records"), decoder)
  assert dit.autoencoder.encoder.patch_size == decoder.autoencoder.encoder.patch_size == 8
  # The DiT's latent is the preset's encoder's output, which its decoder takes.
  p = demo_configs.preset(preset)
  assert (dit.model.in_channels == dit.autoencoder.encoder.dim == decoder.autoencoder.encoder.dim
          == decoder.autoencoder.decoder.z_channels == p.encoder_dim)
  # The decoder upsamples by the encoder's patch, so reconstructions have the image size.
  assert 2 ** (len(decoder.autoencoder.decoder.ch_mult) - 1) == 8
  # configs/tiny.py alone loads what the demo trained (docs/demo.md scores a demo with it).
  alone = demo_configs.dit(preset).autoencoder
  assert alone.decoder.to_dict() == decoder.autoencoder.decoder.to_dict()
  assert alone.encoder.to_dict() == decoder.autoencoder.encoder.to_dict()
  model = config_lib.nextdit_config(dit)
  assert dit_task.bottleneck_problems(model) == []
  half = p.encoder_dim // 2
  narrow = dataclasses.replace(model, dim=half)
  assert (f"model.dim {half} is below the patch's {p.encoder_dim} input dimensions"
          in dit_task.bottleneck_problems(narrow)[0])
  assert stages.s.dit_steps == p.dit_steps and stages.s.num_train == p.num_train


def test_a_workdir_of_another_preset_stops_the_demo_with_one_line(tmp_path):
  demo.Stages(demo.DemoSettings(workdir=str(tmp_path), preset="full"))
  demo.Stages(demo.DemoSettings(workdir=str(tmp_path), preset="full"))  # the same: goes on
  with pytest.raises(SystemExit, match=r"was made with num_train=2000, preset=full \(asked: "
                     r"num_train=4000, preset=small\); run these settings in a fresh --workdir"):
    demo.Stages(demo.DemoSettings(workdir=str(tmp_path)))
  with pytest.raises(ValueError, match="unknown demo preset 'huge'"):
    demo.DemoSettings(workdir=str(tmp_path), preset="huge")


def test_a_demo_with_few_held_out_images_evaluates_its_decoder_on_all_of_them(tmp_path):
  """8 held-out images: the decoder's evaluation takes those 8 (64 stopped the demo after its data
  was made); none is refused before anything is made."""
  stages = demo.Stages(demo.DemoSettings(workdir=str(tmp_path), num_heldout=8))
  assert stages.decoder_config().data.num_eval_images == 8
  assert demo.Stages(demo.DemoSettings(workdir=str(tmp_path / "b"))).decoder_config(
      ).data.num_eval_images == 64
  with pytest.raises(InputError, match="--num_heldout must be >= 1, got 0"):
    demo.DemoSettings(workdir=str(tmp_path), num_heldout=0)


def test_a_stage_stopped_by_a_signal_stops_the_demo():
  demo._finished({"stopped_by": None, "step": 800}, "decoder training")  # finished: goes on
  with pytest.raises(SystemExit, match="decoder training stopped by SIGTERM at step 412 "
                     r"\(checkpoint saved\); rerun the same command to resume") as stopped:
    demo._finished({"stopped_by": "SIGTERM", "step": 412}, "decoder training")
  assert stopped.value.code == 143  # as a shell reports a job SIGTERM ended
  with pytest.raises(SystemExit, match="stopped by SIGINT at step 41") as stopped:
    demo._finished({"stopped_by": "SIGINT", "step": 41}, "DiT training")
  assert stopped.value.code == 130  # Ctrl-C, as every other stage


@pytest.mark.parametrize("flags, message", [
    (dict(dit_steps=-5), "--dit_steps must be >= 1, got -5"),
    (dict(decoder_steps=0), "--decoder_steps must be >= 1, got 0"),
    (dict(sample_steps=0), "--sample_steps must be >= 1, got 0"),
    (dict(sample_steps=0, validate_every=0), "--sample_steps must be >= 1, got 0"),
    (dict(validate_every=-1), "--validate_every must be >= 0, got -1"),
    (dict(seen_per_category=-2), "--seen_per_category must be >= 0, got -2"),
    (dict(cfg_scale=float("nan")), "--cfg_scale must be finite, got nan"),
    (dict(shift=float("inf")), "--shift must be finite, got inf"),
    (dict(shift=0.0), "shift must be a positive number, got 0.0"),
])
def test_bad_demo_settings_are_refused_before_any_stage(tmp_path, flags, message):
  """Found by the settings, before minutes of data and decoder training (a sampler setting was
  refused only at stage 4 or 5, as a traceback)."""
  with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
    demo.DemoSettings(workdir=str(tmp_path / "w"), **flags)
  assert not (tmp_path / "w").exists()


def test_a_workdir_that_cannot_be_made_is_one_line(tmp_path):
  (tmp_path / "afile").write_text("")
  with pytest.raises(InputError, match="--workdir .*afile cannot be made"):
    demo.Stages(demo.DemoSettings(workdir=str(tmp_path / "afile")))
  with pytest.raises(InputError, match="--workdir .*afile/sub cannot be made"):
    demo.Stages(demo.DemoSettings(workdir=str(tmp_path / "afile" / "sub")))


def test_a_second_demo_run_on_one_workdir_is_refused_in_one_line(tmp_path):
  """Two runs on one workdir would train into the same checkpoint folders."""
  workdir = tmp_path / "w"
  with demo.workdir_lock(str(workdir)):
    with pytest.raises(InputError, match=rf"--workdir {workdir} is in use by another demo run "
                       rf"\(pid {os.getpid()}\); wait for it to end or use another --workdir"):
      with demo.workdir_lock(str(workdir)):
        pass
    out = script_runs.run("demo.py", "--workdir", workdir, timeout=120)
    script_runs.assert_one_line(out, f"--workdir {workdir} is in use by another demo run "
                                f"(pid {os.getpid()})")
  with demo.workdir_lock(str(workdir)):  # released: the next run goes on
    pass


def test_a_swallowed_ctrl_c_stops_the_demo_after_its_stage(tmp_path):
  """A Ctrl-C raised inside a gc callback is only reported ("Exception ignored"): the stage
  returns, and the demo stops there instead of running on."""
  stages = demo.Stages(demo.DemoSettings(workdir=str(tmp_path)))
  stages.interrupts = ctrl_c.Remembered()
  assert stages._timed("2/5 demo text encoder", lambda: "done") == "done"

  def swallowed():
    stages.interrupts.received = True  # what the handler records before raising
    return "done"
  with pytest.raises(SystemExit, match="demo: stage 2/5 demo text encoder interrupted by "
                     "SIGINT") as stopped:
    stages._timed("2/5 demo text encoder", swallowed)
  assert stopped.value.code == 130
  with stages.interrupts.installed():
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)


def test_a_dit_trained_past_the_asked_steps_stops_the_demo():
  """scores.json names the settings' steps: a workdir's DiT trained further is not scored under
  them."""
  demo._not_past({"stopped_by": None, "step": 300}, 300, "runs/demo/dit")  # as asked: goes on
  with pytest.raises(SystemExit, match=r"runs/demo/dit holds a DiT trained to step 1200, past "
                     r"--dit_steps 300; run these settings in a fresh --workdir"):
    demo._not_past({"stopped_by": None, "step": 1200}, 300, "runs/demo/dit")
  with pytest.raises(SystemExit, match=r"runs/demo/decoder holds a decoder trained to step 400, "
                     r"past --decoder_steps 40; run these settings in a fresh --workdir"):
    demo._not_past({"stopped_by": None, "step": 400}, 40, "runs/demo/decoder", "decoder",
                   "--decoder_steps")


def test_a_decoder_trained_past_the_asked_steps_stops_the_demo(tmp_path, monkeypatch):
  """A smaller --decoder_steps on a workdir whose decoder trained further was ignored (scores.json
  then named the smaller number)."""
  monkeypatch.setattr(demo.decoder_data, "prepare_for", lambda *a, **k: None)
  monkeypatch.setattr(demo.trainer, "train", lambda c, w: {"stopped_by": None, "step": 400})
  demo.Stages(demo.DemoSettings(workdir=str(tmp_path), decoder_steps=400)).train_decoder()
  with pytest.raises(SystemExit, match=r"decoder holds a decoder trained to step 400, past "
                     r"--decoder_steps 40; run these settings in a fresh --workdir"):
    demo.Stages(demo.DemoSettings(workdir=str(tmp_path), decoder_steps=40)).train_decoder()


def test_seen_prompts_are_training_items_balanced_per_category(tmp_path):
  stages = demo.Stages(demo.DemoSettings(workdir=str(tmp_path)))
  decoder = stages.decoder_config()
  data_dir = tmp_path / "data"
  shapes.write_dataset(str(data_dir), num_train=60, num_heldout=12, image_size=32, seed=0)
  decoder.data.jsonl = str(data_dir / "train.jsonl")
  seen = stages.seen(decoder, per_category=3)
  train = shapes.read_split(str(data_dir), "train")
  assert collections.Counter(item["metadata"]["tag"] for item in seen) == {
      tag: 3 for tag in shapes.CATEGORIES}
  assert all(item in train for item in seen)
  heldout_prompts = {item["prompt"] for item in stages.heldout(decoder)}
  novel = [i for i in seen if i["metadata"]["tag"] != "single_object"]
  assert not heldout_prompts & {item["prompt"] for item in novel}


def test_a_workdir_of_the_other_text_encoder_stops_the_demo_with_a_clear_message(tmp_path):
  """A workdir made before the demo's text encoder changed holds records and a DiT of the old one:
  the demo refuses it with the fix instead of mixing the two."""
  data_dir = tmp_path / "data"
  shapes.write_dataset(str(data_dir), num_train=24, num_heldout=6, image_size=32, seed=0)
  old = demo.Stages(demo.DemoSettings(workdir=str(tmp_path / "w"), text_weights="random"))
  decoder = old.decoder_config()
  decoder.data.jsonl = str(data_dir / "train.jsonl")
  folder = old.text_encoder(decoder)
  new = demo.Stages(demo.DemoSettings(workdir=str(tmp_path / "w")))
  assert new.s.text_weights == "word_context"
  with pytest.raises(SystemExit, match=r"differs in \['spec'\].*run the demo in a fresh --workdir"):
    new.text_encoder(decoder)
  assert old.text_encoder(decoder) == folder  # the old settings still find their encoder


def test_precompute_demo_variant_makes_records_that_configs_tiny_takes(tmp_path):
  """The README's route without the official weights: the demo's random DINOv3 and text encoder
  on a folder of images with .txt captions, through `configs/precompute.py:demo`; the records'
  latent grid, channels and caption width are what configs/tiny.py's model reads."""
  from svg_jax.demo import decoder_data
  from svg_jax.demo.text_encoder import ensure_demo_text_encoder
  decoder = demo_configs.decoder()
  paths = decoder_data.prepare_for(decoder, str(tmp_path / "demo"), num_train=6, num_heldout=0,
                                   seed=0, layouts="fixed")
  items = shapes.read_split(os.path.dirname(paths["data.jsonl"]), "train")
  text_dir = ensure_demo_text_encoder(str(tmp_path / "text"), [i["prompt"] for i in items],
                                      seed=0)
  images = tmp_path / "images"
  images.mkdir()
  for n, item in enumerate(items):
    shutil.copy(item["path"], images / f"{n}.png")
    (images / f"{n}.txt").write_text(item["prompt"])
  out = tmp_path / "records"
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "precompute.py"), "--config",
       os.path.join(REPO, "configs", "precompute.py:demo"), "--input", str(images),
       "--input_format", "folder", "--out", str(out),
       f"--config.autoencoder.encoder_path={paths['autoencoder.encoder_path']}",
       f"--config.autoencoder.stats_path={paths['autoencoder.stats_path']}",
       f"--config.precompute.text_encoder_dir={text_dir}"],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-2000:]
  with open(out / "manifest.json") as f:
    manifest = json.load(f)
  tiny = config_lib.nextdit_config(demo_configs.dit())
  side = demo_configs.RESOLUTION // decoder.autoencoder.encoder.patch_size
  assert manifest["num_records"] == len(items) and manifest["buckets"] == {f"{side}x{side}": 6}
  assert manifest["text"] == {"kind": "text_features", "dim": tiny.cap_feat_dim}
  assert manifest["latent_channels"] == tiny.in_channels


@pytest.mark.parametrize("preset, layouts", [("small", "fixed"), ("full", "jittered")])
def test_make_demo_data_writes_the_presets_layouts(tmp_path, preset, layouts):
  out = tmp_path / "shapes"
  run = subprocess.run([sys.executable, os.path.join(REPO, "launch", "make_demo_data.py"),
                        "--out", str(out), "--num_train", "12", "--num_heldout", "6",
                        "--preset", preset], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"{layouts} layouts" in run.stdout
  with open(out / shapes.MANIFEST) as f:
    assert json.load(f)["layouts"] == layouts
  first = shapes.read_split(str(out), "train")[0]
  assert first["objects"] == shapes.item_spec(0, "train", 0, 64, layouts)["objects"]


def test_a_finished_evaluation_of_the_same_settings_is_kept_and_timings_cover_stage_5(
    tmp_path, monkeypatch, capsys):
  """Rerunning a finished workdir printed the same scores after sampling them again; the
  scores.json timings lacked the evaluation's own."""
  settings = demo.DemoSettings(workdir=str(tmp_path), dit_steps=60)
  stages = demo.Stages(settings)
  scores = {k: 0.5 for k in ("overall", "single_object", "two_object", "counting", "colors",
                             "position", "color_attr")}
  made = {"scores": scores, "decoder_reconstruction_ceiling": scores,
          "reconstruction_psnr_db": 21.0, "seen_scores": scores,
          "demo_settings": dataclasses.asdict(settings), "timings_s": {"1/5": 3.0}}
  calls = []

  def evaluated(gen, items, resolution, sampler, outdir=None, report=None):
    calls.append(outdir)
    if report is not None:  # the held-out call writes scores.json, as evaluate.save does
      os.makedirs(outdir, exist_ok=True)
      with open(os.path.join(outdir, "scores.json"), "w") as f:
        json.dump({**made, **report}, f)
    return scores, None

  monkeypatch.setattr(demo.evaluate, "evaluate", evaluated)
  monkeypatch.setattr(demo.Stages, "generator", lambda self, *a: (
      None, self.dit_config("records", self.decoder_config())))
  monkeypatch.setattr(demo.Stages, "ceiling", lambda self, config, heldout: (scores, 21.0))
  monkeypatch.setattr(demo.Stages, "heldout", lambda self, dec: [{"prompt": "p"}])
  monkeypatch.setattr(demo.Stages, "seen", lambda self, dec, n: [])
  dec = stages.decoder_config()
  assert stages.evaluate(dec, "text", "dit") == scores and len(calls) == 1
  stages.timings = {"1/5": 3.0, "5/5": 7.0}
  stages.record_timings()
  written = json.loads((tmp_path / "eval" / "scores.json").read_text())
  assert written["timings_s"] == {"1/5": 3.0, "5/5": 7.0}

  again = demo.Stages(settings)  # the same settings: kept, nothing sampled, timings unchanged
  assert again.evaluate(dec, "text", "dit") == scores and len(calls) == 1
  again.timings = {"1/5": 0.1, "5/5": 0.2}
  again.record_timings()
  assert json.loads((tmp_path / "eval" / "scores.json").read_text()) == written
  assert "kept (delete it to evaluate again)" in capsys.readouterr().out

  more = demo.Stages(demo.DemoSettings(workdir=str(tmp_path), dit_steps=60, sample_steps=9))
  more.evaluate(dec, "text", "dit")  # other sampler settings: evaluated again
  assert len(calls) == 2
