#!/usr/bin/env bash
# Issue 4's GPU checks in one call of at most ~9 minutes, most important first. After each
# check $OUT/results.json holds every finished one ({check: throughput.py's JSON}), so a call
# cut short still returns what it finished (the device returns at most 8 files: results.json,
# log.txt, stderr.txt, env.txt).
#
#   1. every method at its reference settings against PyTorch (float32; target >= 3x; without
#      the in-step baselines, as the references), CycleGAN 256/1 first
#   2. CycleGAN 256/8 in bfloat16 (target: > 35% model FLOP utilization)
#   3. CycleGAN 512/1 in bfloat16 with and without model.remat (peak device memory)
#   4. PixelDA with 8 steps per dispatch (config.steps_per_call) against 1
#   5. GTA-seg; CycleGAN's compile time cold and from the persistent compilation cache
#
# The device machine has jax, flax, optax, orbax, chex and torch but not ml_collections, and
# ../shared does not travel. Prepare once in the checkout (both folders are git-ignored):
#   printf '/.whl/\n/.bench/\n' >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
#   mkdir -p .bench && cp ../shared/bench/torch_ref.py .bench/
# then run it there with carry [".whl", ".bench"] and timeout_s 600:
#   bash benchmarks/gpu_check.sh
# SMOKE=1 runs the same plan at toy sizes (any machine, CPU too) to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
WORK=$(mktemp -d)
mkdir -p "$OUT"
if ! python3 -c "import ml_collections" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
TORCH_REF=${TORCH_REF:-.bench/torch_ref.py}
[ -f "$TORCH_REF" ] || TORCH_REF=../shared/bench/torch_ref.py
DEADLINE=$(($(date +%s) + ${BUDGET_S:-540}))
TIMING=(--warmup 3 --steps 10 --repeats 3)
if [ "${SMOKE:-0}" = 1 ]; then TIMING=(--warmup 0 --steps 1 --repeats 1 --variant runlocal); fi
size() { if [ "${SMOKE:-0}" = 1 ]; then echo 32; else echo "$1"; fi; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

check() {  # check NAME ARGS...: one throughput.py run within what is left of the budget
    local name=$1
    shift
    run_script "$name" benchmarks/throughput.py "${TIMING[@]}" "$@"
}

run_script() {  # run_script NAME SCRIPT ARGS...: SCRIPT --json, within what is left
    local name=$1 left=$((DEADLINE - $(date +%s)))
    shift
    if [ "$left" -lt 30 ]; then echo "skipped $name: budget spent" | tee -a "$OUT/log.txt"; return; fi
    echo "== $name (${left}s left)" | tee -a "$OUT/log.txt"
    timeout "$left" python3 "$@" --json "$WORK/$name.json" 2>>"$OUT/stderr.txt" \
        | tee -a "$OUT/log.txt"
    python3 - "$WORK" "$OUT/results.json" <<'PY'
import glob, json, os, sys
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/*.json"))}
json.dump(runs, open(sys.argv[2], "w"), indent=1)
PY
}

check cyclegan256 --method cyclegan --image-size "$(size 256)" --batch-size 1 --compare-torch \
    --torch-ref "$TORCH_REF"
check cyclegan256_b8_bf16 --method cyclegan --image-size "$(size 256)" --batch-size 8 \
    --dtype bfloat16
# --no-baselines: the same work as the references, which train no source-only baseline
for m in pixelda gta ccgan discogan cycada; do
    check "$m" --method "$m" --compare-torch --no-baselines --torch-ref "$TORCH_REF"
done
check cyclegan128_b4 --method cyclegan --image-size "$(size 128)" --batch-size 4 \
    --compare-torch --torch-ref "$TORCH_REF"
check cyclegan512_bf16 --method cyclegan --image-size "$(size 512)" --batch-size 1 \
    --dtype bfloat16
check cyclegan512_bf16_remat --method cyclegan --image-size "$(size 512)" --batch-size 1 \
    --dtype bfloat16 --remat
check pixelda_k8 --method pixelda --steps-per-call 8
check gta_seg --method gta_seg
# CycleGAN's step compiled in a fresh process, then loaded from the persistent cache (a resume)
run_script compile_cache_cyclegan benchmarks/compile_cache.py --method cyclegan
echo "done; JSON in $OUT" | tee -a "$OUT/log.txt"
