"""The files an in-training validation test needs, written once: a random pixel decoder in the
official safetensors layout, latent statistics, the offline demo text encoder with the validation
prompts' features, and records folders to train on and for the held-out loss (two latent sizes).
The records carry the statistics' fingerprint, as precompute writes it."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import tiny
from svg_jax import assets, text
from svg_jax import autoencoder as ae_lib
from svg_jax import latent_stats as ls
from svg_jax.convert import decoder as dec_conv
from svg_jax.convert.safetensors_io import save_safetensors
from svg_jax.data import synthetic
from svg_jax.demo import text_encoder as demo
from svg_jax.models.decoder import Decoder, DecoderConfig
from svg_jax.train import validation

CHANNELS = 8  # latent channels
DECODER = dict(z_channels=CHANNELS, ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
               norm_groups=4)  # 16x upsampling: a 4x4 latent is a 64 px image
RES = 64
PROMPTS = [json.loads(line)["prompt"] for line in open(assets.GENEVAL_PROMPTS)][:3]


def write(root, spec: demo.DemoSpec) -> dict[str, str]:
  """Paths under `root`: text (encoder folder), decoder, stats, features (.npz), train (64
  records, 4x4 latents) and heldout (12 records, 4x4 and 4x6); text features of spec's width."""
  enc_dir = demo.ensure_demo_text_encoder(str(root / "text"), PROMPTS * 4, seed=0, spec=spec)
  dec = DecoderConfig(**DECODER)
  dec_params = jax.jit(Decoder(dec).init)(jax.random.PRNGKey(1), jnp.zeros((1, 2, 2, CHANNELS)))
  decoder = str(root / "decoder.safetensors")
  save_safetensors(decoder, dec_conv.params_to_official(dec_params["params"], dec))
  rng = np.random.default_rng(2)
  stats = str(root / "stats.pt")
  ls.save_latent_stats(stats, rng.normal(0, 0.5, CHANNELS), rng.uniform(0.5, 2.0, CHANNELS))
  encoder = text.TextEncoder.from_pretrained(enc_dir, system_prompt=text.system_prompt("empty"))
  feats = validation.write_prompt_features(str(root / "prompts.npz"), PROMPTS, encoder)
  section = tiny.get_config().autoencoder
  section.stats_path = stats
  out = dict(text=enc_dir, decoder=decoder, stats=stats, features=feats)
  for name, buckets, n, seed in (("train", ((4, 4),), 64, 0), ("heldout", ((4, 4), (4, 6)), 12, 1)):
    synthetic.write_random_dataset(root / name, buckets=buckets, num_records=n,
                                   latent_channels=CHANNELS, text_dim=spec.hidden_size,
                                   learnable=True, caption_len=(1, 8), records_per_shard=4,
                                   seed=seed, fingerprints=ae_lib.config_fingerprints(section))
    out[name] = str(root / name)
  return out


def grids(workdir) -> dict[int, np.ndarray]:
  """step -> the sample grid a run wrote (`samples/step_XXXXXX.png`, uint8 [H, W, 3])."""
  folder = os.path.join(workdir, validation.SAMPLES_DIR)
  return {int(n[5:11]): np.asarray(Image.open(os.path.join(folder, n)))
          for n in sorted(os.listdir(folder))}
