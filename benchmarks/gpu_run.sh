#!/usr/bin/env bash
# One call on a lent GPU (issue 9, part 3): everything the accelerator must show, in priority order, each
# step under its own time limit so that one slow step cannot eat the others, its results merged into
# $OUT as soon as it ends (what finished comes back even if the call is cut off).
#
#   1. ViT-B/16 @224 bf16 training throughput and MFU, fused attention (cuDNN flash attention through
#      jax.nn.dot_product_attention), batch $B16_BATCH; MFU against H100 SXM dense bf16 989 TFLOP/s
#      (--peak_tflops) and against the bf16 matmul probe measured in the same run.
#      If the cuDNN path fails to compile, the same run with XLA's attention.
#   2. Compile time of the training step of L/16 and H/14 with layer scan (target < 60 s), beside B/16
#      with scan: with scan, compile time should not grow with depth (12, 24, 32 layers).
#   3. Largest training batch per remat policy (none, block, dots) for B/16 bf16 with scan.
#   4. If time is left: B/16 throughput with scan, and L/16 compile time without scan, for contrast.
#
# Usage (GPU machine): bash benchmarks/gpu_run.sh            (writes into $OUT, default /tmp/gpu_run)
# Dry run on CPU, tiny settings, seconds: GPU_RUN_TINY=1 bash benchmarks/gpu_run.sh
# $OUT receives four files (the device tool returns at most eight): env.txt, log.txt (every step's
# output), results.json (every step's JSON, re-merged after each step) and summary.txt.
set -u
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
JSON_DIR=$(mktemp -d /tmp/gpu_run_json.XXXXXX)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX takes 75% of GPU memory by default; the max-batch search wants the real limit.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
BENCH="$PY benchmarks/benchmark.py"
START=$(date +%s)

if [ "${GPU_RUN_TINY:-0}" = "1" ]; then
  B16="--model testing --resolution 16"; B16_BATCH=8; DEEP1="testing"; DEEP2="testing"; RES=16
  MAXB="--model testing --resolution 16"; PEAK=0.1
else
  B16="--model B/16 --resolution 224"; B16_BATCH=${B16_BATCH:-256}; DEEP1="L/16"; DEEP2="H/14"; RES=224
  MAXB="--model B/16 --resolution 224"; PEAK=989
fi

TOTAL=${GPU_RUN_TOTAL_S:-400}  # the whole script's budget: each step's limit is cut to what is left
step() {  # step NAME SECONDS CMD...: runs CMD with a limit, logs to $OUT/NAME.log, reports status
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  local left=$(( TOTAL - (t0 - START) ))
  if [ $left -lt 20 ]; then echo "=== $name: skipped, ${left} s left of ${TOTAL}"; return 1; fi
  [ $secs -gt $left ] && secs=$left
  echo "=== [$((t0 - START)) s] $name (limit ${secs} s): $*"
  timeout --signal=TERM --kill-after=10 "$secs" "$@" > "$JSON_DIR/$name.log" 2>&1
  local rc=$?
  { echo "=== $name: $*"; cat "$JSON_DIR/$name.log"; echo "=== $name: rc=$rc"; } >> "$OUT/log.txt"
  grep -v '^JSON: ' "$JSON_DIR/$name.log" | grep -v -i 'warning' | tail -n 25
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
  $PY benchmarks/merge_results.py "$JSON_DIR" "$OUT"
  return $rc
}

{
  echo "host: $(hostname)  date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())" 2>&1
} | tee "$OUT/env.txt"

# 1. B/16 bf16 throughput + MFU with the fused (cuDNN) attention.
if ! step b16_bf16_fused 180 $BENCH $B16 --batch $B16_BATCH --dtype bfloat16 \
    --attention_impl fused --peak_tflops $PEAK --warmup 3 --rounds 5 --steps_per_round 10 \
    --json_out "$JSON_DIR/b16_bf16_fused.json"; then
  step b16_bf16_xla 150 $BENCH $B16 --batch $B16_BATCH --dtype bfloat16 \
    --attention_impl xla --peak_tflops $PEAK --warmup 2 --rounds 5 --steps_per_round 5 \
    --json_out "$JSON_DIR/b16_bf16_xla.json"
fi

# 2. Compile times with layer scan: B/16 (12 layers), L/16 (24), H/14 (32); abstract inputs, no allocation.
for m in "${B16#--model }" "$DEEP1" "$DEEP2"; do
  m=${m%% *}
  tag=$(echo "$m" | tr '/' '_')
  step "compile_scan_$tag" 90 $BENCH --model "$m" --resolution $RES --batch $B16_BATCH \
      --dtype bfloat16 --scan_layers --compile_only --json_out "$JSON_DIR/compile_scan_$tag.json"
done

# 3. Largest batch per remat policy (B/16, bf16, scan).
step max_batch 150 $BENCH $MAXB --batch $B16_BATCH --dtype bfloat16 --scan_layers \
    --max_batch none,block,dots --json_out "$JSON_DIR/max_batch.json"

# 4. If the call still has time: B/16 throughput with layer scan (what scan costs at run time), and
#    L/16 compile time without scan (what scan saves at compile time).
step b16_bf16_fused_scan 100 $BENCH $B16 --batch $B16_BATCH --dtype bfloat16 --attention_impl fused \
    --scan_layers --peak_tflops $PEAK --warmup 2 --rounds 3 --steps_per_round 5 \
    --json_out "$JSON_DIR/b16_bf16_fused_scan.json"
tag=$(echo "$DEEP1" | tr '/' '_')
step "compile_unrolled_$tag" 120 $BENCH --model "$DEEP1" --resolution $RES \
    --batch $B16_BATCH --dtype bfloat16 --compile_only --json_out "$JSON_DIR/compile_unrolled_$tag.json"

echo "=== summary"
cat "$OUT/summary.txt"
echo "total $(( $(date +%s) - START )) s"
