#!/usr/bin/env bash
# The GPU work of a session, as one short script for a lent machine with one CUDA GPU, no network and its
# own python3 with torch (the README's GPU figures come from it). What it needs travels beside the repo in
# .dev/ (ignored by git), made here beforehand:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .dev/whl \
#       grab-sampler==0.1.3 overrides                            # the reference, for benchmarks/gpu.py
#   python scripts/pack_minilm.py pack .dev/minilm               # all-MiniLM-L6-v2, packed exactly (54 MB)
#   mkdir -p .dev/data/glue/SST-2 .dev/data/wikitext-2 && cp ../shared/data/wikitext-2/*.gz .dev/data/wikitext-2/ \
#       && cp ../shared/data/glue/SST-2/{train,dev}.tsv.gz .dev/data/glue/SST-2/
# and the built extension python/torchgrab/_native.abi3.so (abi3, so any CPython >= 3.9 loads it).
# Each part has its own time limit, so one overrun cannot take the others' results with it; the example
# scripts write their CSV row by row, so a cut-off grid still leaves the finished runs.
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/python:/tmp/site PYTHONUNBUFFERED=1 TORCHGRAB_DATA=$PWD/.dev/data
GPU_BENCH_S=${GPU_BENCH_S:-180} FINETUNE_S=${FINETUNE_S:-230} WIKITEXT_S=${WIKITEXT_S:-150}
WIKITEXT_TOKENS=${WIKITEXT_TOKENS:-300000}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/whl/*.whl
  python3 -c "import torch, numpy, torchgrab; print('torch', torch.__version__, 'numpy', numpy.__version__, 'torchgrab', torchgrab.__version__)"
  python3 scripts/pack_minilm.py unpack .dev/minilm /tmp/minilm
} 2>&1 | tee "$OUT/gpu_session.log"

echo "== benchmarks/gpu.py" | tee -a "$OUT/gpu_session.log"
timeout "$GPU_BENCH_S" python3 benchmarks/gpu.py 2>&1 | tee "$OUT/gpu_bench.txt"

echo "== examples/glue_finetune.py on cuda" | tee -a "$OUT/gpu_session.log"
TORCHGRAB_MINILM=/tmp/minilm timeout "$FINETUNE_S" python3 examples/glue_finetune.py --device cuda \
  --task SST-2 --train-size 1024 --dev-size 872 --epochs 3 --seeds 3 --out "$OUT/glue_finetune" 2>&1 \
  | grep -v "it/s\]" | tee -a "$OUT/gpu_session.log"

echo "== examples/wikitext2_lstm.py on cuda" | tee -a "$OUT/gpu_session.log"
timeout "$WIKITEXT_S" python3 examples/wikitext2_lstm.py --device cuda --train-tokens "$WIKITEXT_TOKENS" \
  --valid-tokens 0 --epochs 3 --seeds 3 --out "$OUT/wikitext2_lstm" 2>&1 \
  | grep -v "it/s\]" | tee -a "$OUT/gpu_session.log"
date -u | tee -a "$OUT/gpu_session.log"
