#!/usr/bin/env bash
# The GPU figures of docs/performance.md ("The whole trainer: bench/trainer.py and remat auto").
# Each part runs in under 9 minutes. Run from the repository root, after bench/gpu_wheels.sh has
# filled .whl/ where pip reaches the index:
#
#   OUT=/some/folder bash bench/gpu_session.sh all  # the GPU targets' figures first, in one part:
#                                                   # stage 1 auto (+ profile), torch; stage 3
#                                                   # auto; stage 1 auto as a scan, dots, full;
#                                                   # stage 3 torch; then part 2's variants,
#                                                   # while time is left
#   OUT=/some/folder bash bench/gpu_session.sh 1    # stage 1: auto (+ profile), torch, auto as
#                                                   # a scan, dots, full
#   OUT=/some/folder bash bench/gpu_session.sh 2    # stage 3: auto at batch 8 (4 if 8 fits no
#                                                   # policy), torch; stage 1 dots with fp32
#                                                   # activations, with 2 layers per scan
#                                                   # iteration, and with cuBLAS GEMMs
#
# Meant for an H200: stage 1 under `dots` at 32 samples takes 69 GiB unrolled, 78 as a scan
# (docs/performance.md), over XLA's limit on an 80 GB card, where auto takes save_qkv_attn and
# the runs that name dots train 16 samples (62.5 GiB as a scan; "One 80 GB card" there), their
# JSON saying so.
# Every run is bench/trainer.py or bench/torch_trainer.py at global batch 32 (stage 1) with cuDNN
# attention, bf16 compute and the stage configs' defaults otherwise (layer loop auto: unrolled on
# a GPU), 10 warm-up and 10 timed steps. Should stage 1's auto run not end in time (the unrolled
# step compiles longer than the scan), the same run as a scan takes its place.
# A run has a timeout (then it prints every thread's stack into its log, SIGUSR1, and is killed
# 20 s later), and one that would not end before the part's deadline (DEADLINE_S seconds
# after the versions are printed, default 500) is skipped, and the next one that still fits runs,
# so that a part ends in time on a machine held for a fixed time.
# Back in $OUT (at most 8 files): results.jsonl (one JSON line a run that printed one, "run"
# naming it, "exit" its exit status), log.txt (versions, each run's exit), profile.txt
# (launch/profile_summary.py of the 2 profiled stage-1 steps), stage1_auto.xplane.pb.gz (that
# trace, for TensorBoard), profile_scan.txt (the same for the layers as a scan, when stage1_auto
# ran unrolled), logs.tar.gz (each run's log).
set -uo pipefail
PART=${1:?give the part: all, 1 or 2}
OUT=${OUT:-gpu_out}
SCRATCH=$(mktemp -d)  # the runs' workdirs and logs, the wheels' install, the compile cache
RUNS=$SCRATCH/runs
mkdir -p "$OUT" "$RUNS"
trap 'tar -czf "$OUT/logs.tar.gz" -C "$RUNS" --exclude=records --exclude="*.xplane.pb" . 2>/dev/null; rm -rf "$SCRATCH"' EXIT
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SCRATCH/site" .whl/*.whl || exit 1
  export PYTHONPATH=$SCRATCH/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# auto's candidates and the step it then trains with share compiles through the cache.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$SCRATCH/jax_cache}
# XLA's allocator takes 92% of the GPU, as in every script (svg_jax/cli.py): remat auto's budget is
# that x 0.9. Each run is a process of its own, so torch's runs find the memory free again.
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 - <<'EOF'
import importlib.metadata as m, sys
print("python", sys.version.split()[0], *(f"{p} {m.version(p)}" for p in (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "torch", "diffusers")))
import jax, jax.numpy as jnp, torch
print(jax.devices(), "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
from svg_jax.models import layers  # the runs name cudnn; the stage configs' "auto" must agree
print("attention auto on this card:", layers.auto_backend(96, jnp.bfloat16, plain=True))
EOF
} 2>&1 | tee -a "$OUT/log.txt"

deadline=$((SECONDS + ${DEADLINE_S:-500}))
run() {  # run <name> <timeout s> <script> <flags...>: one JSON line into results.jsonl
  local name=$1 limit=$2 script=$3
  shift 3
  if ((SECONDS + limit > deadline)); then
    echo "$name: skipped, $((deadline - SECONDS)) s left" | tee -a "$OUT/log.txt"
    return 1
  fi
  timeout -s USR1 -k 20 "$limit" python3 "bench/$script" "$@" >"$RUNS/$name.json" 2>"$RUNS/$name.log"
  local rc=$?
  echo "$name: exit $rc at $SECONDS s" | tee -a "$OUT/log.txt"
  tail -n 1 "$RUNS/$name.log" | tee -a "$OUT/log.txt"
  # A run that printed its JSON in the 20 s after the timeout's signal exits 124 but measured.
  if tail -n 1 "$RUNS/$name.json" | grep -q '^{'; then
    tail -n 1 "$RUNS/$name.json" | sed "s/^{/{\"run\": \"$name\", \"exit\": $rc, /" \
      >>"$OUT/results.jsonl"
  fi
  return $rc
}

# Stage 1's dots runs: 32 samples where they fit (an H200), else 16.
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
DOTS=(--config.model.remat_policy=dots)
if [[ $gpu_mib =~ ^[0-9]+$ ]] && ((gpu_mib < 100000)); then
  DOTS+=(--global_batch_size 16)
fi
S1=(--config configs/svg_t2i_2b.py:stage1_256 --global_batch_size 32 --steps 10
    --config.model.attention_backend=cudnn)
S3=(--config configs/svg_t2i_2b.py:stage3_1024 --steps 5 --config.model.attention_backend=cudnn)
stage1_auto() {
  local name=stage1_auto trace
  run stage1_auto 270 trainer.py "${S1[@]}" --config.model.remat_policy=auto --profile_steps 2 \
      --workdir "$RUNS/stage1_auto" \
    || { name=stage1_auto_scan; run stage1_auto_scan 150 trainer.py "${S1[@]}" \
      --config.model.remat_policy=auto --profile_steps 2 --workdir "$RUNS/stage1_auto_scan" \
      --config.model.layer_loop=scan; }
  summarize_profile "$name" profile.txt stage1_auto.xplane.pb.gz
}
summarize_profile() {  # <run> <summary file> [<trace file>]: the run's profiled steps into $OUT
  local trace
  trace=$(find "$RUNS/$1/tensorboard" -name '*.xplane.pb' 2>/dev/null | head -n 1)
  if [ -n "$trace" ]; then
    if [ -n "${3:-}" ]; then gzip -c "$trace" >"$OUT/$3"; fi
    python3 launch/profile_summary.py "$trace" --steps 2 --top 40 >"$OUT/$2" 2>&1
  fi
}
stage1_torch() {
  local ours=() name  # the speedup needs our run; torch's figures stand alone too
  for name in stage1_auto stage1_auto_scan; do
    if tail -n 1 "$RUNS/$name.json" 2>/dev/null | grep -q '^{'; then
      ours=(--ours "$RUNS/$name.json")
      break
    fi
  done
  run stage1_torch 150 torch_trainer.py "${S1[@]}" --compile blocks ${ours[@]+"${ours[@]}"}
}
stage3_auto() {
  run stage3_auto_b8 200 trainer.py "${S3[@]}" --global_batch_size 8 \
      --config.model.remat_policy=auto \
    || run stage3_auto_b4 150 trainer.py "${S3[@]}" --global_batch_size 4 \
      --config.model.remat_policy=auto
}
stage3_torch() {  # at the batch stage3_auto trained with
  local ours batch
  ours=$(ls "$RUNS"/stage3_auto_b*.json 2>/dev/null | head -n 1)
  batch=$(python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['global_batch_size'])" "$ours" 2>/dev/null)
  if [ -n "$batch" ]; then
    run stage3_torch 150 torch_trainer.py "${S3[@]}" --global_batch_size "$batch" \
        --compile blocks --ours "$ours"
  fi
}
stage1_policies() {
  # The layers as a scan (the loop over layers the other platforms run), against stage1_auto:
  # its profile is the "before" of the unrolled loop's.
  [ -s "$RUNS/stage1_auto_scan.json" ] \
    || { run stage1_auto_scan 120 trainer.py "${S1[@]}" --config.model.remat_policy=auto \
      --config.model.layer_loop=scan --profile_steps 2 --workdir "$RUNS/stage1_auto_scan" \
      && summarize_profile stage1_auto_scan profile_scan.txt; }
  run stage1_dots 90 trainer.py "${S1[@]}" "${DOTS[@]}"
  run stage1_full 90 trainer.py "${S1[@]}" --config.model.remat_policy=full
}
stage1_variants() {
  # What bf16 activations (the stage configs' setting) gain against fp32 ones.
  run stage1_dots_fp32_activations 100 trainer.py "${S1[@]}" "${DOTS[@]}" \
      --config.model.activation_dtype=float32
  run stage1_dots_unroll2 100 trainer.py "${S1[@]}" "${DOTS[@]}" \
      --config.model.layer_loop=scan --config.model.scan_unroll=2
  # The code-generation flags NVIDIA's JAX images set (cuBLAS rather than Triton GEMMs); the
  # latency-hiding scheduler only overlaps collectives, of which one GPU has none. Last, so a
  # short part skips it first.
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
    run stage1_dots_cublas 100 trainer.py "${S1[@]}" "${DOTS[@]}"
}

case $PART in
  all) stage1_auto; stage1_torch; stage3_auto; stage1_policies; stage3_torch; stage1_variants ;;
  1) stage1_auto; stage1_torch; stage1_policies ;;
  2) stage3_auto; stage3_torch; stage1_variants ;;
  *) echo "part must be all, 1 or 2, got $PART" >&2; exit 2 ;;
esac
cat "$OUT/results.jsonl" 2>/dev/null
