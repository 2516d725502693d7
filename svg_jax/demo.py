"""The embedded default, end to end on CPU: demo data -> decoder training -> precompute -> DiT
training -> sampling -> ShapesGenEval.

Every stage runs through the same code a real run uses (the trainer, the precompute job, the
generator, the loaders of real weights) and caches its output under the workdir: a rerun skips finished
stages and resumes an interrupted training from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time

import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class DemoSettings:
  workdir: str = "runs/demo"
  num_train: int = 2000
  num_heldout: int = 300
  decoder_steps: int = 800
  dit_steps: int = 2000
  sample_steps: int = 25
  cfg_scale: float = 4.0
  shift: float = 1.0
  seed: int = 0


def load_config_file(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def export_decoder(decoder_config, workdir: str, dst: str) -> str:
  """The trained decoder of a `task = "decoder"` workdir as official-key safetensors (the format
  `autoencoder.decoder_path` reads for real weights)."""
  import flax
  import jax

  from svg_jax.convert import decoder as convert
  from svg_jax.convert.safetensors_io import save_safetensors
  from svg_jax.models.decoder import Decoder, DecoderConfig
  from svg_jax.train import checkpoint

  cfg = DecoderConfig.from_dict(decoder_config.autoencoder.decoder.to_dict())
  z = jax.ShapeDtypeStruct((1, 1, 1, cfg.z_channels), jax.numpy.float32)
  shapes = jax.eval_shape(lambda z: Decoder(cfg).init(jax.random.PRNGKey(0), z)["params"], z)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          flax.linen.meta.unbox(shapes))
  params = jax.device_get(checkpoint.load_params(workdir, abstract))
  tmp = dst + ".tmp"
  save_safetensors(tmp, convert.params_to_official(params, cfg))
  os.replace(tmp, dst)
  return dst


class Stages:
  """The demo's stages; each returns what later stages need and is cached in `workdir`."""

  def __init__(self, s: DemoSettings):
    self.s = s
    self.workdir = os.path.abspath(s.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.timings: dict[str, float] = {}

  def _timed(self, name: str, fn):
    start = time.time()
    print(f"== {name}", flush=True)
    out = fn()
    self.timings[name] = time.time() - start
    print(f"== {name}: {self.timings[name]:.0f}s", flush=True)
    return out

  # 1. decoder training (its preparation renders the shapes data and makes the random encoder)
  def decoder_config(self) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(ROOT, "configs", "decoder.py"), "tiny")
    c.data.demo_dir = os.path.join(self.workdir, "demo")
    c.data.demo_seed = self.s.seed
    c.data.demo_num_train = self.s.num_train
    c.data.demo_num_heldout = self.s.num_heldout
    c.train.num_steps = self.s.decoder_steps
    return c

  def train_decoder(self) -> ml_collections.ConfigDict:
    from svg_jax.train import decoder_demo
    from svg_jax.train import loop

    c = self.decoder_config()
    decoder_demo.prepare(c)
    loop.train(c, os.path.join(self.workdir, "decoder"))
    return c

  # 2. the offline text encoder (tokenizer trained on the training captions only)
  def text_encoder(self, decoder_config) -> str:
    from svg_jax.data import shapes
    from svg_jax.demo_text_encoder import ensure_demo_text_encoder

    data_dir = os.path.dirname(decoder_config.data.jsonl)
    captions = [item["prompt"] for item in shapes.read_split(data_dir, "train")]
    return ensure_demo_text_encoder(os.path.join(self.workdir, "text_encoder"), captions,
                                    seed=self.s.seed)

  # 3. precompute latents and text features of the training split
  def precompute(self, decoder_config, text_dir: str) -> str:
    from svg_jax.data import precompute

    out = os.path.join(self.workdir, "records")
    c = precompute.default_config()
    c.autoencoder = decoder_config.autoencoder
    p = c.precompute
    p.text_encoder_dir = text_dir
    p.resolution = int(decoder_config.data.resolution)
    p.min_side = int(decoder_config.data.resolution) // 2
    p.batch_size = 64
    job = precompute.build(c)
    job.run(precompute.list_inputs(decoder_config.data.jsonl, "jsonl", job.cfg), out)
    return out

  # 4. DiT training on the records
  def dit_config(self, records: str) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    c.data.path = records
    c.train.num_steps = self.s.dit_steps
    c.seed = self.s.seed
    return c

  def train_dit(self, records: str) -> str:
    from svg_jax.train import loop

    workdir = os.path.join(self.workdir, "dit")
    loop.train(self.dit_config(records), workdir)
    return workdir

  # 5. sample the held-out prompts and score them
  def evaluate(self, decoder_config, text_dir: str, dit_workdir: str) -> dict:
    from PIL import Image

    from svg_jax import autoencoder as ae_lib
    from svg_jax import generate, sampling
    from svg_jax.data import shapes
    from svg_jax.eval import shapes_geneval
    config = self.dit_config(os.path.join(self.workdir, "records"))
    config.autoencoder = decoder_config.autoencoder
    config.autoencoder.decoder_path = export_decoder(
        decoder_config, os.path.join(self.workdir, "decoder"),
        os.path.join(self.workdir, "decoder.safetensors"))
    gen = generate.Generator.from_config(config, text_encoder=text_dir, checkpoint=dit_workdir)
    heldout = shapes.read_split(os.path.dirname(decoder_config.data.jsonl), "heldout")
    prompts = [item["prompt"] for item in heldout]
    seeds = [sampling.eval_seed(i, 0) for i in range(len(prompts))]
    settings = generate.SamplerSettings(solver="dpm", steps=self.s.sample_steps,
                                        cfg_scale=self.s.cfg_scale, shift=self.s.shift)
    res = int(decoder_config.data.resolution)
    images = gen.generate(prompts, seeds, (res, res), settings, batch_size=64)
    out = os.path.join(self.workdir, "eval")
    os.makedirs(out, exist_ok=True)
    Image.fromarray(generate.make_grid(images[:32], cols=8)).save(os.path.join(out, "grid.png"))
    with open(os.path.join(out, "grid_prompts.txt"), "w") as f:
      f.write("\n".join(prompts[:32]) + "\n")
    metadata = [item["metadata"] for item in heldout]
    scores = shapes_geneval.score(list(images), metadata)
    # The ceiling the decoder allows: held-out ground truth through encoder + trained decoder.
    ae = ae_lib.SVGAutoencoder.from_config(config)
    truth = np.stack([np.asarray(Image.open(item["path"]).convert("RGB")) for item in heldout])
    recon = ae_lib.to_uint8(ae.decode(ae.encode(truth)))
    ceiling = shapes_geneval.score(list(recon), metadata)
    psnr = float(np.mean([ae_lib.psnr(a, b) for a, b in zip(truth, recon)]))
    with open(os.path.join(out, "scores.json"), "w") as f:
      json.dump({"generated": scores, "decoder_reconstruction_ceiling": ceiling,
                 "reconstruction_psnr_db": psnr, "settings": dataclasses.asdict(self.s),
                 "timings_s": self.timings}, f, indent=2)
    print("ShapesGenEval of held-out ground truth through encoder + trained decoder (the ceiling "
          f"this decoder allows; reconstruction PSNR {psnr:.1f} dB):")
    shapes_geneval.print_table(ceiling)
    return scores


def run(s: DemoSettings) -> dict:
  stages = Stages(s)
  from svg_jax.train import metrics
  metrics.console_logging()
  dec = stages._timed("1/5 decoder training (demo data, random ViT-S/16+ encoder, statistics)",
                      stages.train_decoder)
  text_dir = stages._timed("2/5 demo text encoder", lambda: stages.text_encoder(dec))
  records = stages._timed("3/5 precompute", lambda: stages.precompute(dec, text_dir))
  dit = stages._timed("4/5 DiT training", lambda: stages.train_dit(records))
  scores = stages._timed("5/5 sampling held-out prompts + ShapesGenEval",
                         lambda: stages.evaluate(dec, text_dir, dit))
  from svg_jax.eval import shapes_geneval
  print("ShapesGenEval of the generated held-out samples:")
  shapes_geneval.print_table(scores)
  print("timings: " + ", ".join(f"{k.split(' ')[0]} {v:.0f}s" for k, v in stages.timings.items()))
  print(f"outputs: {stages.workdir}/eval (grid.png, scores.json)")
  return scores
