#!/usr/bin/env bash
# For the moment a GPU is lent: the GPU paths and the whole perf set in one go, within 8 minutes.
#   1. the no-host-sync step test under torch.cuda.set_sync_debug_mode("error") (tests/test_step_sync.py);
#   2. `bench perf` on the GPU: packed against unpacked runs per hour for moons and CIFAR-10 4C3F at K = 1, 3, 9
#      (the packed 4C3F step time, and the projected wall time of the paper's CIFAR-10 4C3F protocol,
#      9 seeds × 800 epochs), the CLL/CE step ratio, the epoch time and the augmentation throughput.
# Usage: benchmarks/gpu_check.sh [DATA_ROOT]   (default: $BENCH_DATA, else ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${1:-${BENCH_DATA:-../shared/data}}
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "== step without host syncs (CUDA sync-debug mode)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_step_sync.py
echo "== bench perf (packed vs unpacked, step ratio, epoch, augmentation)"
timeout $((470 - ($(date +%s) - start))) "$PY" benchmarks/perf.py --device cuda --data-root "$DATA" --steps 20 \
    --pack-sizes 1,3,9
echo "== gpu_check done in $(( $(date +%s) - start )) s"
