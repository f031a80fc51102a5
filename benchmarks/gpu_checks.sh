#!/usr/bin/env bash
# Every check fullscale keeps for a GPU machine, in one run (at most 9 minutes: each part has its own limit):
#   1. the memory plan against the measured peak on 1B-8B Llama shapes  (gpu_memory_check.py)
#   2. FSDP2 with CPU offload, DeepSpeed ZeRO-3 with offload and ZeRO-2: start, save, killed,
#      resumed bitwise, equal to DDP                                       (gpu_sharded_smoke.py)
#   3. throughput and MFU of fullscale on the 8B shape                   (bench_gpu.py; its Trainer
#      comparison is left out here for time: run bench_gpu.py alone for it)
# Needs torch, transformers, peft, accelerate, datasets and deepspeed. Logs and JSON go to
# $OUT (default /tmp/fullscale-gpu); record the figures in benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_checks.sh            # from the repository root
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fullscale-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== 1. plan vs measured peak memory"
timeout 150 "$PY" benchmarks/gpu_memory_check.py --json "$OUT/memory.json" 2>&1 | tee "$OUT/memory.log" \
    | grep -v -i warn || status=1
echo "== 2. FSDP offload and DeepSpeed ZeRO on the GPU"
timeout 200 "$PY" benchmarks/gpu_sharded_smoke.py 2>&1 | tee "$OUT/sharded.log" | grep -v -i warn || status=1
echo "== 3. throughput and MFU (8B shape)"
timeout 200 "$PY" benchmarks/bench_gpu.py --size 8b --warmup 2 --steps 4 --only fullscale fullscale+pack --json "$OUT/mfu.json" 2>&1 | tee "$OUT/mfu.log" \
    | grep -v -i warn || status=1
exit $status
