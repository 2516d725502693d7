"""Files the package ships (sources and licenses in the repository's NOTICE).

- `OFFICIAL_LATENT_STATS`: SVG-T2I's DINOv3 ViT-S/16+ patch-token statistics
  (`svg_t2i/pre-trained/dinov3_s16p_layer_patchtoken_stats_dist.pt`), read by `latent_stats.py`.
- `GENEVAL_PROMPTS`, `DPG_PROMPTS`: the benchmark prompt files of the official evaluation
  (`svg_t2i/eval/prompts/`), in the layouts `launch/generate_benchmark.py` writes for.
"""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
OFFICIAL_LATENT_STATS = os.path.join(ASSETS_DIR, "dinov3_s16p_layer_patchtoken_stats_dist.pt")
GENEVAL_PROMPTS = os.path.join(ASSETS_DIR, "prompts", "geneval_metadata.jsonl")
DPG_PROMPTS = os.path.join(ASSETS_DIR, "prompts", "dpg.jsonl")
