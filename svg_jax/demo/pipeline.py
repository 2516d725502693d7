"""The embedded default, end to end on CPU: demo data -> decoder training -> precompute -> DiT
training -> sampling -> ShapesGenEval.

Every stage runs through the same code a real run uses (the trainer, the precompute job, the
generator, the loaders of real weights) and caches its output under the workdir: a rerun skips
finished stages and resumes an interrupted training from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time

import ml_collections
import numpy as np
from PIL import Image

from svg_jax import autoencoder as ae_lib
from svg_jax import cli, generate, precompute
from svg_jax.convert import decoder_io
from svg_jax.data import sources
from svg_jax.demo import configs, decoder_data, evaluate, geneval, shapes
from svg_jax.demo.text_encoder import BuiltDifferently, DemoSpec, ensure_demo_text_encoder
from svg_jax.eval import image_metrics
from svg_jax.input_errors import InputError
from svg_jax.models.decoder import DecoderConfig
from svg_jax.train import metrics, trainer
from svg_jax.utils import atomic_files, ctrl_c, folder_locks, writable_folders


WORKDIR_RECORD = "demo_settings.json"  # what the workdir's cached stages were made with
WORKDIR_LOCK = "demo.lock"  # held by the demo run writing the workdir (its pid inside)


@dataclasses.dataclass
class DemoSettings:
  workdir: str = "runs/demo"
  # The models' sizes and budgets (configs.PRESETS); None below = the preset's value.
  preset: str = configs.DEFAULT_PRESET
  num_train: int | None = None
  num_heldout: int = 300
  decoder_steps: int | None = None
  dit_steps: int | None = None
  sample_steps: int = 25
  cfg_scale: float = 4.0
  shift: float = 1.0
  # Captions are encoded without the official system prompt: the random demo Gemma-2 gives an
  # instruction prefix no meaning, it only dilutes the few caption tokens (text.SYSTEM_PROMPTS).
  system_prompt: str = "empty"
  # The demo Gemma-2's weights (text_encoder.py): "word_context" features keep each word and its
  # neighbour; the random init blurs them, which caps the held-out composition categories
  # (research/probe_captions.py: 0.43 against 0.89 with 4-head readers).
  text_weights: str = "word_context"
  seed: int = 0
  # Watching the DiT run (svg_jax/train/validation.py): a grid of `validation_prompts` held-out
  # prompts and the held-out loss per noise level every `validate_every` steps, in TensorBoard
  # (<workdir>/dit/tensorboard) and <workdir>/dit/samples; 0 = off.
  validate_every: int = 500
  validation_prompts: int = 8
  # Training prompts scored beside the held-out ones (per category; 0 = none): the gap between
  # the two is what composition costs.
  seen_per_category: int = 20

  def __post_init__(self):
    p = configs.preset(self.preset)
    for name in ("num_train", "decoder_steps", "dit_steps"):
      if getattr(self, name) is None:
        setattr(self, name, getattr(p, name))
    # Before a minute of data making: stages further on need images of both splits.
    for name in ("num_train", "num_heldout", "decoder_steps", "dit_steps", "sample_steps",
                 "validation_prompts"):
      _check_int(self, name, 1)
    for name in ("validate_every", "seen_per_category"):
      _check_int(self, name, 0)
    # The sampler's settings, which stages 4 (validation grids) and 5 use, checked before stage 1.
    for name in ("cfg_scale", "shift"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise InputError(f"--{name} must be a number, got {value!r}")
      if not math.isfinite(value):
        raise InputError(f"--{name} must be finite, got {value}")
    try:
      generate.SamplerSettings(solver="dpm", steps=self.sample_steps, cfg_scale=self.cfg_scale,
                               shift=self.shift).validate()
    except ValueError as e:
      raise InputError(f"sampler settings (--sample_steps, --cfg_scale, --shift): {e}") from None


def _check_int(s: DemoSettings, name: str, least: int) -> None:
  value = getattr(s, name)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise InputError(f"--{name} must be an integer, got {value!r}")
  if value < least:
    raise InputError(f"--{name} must be >= {least}, got {value}")


def export_decoder(decoder_config, workdir: str, dst: str) -> str:
  """The trained decoder of a `task = "decoder"` workdir as official-key safetensors (the format
  `autoencoder.decoder_path` reads for real weights)."""
  cfg = DecoderConfig.from_dict(decoder_config.autoencoder.decoder.to_dict())
  params = decoder_io.load_decoder_weights(workdir, "flax", cfg)
  # Written under a temp name holding the pid, then renamed: two evaluations may export at once.
  decoder_io.save_decoder_weights(params, dst, "safetensors", cfg)
  return dst


class Stopped(SystemExit):
  """The demo stopped for a signal: exit status 128 + the signal's number (130 for Ctrl-C, 143
  for SIGTERM), as a shell reports a job a signal ended; `str` is the one line `run` prints."""

  def __init__(self, line: str, signal_name: str | None):
    try:
      code = (cli.EXIT_INTERRUPTED if signal_name == "SIGINT"
              else 128 + int(signal.Signals[signal_name]) if signal_name else 1)
    except KeyError:  # "another process" (a multi-process stop): no signal of this one
      code = 1
    super().__init__(code)
    self.line = line

  def __str__(self) -> str:
    return self.line


def _finished(summary: dict, stage: str) -> None:
  """A training stopped by a signal (preemption, Ctrl-C) has saved its state: the demo stops too,
  instead of running later stages on an unfinished model; a rerun resumes it."""
  if summary.get("stopped_by"):
    raise Stopped(f"demo: {stage} stopped by {summary['stopped_by']} at step {summary['step']} "
                  "(checkpoint saved); rerun the same command to resume", summary["stopped_by"])


def _not_past(summary: dict, steps: int, workdir: str, model: str = "DiT",
              flag: str = "--dit_steps") -> None:
  """A model trained past the asked steps in this workdir would be scored under settings that
  name fewer: the demo stops instead (asking more resumes the run)."""
  if summary["step"] > steps:
    raise SystemExit(f"demo: {workdir} holds a {model} trained to step {summary['step']}, past "
                     f"{flag} {steps}; run these settings in a fresh --workdir")


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds the workdir for one demo run: a second run there (which would train into the same
  checkpoint folders) is refused in one line naming the first one's pid."""
  workdir = os.path.abspath(workdir)
  writable_folders.check_writable_folder(workdir, "--workdir")
  path = os.path.join(workdir, WORKDIR_LOCK)
  held = contextlib.ExitStack()
  try:
    held.enter_context(folder_locks.hold(path, f"{workdir} is in use by another demo run"))
  except folder_locks.FolderBusy:
    try:
      with open(path) as f:
        pid = f.read().strip()
    except OSError:
      pid = ""
    raise folder_locks.FolderBusy(
        f"--workdir {workdir} is in use by another demo run" + (f" (pid {pid})" if pid else "")
        + "; wait for it to end or use another --workdir") from None
  with held:
    with open(path, "w") as f:  # who holds it, for the next run's message (flock is not data)
      f.write(f"{os.getpid()}\n")
    yield


class Stages:
  """The demo's stages; each returns what later stages need and is cached in `workdir`."""

  def __init__(self, s: DemoSettings):
    self.s = s
    self.workdir = os.path.abspath(s.workdir)
    writable_folders.check_writable_folder(self.workdir, "--workdir")
    self._check_workdir()
    self.timings: dict[str, float] = {}
    self.interrupts: ctrl_c.Remembered | None = None  # set by `run`: a Ctrl-C a stage swallowed
    self._decoder_file: str | None = None  # exported once per process (the decoder is frozen)
    self._evaluated = False  # stage 5 sampled and scored here (not kept from an earlier run)

  def _check_workdir(self) -> None:
    """A workdir holds the data, decoder, records and DiT of one preset and dataset: another
    preset or dataset size there would resume models of other shapes."""
    made_with = {"preset": self.s.preset, "num_train": self.s.num_train,
                 "num_heldout": self.s.num_heldout, "seed": self.s.seed}
    path = os.path.join(self.workdir, WORKDIR_RECORD)
    existing = atomic_files.read_json(path)
    if existing is None:
      atomic_files.write_text(path, json.dumps(made_with, indent=2))
    elif existing != made_with:
      keys = atomic_files.differing_keys(existing, made_with)
      was = ", ".join(f"{k}={existing.get(k)}" for k in keys)
      now = ", ".join(f"{k}={made_with[k]}" for k in keys)
      raise SystemExit(f"demo: {self.workdir} was made with {was} (asked: {now}); run these "
                       "settings in a fresh --workdir")

  def _timed(self, name: str, fn):
    start = time.time()
    print(f"== {name}", flush=True)
    out = fn()
    if self.interrupts is not None and self.interrupts.received:
      raise Stopped(f"demo: stage {name.split(' (')[0]} interrupted by SIGINT; rerun the same "
                    "command to resume (finished stages are kept)", "SIGINT")
    self.timings[name] = time.time() - start
    print(f"== {name}: {self.timings[name]:.0f}s", flush=True)
    return out

  # 1. decoder training on the demo's files: the shapes data, a random encoder, its statistics
  def decoder_config(self) -> ml_collections.ConfigDict:
    """The decoder config before its files exist (their paths are set by `train_decoder`)."""
    c = configs.decoder(self.s.preset, self.s.decoder_steps)
    # The decoder is evaluated on held-out images: all of them where there are fewer.
    c.data.num_eval_images = min(int(c.data.num_eval_images), int(self.s.num_heldout))
    return c

  def train_decoder(self) -> ml_collections.ConfigDict:
    c = self.decoder_config()
    decoder_data.prepare_for(c, os.path.join(self.workdir, "demo"), num_train=self.s.num_train,
                             num_heldout=self.s.num_heldout, seed=self.s.seed,
                             layouts=configs.preset(self.s.preset).layouts)
    workdir = os.path.join(self.workdir, "decoder")
    summary = trainer.train(c, workdir)
    _finished(summary, "decoder training")
    _not_past(summary, self.s.decoder_steps, workdir, "decoder", "--decoder_steps")
    return c

  # 2. the offline text encoder (tokenizer trained on the training captions only)
  def text_encoder(self, decoder_config) -> str:
    data_dir = os.path.dirname(decoder_config.data.jsonl)
    captions = [item["prompt"] for item in shapes.read_split(data_dir, "train")]
    folder = os.path.join(self.workdir, "text_encoder")
    try:
      return ensure_demo_text_encoder(folder, captions, seed=self.s.seed,
                                      spec=DemoSpec(weights=self.s.text_weights))
    except BuiltDifferently as e:
      # A workdir from an older demo (other weights): its records and DiT belong to that encoder.
      raise SystemExit(f"demo: {e}. The records and DiT of {self.workdir} were made with that "
                       "encoder: run the demo in a fresh --workdir") from e

  # 3. precompute latents and text features of the training split
  def precompute(self, decoder_config, text_dir: str) -> str:
    out = os.path.join(self.workdir, "records")
    c = configs.precompute(self.s.preset)
    c.autoencoder = decoder_config.autoencoder  # with its files
    c.precompute.text_encoder_dir = text_dir
    c.precompute.system_prompt = self.s.system_prompt
    job = precompute.build(c)
    job.run(sources.list_inputs(decoder_config.data.jsonl, "jsonl", job.cfg), out)
    if self.s.validate_every:  # the held-out split too, for the DiT run's held-out loss
      job.run(sources.list_inputs(decoder_config.data.heldout_jsonl, "jsonl", job.cfg),
              out + "_heldout")
    return out

  # 4. DiT training on the records
  def dit_config(self, records: str, decoder_config) -> ml_collections.ConfigDict:
    c = configs.dit(self.s.preset)
    # The encoder that made the records: its patch sets the latent grid (and the time shift's
    # token count), its fingerprints are checked against the records' manifest.
    c.autoencoder = decoder_config.autoencoder
    c.data.path = records
    c.train.num_steps = self.s.dit_steps
    c.seed = self.s.seed
    return c

  def watch(self, c, records: str, decoder_config) -> None:
    """Validation on in the DiT config `c`: grids of the first held-out prompts, decoded by the
    trained decoder, and the held-out split's loss per noise level."""
    c.train.sample_every = c.train.eval_every = self.s.validate_every
    c.data.eval_path = records + "_heldout"
    c.text.encoder_dir = os.path.join(self.workdir, "text_encoder")
    c.autoencoder.decoder_path = self.decoder_file(decoder_config)
    prompts = [item["prompt"] for item in self.heldout(decoder_config)]
    c.validation.update(dict(prompts=tuple(prompts[:self.s.validation_prompts]),
                             system_prompt=self.s.system_prompt, steps=self.s.sample_steps,
                             cfg_scale=self.s.cfg_scale, shift=self.s.shift))

  def train_dit(self, records: str, decoder_config) -> str:
    workdir = os.path.join(self.workdir, "dit")
    config = self.dit_config(records, decoder_config)
    if self.s.validate_every:
      self.watch(config, records, decoder_config)
    summary = trainer.train(config, workdir)
    _finished(summary, "DiT training")
    _not_past(summary, self.s.dit_steps, workdir)
    return workdir

  # 5. sample the held-out prompts and score them
  def generator(self, decoder_config, text_dir: str, dit_workdir: str, step: int | None = None):
    """The sampler of the DiT checkpoint (EMA params, latest step unless `step`) with the trained
    decoder exported the way real decoder weights are read."""
    config = self.dit_config(os.path.join(self.workdir, "records"), decoder_config)
    config.autoencoder.decoder_path = self.decoder_file(decoder_config)
    return generate.Generator.from_config(config, text_encoder=text_dir, checkpoint=dit_workdir,
                                          system_type=self.s.system_prompt, step=step), config

  def decoder_file(self, decoder_config) -> str:
    """The trained decoder, exported once per process."""
    if self._decoder_file is None:
      self._decoder_file = export_decoder(decoder_config, os.path.join(self.workdir, "decoder"),
                                          os.path.join(self.workdir, "decoder.safetensors"))
    return self._decoder_file

  def heldout(self, decoder_config) -> list[dict]:
    return shapes.read_split(os.path.dirname(decoder_config.data.jsonl), "heldout")

  def seen(self, decoder_config, per_category: int = 50) -> list[dict]:
    """The first `per_category` training items of each category: prompts whose combinations the
    DiT was trained on, so held-out minus seen scores measure the composition gap."""
    taken: dict[str, int] = {}
    out = []
    for item in shapes.read_split(os.path.dirname(decoder_config.data.jsonl), "train"):
      tag = item["metadata"]["tag"]
      if taken.get(tag, 0) < per_category:
        taken[tag] = taken.get(tag, 0) + 1
        out.append(item)
    return out

  def ceiling(self, config, heldout: list[dict]) -> tuple[dict, float]:
    """ShapesGenEval of held-out ground truth through encoder + trained decoder (the best score
    this decoder allows) and the reconstruction PSNR."""
    ae = ae_lib.SVGAutoencoder.from_config(config)
    truth = np.stack([np.asarray(Image.open(item["path"]).convert("RGB")) for item in heldout])
    recon = ae_lib.to_uint8(ae.decode(ae.encode(truth)))
    ceiling = geneval.score(list(recon), [item["metadata"] for item in heldout])
    return ceiling, float(np.mean([image_metrics.psnr(a, b) for a, b in zip(truth, recon)]))

  def sampler_settings(self):
    return generate.SamplerSettings(solver="dpm", steps=self.s.sample_steps,
                                    cfg_scale=self.s.cfg_scale, shift=self.s.shift)

  def scores_file(self) -> str:
    return os.path.join(self.workdir, "eval", "scores.json")

  def finished_evaluation(self) -> dict | None:
    """scores.json when it holds this workdir's evaluation under these settings: its DiT and
    decoder trained to the same steps (stages 1 and 4 check it) and its seeds are fixed, so
    evaluating again gives the same scores. It is written last, whole."""
    try:
      report = atomic_files.read_json(self.scores_file())
    except ValueError:  # not JSON: evaluated again
      return None
    if (isinstance(report, dict) and "scores" in report
        and report.get("demo_settings") == json.loads(json.dumps(dataclasses.asdict(self.s)))):
      return report
    return None

  def evaluate(self, decoder_config, text_dir: str, dit_workdir: str) -> dict:
    kept = self.finished_evaluation()
    if kept is not None:
      print(f"{self.scores_file()} holds this workdir's evaluation under these settings: kept "
            "(delete it to evaluate again)", flush=True)
      self._print_references(kept)
      return kept["scores"]
    self._evaluated = True
    gen, config = self.generator(decoder_config, text_dir, dit_workdir)
    heldout = self.heldout(decoder_config)
    ceiling, psnr = self.ceiling(config, heldout)
    res = int(decoder_config.data.resolution)
    outdir = os.path.join(self.workdir, "eval")
    report = {"decoder_reconstruction_ceiling": ceiling, "reconstruction_psnr_db": psnr,
              "demo_settings": dataclasses.asdict(self.s),
              "dit_images_seen": int(config.train.global_batch_size) * self.s.dit_steps}
    seen = self.seen(decoder_config, self.s.seen_per_category)
    if seen:
      report["seen_scores"], _ = evaluate.evaluate(gen, seen, (res, res), self.sampler_settings(),
                                                   outdir=os.path.join(outdir, "seen"))
    report["timings_s"] = self.timings
    scores, _ = evaluate.evaluate(gen, heldout, (res, res), self.sampler_settings(),
                                  outdir=outdir, report=report)
    self._print_references(report)
    return scores

  @staticmethod
  def _print_references(report: dict) -> None:
    """The tables to read the held-out scores against: the decoder's ceiling, the seen prompts."""
    print("ShapesGenEval of held-out ground truth through encoder + trained decoder (the ceiling "
          f"this decoder allows; reconstruction PSNR {report['reconstruction_psnr_db']:.1f} dB):")
    geneval.print_table(report["decoder_reconstruction_ceiling"])
    if "seen_scores" in report:
      print("ShapesGenEval of the training prompts (combinations the DiT was trained on):")
      geneval.print_table(report["seen_scores"])

  def record_timings(self) -> None:
    """scores.json's `timings_s` with every stage's, the evaluation's own included (the file is
    written before that stage ends); a kept evaluation keeps the run's timings that made it."""
    if self._evaluated:
      report = atomic_files.read_json(self.scores_file())
      report["timings_s"] = self.timings
      atomic_files.write_text(self.scores_file(), json.dumps(report, indent=2))


def run(s: DemoSettings) -> dict:
  interrupts = ctrl_c.Remembered()
  try:
    with workdir_lock(s.workdir), interrupts.installed():
      return _run(s, interrupts)
  except Stopped as e:  # one line, and the signal's exit status
    print(e.line, file=sys.stderr, flush=True)
    raise SystemExit(e.code) from None


def _run(s: DemoSettings, interrupts: ctrl_c.Remembered) -> dict:
  stages = Stages(s)
  stages.interrupts = interrupts
  metrics.console_logging()
  dec = stages._timed("1/5 decoder training (demo data, random DINOv3 encoder, statistics)",
                      stages.train_decoder)
  text_dir = stages._timed("2/5 demo text encoder", lambda: stages.text_encoder(dec))
  records = stages._timed("3/5 precompute", lambda: stages.precompute(dec, text_dir))
  dit = stages._timed("4/5 DiT training", lambda: stages.train_dit(records, dec))
  scores = stages._timed("5/5 sampling held-out prompts + ShapesGenEval",
                         lambda: stages.evaluate(dec, text_dir, dit))
  stages.record_timings()
  print("ShapesGenEval of the generated held-out samples:")
  geneval.print_table(scores)
  print("timings: " + ", ".join(f"{k.split(' ')[0]} {v:.0f}s" for k, v in stages.timings.items()))
  print(f"outputs: {stages.workdir}/eval (grid.png, scores.json)")
  return scores
