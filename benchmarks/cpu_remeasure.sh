#!/usr/bin/env bash
# The CPU measurements of BENCHMARKS.md, in the order they were run (issue 13), each step's output in $OUT.
#
#   OUT=/tmp/remeasure TIMM_PYTHON=/tmp/zoovenv/bin/python bash benchmarks/cpu_remeasure.sh [STEP ...]
#
# STEP: ti (Ti/16 b32 with every speed option, the original and timm, tcmalloc), b16 (B/16 b8, the same
# anchors), alloc (Ti/16 b32 under glibc tuned and glibc's defaults), digits (the built-in job, glibc's
# defaults against the default allocator, two rounds in opposite order), profile (where B/16's training
# step spends its time, vit_cls against the original), compile (compile time unrolled vs scan_layers),
# memory (XLA's footprint per remat policy). Default: all, in that order. Start it on a quiet machine:
# every step records the 1-minute load average, and only same-run ratios compare.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/remeasure}
TIMM_PYTHON=${TIMM_PYTHON:-/tmp/timmvenv/bin/python}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(ti b16 alloc digits profile compile memory)
bench() { python3 benchmarks/benchmark.py --timm_python "$TIMM_PYTHON" "$@"; }
log() { echo "== $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg): $*" | tee -a "$OUT/steps.log"; }

for step in "${steps[@]}"; do
  case $step in
    ti)
      log "Ti/16 b32, tcmalloc: defaults, each speed option, the original, timm"
      bench --model Ti/16 --batch 32 --rounds 4 --steps_per_round 1 --allocator tcmalloc \
        --compare reference,timm --variant unfused_qkv:fuse_qkv=false \
        --variant attn_xla:attention_impl=xla --variant chunks2:batch_chunks=2 \
        --variant bf16mm:matmul_dtype=bfloat16 \
        --json_out "$OUT/ti16_tcmalloc.json" > "$OUT/ti16_tcmalloc.txt" 2>&1 ;;
    b16)
      log "B/16 b8, tcmalloc: defaults, unfused QKV, bf16 matmuls, the original, timm"
      bench --model B/16 --batch 8 --rounds 3 --steps_per_round 1 --allocator tcmalloc \
        --compare reference,timm --variant unfused_qkv:fuse_qkv=false \
        --variant bf16mm:matmul_dtype=bfloat16 \
        --json_out "$OUT/b16_tcmalloc.json" > "$OUT/b16_tcmalloc.txt" 2>&1 ;;
    alloc)
      for mode in glibc-tuned system; do
        log "Ti/16 b32, $mode: defaults, the original, timm"
        bench --model Ti/16 --batch 32 --rounds 3 --steps_per_round 1 --allocator "$mode" \
          --compare reference,timm --json_out "$OUT/ti16_$mode.json" > "$OUT/ti16_$mode.txt" 2>&1
      done ;;
    digits)
      # 300 steps of configs/default.py; the progress line's img/s over steps 101-200 and 201-300.
      for mode in system auto auto system; do
        log "digits job, VIT_CLS_ALLOCATOR=$mode"
        rm -rf "$OUT/digits_workdir"
        VIT_CLS_ALLOCATOR=$mode /usr/bin/time -v python3 train.py --config=configs/default.py \
          --workdir="$OUT/digits_workdir" --config.total_steps=300 --config.eval_every=300 \
          --config.checkpoint_every=300 >> "$OUT/digits_$mode.txt" 2>&1
      done
      rm -rf "$OUT/digits_workdir" ;;
    profile)
      log "profile: B/16 b8 training step, vit_cls and the original"
      python3 benchmarks/profile_step.py --model B/16 --batch 8 --compare reference --rounds 1 \
        --profile_steps 2 --allocator tcmalloc --json_out "$OUT/profile_b16.json" \
        > "$OUT/profile_b16.txt" 2>&1 ;;
    compile)
      for model in B/16 L/16; do
        for scan in "" --scan_layers; do
          log "compile time $model $scan"
          bench --model "$model" --batch 8 --compile_only $scan >> "$OUT/compile.txt" 2>&1
        done
      done ;;
    memory)
      log "XLA footprint per remat policy, Ti/16, unrolled and scanned"
      bench --model Ti/16 --max_batch none,block,dots --memory_limit_gb 16 --no_verify \
        --json_out "$OUT/memory_unrolled.json" > "$OUT/memory.txt" 2>&1
      bench --model Ti/16 --scan_layers --max_batch none,block,dots --memory_limit_gb 16 --no_verify \
        --json_out "$OUT/memory_scan.json" >> "$OUT/memory.txt" 2>&1 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
log "done"
