#!/usr/bin/env bash
# The GPU figures of docs/performance.md ("The whole trainer"): bench/trainer.py on one GPU for
# stage 1 (batch 32) with remat full, dots, save_qkv_attn and auto, stage 3 with auto, and a
# jax.profiler trace of a few stage-1 steps. Run from the repository root:
#
#   OUT=/some/folder bash bench/gpu_session.sh
#
# Results: $OUT/results.jsonl (one JSON line a run), $OUT/<run>.log (the trainer's log, auto's
# candidates included), $OUT/trace/ (the profile), $OUT/log.txt. Every run has a timeout and the
# session stays under 9 minutes: a run that would not finish in the time left is skipped.
# Wheels in $WHEELS (default wheels/) are installed first with pip --no-deps, for images that
# lack grain, array_record, clu, ml_collections or tensorboardX.
set -uo pipefail
OUT=${OUT:-gpu_out}
WHEELS=${WHEELS:-wheels}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python -m pip install -q --no-deps --no-index "$WHEELS"/*.whl \
    || python -m pip install -q --no-deps --no-index --break-system-packages "$WHEELS"/*.whl
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# One compile serves several runs: auto's candidates and the step it then trains with, and the
# policies the runs before it compiled (compile_s then counts cache reads).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
python -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tee "$OUT/log.txt"

deadline=$((SECONDS + 530))
run() {  # run <name> <timeout s> <bench/trainer.py flags...>
  local name=$1 limit=$2
  shift 2
  if ((SECONDS + limit > deadline)); then
    echo "$name: skipped, $((deadline - SECONDS)) s left" | tee -a "$OUT/log.txt"
    return
  fi
  timeout -k 10 "$limit" python bench/trainer.py "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
  echo "$name: exit $? at $SECONDS s" | tee -a "$OUT/log.txt"
  tail -n 1 "$OUT/$name.json" | sed "s/^{/{\"run\": \"$name\", /" >>"$OUT/results.jsonl"
}

S1=(--config configs/svg_t2i_2b.py:stage1_256 --global_batch_size 32
    --config.model.attention_backend=cudnn)
run stage1_full 100 "${S1[@]}" --steps 10 --config.model.remat_policy=full
run stage1_dots 90 "${S1[@]}" --steps 10 --config.model.remat_policy=dots
run stage1_save_qkv_attn 90 "${S1[@]}" --steps 10 --config.model.remat_policy=save_qkv_attn
run stage1_auto 110 "${S1[@]}" --steps 10 --config.model.remat_policy=auto
run stage3_auto 150 --config configs/svg_t2i_2b.py:stage3_1024 --global_batch_size 4 --steps 3 \
    --config.model.attention_backend=cudnn --config.model.remat_policy=auto
run stage1_profile 60 "${S1[@]}" --steps 2 --config.model.remat_policy=auto \
    --profile_dir "$OUT/trace"
cat "$OUT/results.jsonl" 2>/dev/null
