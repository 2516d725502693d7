"""The config schema: the configs of the two training tasks that every file under configs/ starts
from (`dit_task_config`, `decoder_task_config`; each has only the sections its task reads), and
the sections other jobs share (`autoencoder_defaults`, `precompute_defaults`).

Every number a user may want to change is a field here with a documented default; config files override
fields, the command line overrides them again (`--config.train.lr=1e-4`). Unknown fields are errors
(ConfigDicts are locked after construction).
"""
from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from svg_jax import assets
from svg_jax import text as text_lib
from svg_jax.data import records
from svg_jax.input_errors import InputError
from svg_jax.models.decoder import DecoderConfig
from svg_jax.models.dinov3 import DINOv3Config
from svg_jax.models.nextdit import NextDiTConfig

# Logical axis -> mesh axes. Parameters are FSDP-sharded on their `embed` (model width) axis and
# tensor-parallel on heads / MLP width; activations shard their batch over (data, fsdp).
DEFAULT_AXIS_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    # Activations are not split on their feature axis: with `activation_embed -> tensor`, XLA:CPU's
    # partitioner gave wrong outputs for half the batch on a (2,2,2) mesh (test_nextdit_sharding).
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("adaln", "fsdp"),
    # Not tensor-sharded for the same reason (a modulated block alone miscompiled on (2,2,2)); the
    # kernel is still FSDP-sharded on its input axis.
    ("adaln_out", None),
    ("adaln_in", None),
    ("vocab", "tensor"),
    ("cap_features", None),
    ("patch", None),
    ("freq", None),
    ("norm", None),
    ("head_dim", None),
    ("layers", None),
)


def section_of(instance) -> ml_collections.ConfigDict:
  """A model's dataclass config as a config section. A field whose default is None holds a typed
  placeholder instead: ml_collections refuses a command-line override of a plain None."""
  values = dataclasses.asdict(instance)
  for field in dataclasses.fields(instance):
    if values[field.name] is None:
      kind = next((k for k in (float, int, str) if k.__name__ in str(field.type)), None)
      values[field.name] = config_dict.placeholder(kind)
  return ml_collections.ConfigDict(values)


def nextdit_2b() -> ml_collections.ConfigDict:
  """The official 2B model section (docs/reference.md §1.2): 2,611,246,336 parameters."""
  return section_of(NextDiTConfig())


def autoencoder_defaults() -> ml_collections.ConfigDict:
  """The `config.autoencoder` section. Paths are empty: real weights are the user's files."""
  c = ml_collections.ConfigDict()
  # DINOv3 weights: the official dinov3_vits16plus_pretrain_lvd1689m-*.pth, an official or HF
  # .safetensors, an HF DINOv3ViTModel folder, or an SVG autoencoder .ckpt (encoder_prefix
  # "encoder.": it holds a copy of the encoder next to the decoder).
  c.encoder_path = ""
  c.encoder_prefix = ""  # key prefix selected and stripped in the encoder file ("" = none)
  c.encoder = section_of(DINOv3Config())  # ViT-S/16+
  # Pixel decoder weights: the official SVG autoencoder .ckpt (`decoder.*` in `state_dict`), a
  # .pth state dict, or .safetensors, with official or diffusers key names.
  c.decoder_path = ""
  c.decoder_format = "auto"  # auto | official | diffusers
  c.decoder = section_of(DecoderConfig())  # released ddconfig
  # Latent statistics: by default the official dinov3_s16p_layer_patchtoken_stats_dist.pt, which
  # the package ships; else a file written by latent_stats.save_latent_stats (the demo's random
  # encoder). "" names none: nothing to normalize with, nothing to check records against.
  c.stats_path = assets.OFFICIAL_LATENT_STATS
  c.stats_layer = -1  # row of the [layers, C] statistics; official -1 (= layer 11)
  # Round mean/std to bf16 before normalizing, as the official DiT training does (its training
  # latents bit for bit); denormalization always uses the fp32 statistics, as official sampling.
  c.bf16_stats = True
  c.batch_size = 0  # images per jitted call (chunks; the last is padded); 0 = the whole input
  return c


def precompute_defaults() -> ml_collections.ConfigDict:
  """The `config.precompute` section (the encoder comes from `config.autoencoder`)."""
  c = ml_collections.ConfigDict()
  # Local HF-format Gemma-2 folder (config.json + safetensors) and its tokenizer folder
  # ("" = the same folder). In token_ids mode only the tokenizer is read.
  c.text_encoder_dir = ""
  c.tokenizer_dir = ""
  c.hidden_layer = -2  # official: hidden_states[-2]
  # Token budget including <bos> and the system prompt: official training truncates at 256.
  c.max_length = text_lib.TRAIN_MAX_LENGTH
  # "auto" = the official training rule (`super_high_quality_caption` items get the `align`
  # prompt, all others `base`), or a name of text.SYSTEM_PROMPTS forced on every caption.
  c.system_prompt = "auto"
  c.text_mode = "features"  # features (bf16 hidden states) | token_ids (text encoder run online)
  c.resolution = 256  # bucket set of this training resolution (15 buckets at 256, 27 at 512)
  c.max_ratio = 4.0  # largest aspect ratio of the buckets (official 4)
  c.min_side = 64  # images whose shorter side is below this many pixels are reported as tiny
  c.batch_size = 16  # images (and captions) per jitted encoder call, per bucket
  c.records_per_shard = 1024  # inputs per chunk = most records in one shard; also the resume unit
  # "uncompressed" (the loader reads ~2x faster, bench/loader.py) or "zstd" (~22% smaller shards,
  # for hosts with loader cores to spare).
  c.shard_compression = records.DEFAULT_COMPRESSION
  # Storage dtype of latents and text features. Schema v1 stores floats as bfloat16 only.
  c.output_dtype = "bfloat16"
  c.num_threads = 4  # image decode / crop threads
  # -1 = jax.process_index() / jax.process_count(); set both to split a job by hand.
  c.process_index = -1
  c.process_count = -1
  # tfds input: split, data_dir ("" = TFDS's default) and the feature names.
  c.tfds_split = "train"
  c.tfds_data_dir = ""
  c.tfds_image_key = "image"
  c.tfds_caption_key = "caption"
  return c


def precompute_job_config() -> ml_collections.ConfigDict:
  """`autoencoder` + `precompute` sections: what `launch/precompute.py` reads."""
  c = ml_collections.ConfigDict()
  c.autoencoder = autoencoder_defaults()
  c.precompute = precompute_defaults()
  return c


def _training_config(task: str) -> ml_collections.ConfigDict:
  """The sections and fields both training tasks read (launch/train.py's loop, mesh, checkpoints,
  optimizer); each task adds its own (`dit_task_config`, `decoder_task_config`)."""
  c = ml_collections.ConfigDict()
  c.task = task  # dit | decoder
  c.seed = 42
  c.autoencoder = autoencoder_defaults()

  # Device mesh: sizes of (data, fsdp, tensor); exactly one may be -1 (= the remaining devices).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.axis_rules = DEFAULT_AXIS_RULES

  c.data = ml_collections.ConfigDict()
  c.data.resolution = 256  # nominal training resolution (the DiT's timestep shift uses its token count)
  c.data.prefetch = 2  # batches buffered ahead of the step
  # Read threads per process. A GPU or TPU host has the cores to spare; the 2-core CPU demo does not.
  c.data.num_threads = 2
  c.data.shuffle_seed = 0

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 512
  c.train.micro_batches = 1  # gradient accumulation: global batch = micro_batches x micro batch
  c.train.num_steps = 100_000
  c.train.lr = 2e-4
  c.train.lr_schedule = "constant"  # constant | warmup_constant | warmup_cosine
  c.train.warmup_steps = 0
  c.train.lr_end = 0.0  # warmup_cosine: the learning rate the cosine reaches at num_steps
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-15
  c.train.weight_decay = 0.0
  c.train.grad_clip = 2.0
  # An earlier stage's workdir (or a weights file, see init_from_format) whose params start this
  # run; the optimizer starts fresh, the DiT's EMA as a copy. Unread when the workdir resumes.
  c.train.init_from = ""
  # "": a training workdir; flax | official | safetensors | diffusers: weights as launch/convert.py
  # reads them (svg_jax/convert/dit_io.py, decoder_io.py).
  c.train.init_from_format = ""
  c.train.init_from_step = -1  # the workdir's checkpoint step to start from; -1: the newest
  c.train.log_every = 50
  c.train.checkpoint_every = 2000  # 0: never (benchmarks), not even at the end or on a signal
  c.train.keep_checkpoints = 3
  c.train.async_checkpointing = True  # Orbax writes in a background thread while training goes on
  # Several processes: seconds without a heartbeat from one before JAX's coordination service
  # stops the others (a host that died or hangs); JAX's default is 100.
  c.train.heartbeat_timeout_s = 100
  # Several processes: seconds that every process has to join `jax.distributed.initialize` at the
  # start (hosts of a large slice may start minutes apart); JAX's default is 300.
  c.train.distributed_init_timeout_s = 300
  # Seconds that a step, a checkpoint restore or the first batch may take (compiles excepted)
  # before a process prints every thread's stack and exits 7 (svg_jax/train/stall_watch.py): a
  # run stuck in a collective, which the heartbeat cannot see while every host lives. Checkpoint
  # saves and validation count as step time. 0: off.
  c.train.stall_timeout_s = 1800
  # Test hook: the batch of this (1-based) step gets NaN inputs, to exercise the divergence stop.
  c.train.debug_nan_step = -1
  # jax.profiler trace of profile_steps steps after the first profile_start (0 = off), on process
  # 0, into <workdir>/tensorboard (TensorBoard's Profile tab); the log gets its summary.
  c.train.profile_steps = 0
  c.train.profile_start = 10
  # Peak-FLOP table key for MFU: auto | cpu | v4 | v5e | v5p | v6e | a100 | h100 | h100_pcie |
  # h100_nvl | h200 (auto: the device's; an unknown device gets no MFU).
  c.train.chip = "auto"
  c.train.eval_every = 0  # held-out evaluation every this many steps (0 = off)
  return c


def dit_task_config() -> ml_collections.ConfigDict:
  """`task = "dit"`: the official 2B Next-DiT on precomputed records, its text, flow and
  validation sections (configs/svg_t2i_2b.py sets the official stages)."""
  c = _training_config("dit")
  c.model = nextdit_2b()

  c.data.path = ""  # folder with manifest.json + ArrayRecord shards (launch/precompute.py output)
  # Captions are padded to the smallest bucket that fits. Empty: fitted to the dataset's caption-
  # length histogram (`num_caption_buckets` buckets): 1-6% padding at stage 1 where the fixed
  # (64, 128, 256) gave 9-11% (bench/padding.py). Each bucket is one more compiled shape.
  c.data.caption_len_buckets = ()
  c.data.num_caption_buckets = 4
  c.data.max_caption_len = 256  # official training truncation (docs/reference.md §1.5: 512 is ignored)
  c.data.num_workers = 0  # Grain worker processes (0: read in the training process)
  # Features of the empty prompt (caption dropout's unconditional context; officially just `<bos>`
  # through the text encoder): "auto" = `<path>/empty_text.npy` ([Le, D] float) when present, else a
  # stand-in of one fixed unit-RMS token (what synthetic test datasets use; a warning is logged);
  # "stand_in" = that stand-in always; anything else = the path of an .npy file.
  c.data.empty_text = "auto"
  # Held-out flow loss (svg_jax/train/validation.py): a records folder made by precompute (e.g. a
  # held-out split; "" = none), evaluated every `train.eval_every` steps and at the end on its
  # first `validation.loss_records` records.
  c.data.eval_path = ""

  # Online text mode: when data.path holds token ids (precompute.text_mode = "token_ids"), the
  # trainer runs this frozen Gemma-2 (local HF folder) inside the step instead of reading features.
  c.text = ml_collections.ConfigDict()
  c.text.encoder_dir = ""
  c.text.hidden_layer = -2  # official: hidden_states[-2]

  c.flow = ml_collections.ConfigDict()
  c.flow.timestep_sampling = "logit_normal"  # logit_normal | uniform
  c.flow.logit_mean = 0.0
  c.flow.logit_std = 1.0
  c.flow.resolution_shift = True  # the official shift e^mu(resolution) toward noise (docs/reference.md §4.2)

  c.train.caption_dropout = 0.1
  # The official decay is 0.95 per step (a ~20-step horizon, docs/reference.md §5); 0.9999 averages over
  # ~10k steps, the usual horizon for DiT training runs of 10^5+ steps. Set 0.95 to match official.
  c.train.ema_decay = 0.9999
  # model.remat_policy = "auto" (svg_jax/train/remat.py) takes the least recomputation whose
  # compiled step fits device memory x (1 - remat_headroom); the memory is GiB per device, 0 =
  # the device's own figure (memory_stats' bytes_limit; the host's RAM on CPUs).
  c.train.remat_memory_budget_gib = 0.0
  c.train.remat_headroom = 0.1
  # In-training validation (svg_jax/train/validation.py; 0 = off): sample grids of the validation
  # prompts every `sample_every` steps, the held-out loss of `data.eval_path` every `eval_every`;
  # both also after the last step (not after a preemption signal, which saves at once).
  c.train.sample_every = 0

  # What the validation samples and how; the grids go to <workdir>/samples/step_XXXXXX.png and to
  # TensorBoard (`validation/samples`), decoded by autoencoder.decoder_path (none: no grids).
  c.validation = ml_collections.ConfigDict()
  c.validation.prompts = ()  # prompt strings
  c.validation.prompts_file = ""  # more prompts: a jsonl of {"prompt": ...} lines
  # Features of the prompts when text.encoder_dir is empty: an .npz written by
  # `validation.write_prompt_features` (launch/prompt_features.py). With text.encoder_dir set the
  # trainer encodes the prompts itself at start-up (system prompt `system_prompt` below).
  c.validation.text_features = ""
  c.validation.system_prompt = "base"  # a name of text.SYSTEM_PROMPTS
  c.validation.seeds = ()  # one per prompt; empty = 0, 1, 2, ... (the same every time)
  c.validation.resolution = 0  # pixels of a square image; 0 = data.resolution
  c.validation.steps = 25
  c.validation.cfg_scale = 4.0
  c.validation.cfg_mode = "renorm"  # renorm | standard | none
  c.validation.renorm = 1.0  # renorm's clip: the guided velocity's norm <= this x the conditional's
  c.validation.shift = 10.0  # the sampler's time shift (official 10 at 1024 px)
  c.validation.solver = "dpm"  # dpm | euler | midpoint | heun
  c.validation.batch_size = 0  # images per trajectory call (0 = all prompts in one)
  c.validation.grid_cols = 0  # 0 = about the square root of the prompt count
  # The held-out loss: fixed records, fixed noise per record (from `loss_seed`) and fixed times.
  c.validation.loss_records = 64
  c.validation.loss_timesteps = (0.05, 0.2, 0.5, 0.8)
  c.validation.loss_seed = 0
  c.validation.loss_batch_size = 16  # records per jitted call (rounded up to the batch shards)
  c.validation.loss_on_ema = False  # False: the trained params (the training loss's twin)
  return c




def model_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The DiT's `model` section; a config without one (the decoder task's) is a one-line error."""
  if "model" not in config:
    what = (f"task {config.task!r}" if "task" in config else "launch/precompute.py's job")
    raise InputError(f"this config ({what}) has no DiT model section; give a DiT config such as "
                     "configs/svg_t2i_2b.py:<stage> or configs/tiny.py")
  return config.model


def nextdit_config(config: ml_collections.ConfigDict) -> NextDiTConfig:
  cfg = NextDiTConfig.from_dict(model_section(config).to_dict())
  cfg.validate()
  return cfg


def decoder_task_config() -> ml_collections.ConfigDict:
  """`task = "decoder"`: the training sections both tasks share, the decoder task's own and the
  official recipe (configs/decoder.py documents both)."""
  c = _training_config("decoder")

  c.data.jsonl = ""  # training images (official jsonl: one {"path": ...} a line)
  c.data.heldout_jsonl = ""  # held-out images for the PSNR evaluation
  c.data.num_eval_images = 64  # the first N held-out images (0 = no evaluation)
  # Training crops as the official ImageNet loader's: the shorter side resized to the resolution,
  # then "random" squares (official) or the "center" one (held-out images always).
  c.data.crop = "random"
  # An unreadable image is logged and replaced by the next one of the list; this many in a row stop
  # the run (a wrong folder or a broken mount rather than a few bad files).
  c.data.max_bad_in_a_row = 64
  # Images whose shorter side is below min(min_side, resolution) pixels are bad images too (a 1x40
  # image blown up to a training square teaches nothing); precompute.min_side's default.
  c.data.min_side = 64
  c.data.num_workers = 0  # Grain worker processes decoding images (0: threads of this process)

  c.loss = ml_collections.ConfigDict()
  c.loss.lpips_vgg_path = ""  # torchvision VGG16 state dict
  c.loss.lpips_lin_path = ""  # lpips package weights/v0.1/vgg.pth
  c.loss.lpips_weight = 1.0
  c.loss.disc_weight = 0.5
  c.loss.disc_factor = 1.0
  c.loss.disc_start = 2500  # iterations (official: 5000 Lightning global steps)

  c.discriminator = ml_collections.ConfigDict(dict(
      in_channels=3, ndf=64, n_layers=3, bn_eps=1e-5, bn_momentum=0.1, leaky_slope=0.2))

  t = c.train
  t.lr, t.b1, t.b2, t.eps = 1e-4, 0.5, 0.9, 1e-8  # torch Adam
  t.weight_decay, t.grad_clip = 0.0, 0.0
  t.lr_schedule, t.warmup_steps = "constant", 0
  t.eval_every = 1000
  t.eval_batch_size = 16  # held-out images per evaluation call
  t.log_every = 50
  t.checkpoint_every = 2000
  return c
