#!/usr/bin/env bash
# The GPU checks of sampler.watch(), as one short script for a lent machine with one CUDA GPU, no network
# and its own python3 with torch and transformers. What it needs travels beside the repo in .dev/ (ignored
# by git; put `/.dev/` in .git/info/exclude), made here beforehand:
#   python scripts/pack_minilm.py pack .dev/minilm --task SST-2 --train-size 4096 --dev-size 872 --max-length 48
#   mkdir -p .dev/data/glue/SST-2 && cp ../shared/data/glue/SST-2/{train,dev}.tsv.gz .dev/data/glue/SST-2/
# and the built extension python/torchgrab/_native.abi3.so (abi3: any CPython >= 3.9 loads it; `strip -s`
# keeps the tree under the 64 MiB a call may carry). Run with carry [".dev", "python/torchgrab/_native.abi3.so"].
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1 TORCHGRAB_DATA=$PWD/.dev/data
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, torchgrab; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchgrab', torchgrab.__version__)"
  python3 scripts/pack_minilm.py unpack .dev/minilm /tmp/minilm
} 2>&1 | tee "$OUT/gpu_watch.log"

echo "== tests/test_watch_cuda.py" | tee -a "$OUT/gpu_watch.log"
timeout "${TEST_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_watch_cuda.py 2>&1 | tee -a "$OUT/gpu_watch.log"

echo "== benchmarks/watch_gpu.py" | tee -a "$OUT/gpu_watch.log"
TORCHGRAB_MINILM=/tmp/minilm timeout "${BENCH_S:-300}" python3 benchmarks/watch_gpu.py --device cuda \
  --data .dev/data --train-size 4096 --dev-size 872 "$@" 2>&1 | grep -v "it/s\]" | tee "$OUT/watch_gpu.txt"

echo "== benchmarks/watch_gpu.py --amp bf16 (the cost alone)" | tee -a "$OUT/gpu_watch.log"
TORCHGRAB_MINILM=/tmp/minilm timeout "${AMP_S:-90}" python3 benchmarks/watch_gpu.py --device cuda \
  --data .dev/data --train-size 4096 --dev-size 872 --amp bf16 --seeds 0 --rounds 6 2>&1 | grep -v "it/s\]" \
  | tee "$OUT/watch_gpu_bf16.txt"

echo "== benchmarks/hook_floor.py" | tee -a "$OUT/gpu_watch.log"
timeout "${FLOOR_S:-90}" python3 benchmarks/hook_floor.py --device cuda --rounds 5 --out "$OUT/hook_floor.txt" \
  2>&1 | grep -v "it/s\]" | tee -a "$OUT/gpu_watch.log"
date -u | tee -a "$OUT/gpu_watch.log"
