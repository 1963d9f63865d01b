#!/usr/bin/env bash
# The paper's WikiText-2 and GLUE experiments at full size on a lent machine with one CUDA GPU (no network,
# its own python3 with torch and transformers), as one short call. What it needs travels beside the repo
# in .dev/ (ignored by git), made here beforehand (about 62 MB with the repo, under the 64 MiB a call carries):
#   python scripts/pack_minilm.py pack .dev/minilm --task MRPC,CoLA,STS-B --train-size 0 --dev-size 0 \
#       --max-length 128 --rows bfloat16
#   mkdir -p .dev/data/wikitext-2 && cp ../shared/data/wikitext-2/*.txt.gz .dev/data/wikitext-2/
#   for t in MRPC CoLA STS-B; do mkdir -p .dev/data/glue/$t && cp ../shared/data/glue/$t/{train,dev}.tsv.gz .dev/data/glue/$t/; done
# and the built extension python/torchgrab/_native.abi3.so. Run with carry [".dev",
# "python/torchgrab/_native.abi3.so"] and a timeout of about 570 s.
#
# The models are small, and one process keeps the GPU far from busy, so one process per (task, seed) and
# per (ordering, seed) run side by side on the 16 cores and share the GPU (92-96% busy with 9-12 of them):
# timings are then under that shared load (each arm's the same load, roughly), not a clean cost figure.
# Every process writes its CSV row by row and is cut at LIMIT_S, so a run that does not finish keeps its
# finished epochs. A quick smoke run of each example goes first and stops the call at once if it fails
# (SMOKE=0 skips it). GLUE_JOBS and WT_JOBS choose the runs ("TASK:SEED:ORDERINGS" and "ORDERING:SEED").
# Each WikiText-2 process holds 10-14 GB of the GPU (its full-pass loss runs 64 chunks at a time), so all
# 15 at once do not fit one GPU's memory (a first call that tried lost half its runs): the defaults are
# the whole GLUE grid and WikiText-2's rr and grab; run so, flipflop and pair in a second call with WT_JOBS.
set -u
OUT=${OUT:-out/gpu}
LIMIT_S=${LIMIT_S:-420}
WT_EPOCHS=${WT_EPOCHS:-50}
GLUE_JOBS=${GLUE_JOBS:-$(for t in MRPC CoLA STS-B; do for s in 0 1 2; do printf '%s:%s:rr,grab,pair,so,flipflop ' $t $s; done; done)}
WT_JOBS=${WT_JOBS:-$(for o in rr grab; do for s in 0 1 2; do printf '%s:%s ' $o $s; done; done)}
RUNS="$OUT/runs"
mkdir -p "$RUNS"
LOG="$OUT/fullscale.log"
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1 TORCHGRAB_DATA=$PWD/.dev/data TORCHGRAB_MINILM=/tmp/minilm \
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAYON_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc
  python3 -c "import torch, transformers, torchgrab; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchgrab', torchgrab.__version__)"
  python3 scripts/pack_minilm.py unpack .dev/minilm /tmp/minilm
} >"$LOG" 2>&1

if [ "${SMOKE:-1}" = 1 ]; then
echo "== smoke runs" >>"$LOG"
timeout 150 python3 examples/glue_finetune.py --device cuda --quick --task STS-B --capture watch \
  --orderings rr,grab --seeds 1 --out /tmp/smoke_glue >/tmp/smoke_glue.log 2>&1 &
g=$!
timeout 150 python3 examples/wikitext2_lstm.py --device cuda --quick --capture watch \
  --orderings rr,grab --seeds 1 --out /tmp/smoke_wt >/tmp/smoke_wt.log 2>&1
w=$?
wait $g
g=$?
grep -v "it/s\]" /tmp/smoke_glue.log /tmp/smoke_wt.log | tail -40 >>"$LOG"
if [ $g -ne 0 ] || [ $w -ne 0 ]; then
  echo "SMOKE FAILED: glue rc=$g wikitext rc=$w" >>"$LOG"
  cat "$LOG"
  exit 3
fi
fi
date -u >>"$LOG"

echo "== grid, each process cut at ${LIMIT_S}s" >>"$LOG"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_watch_cuda.py >"$OUT/test_watch_cuda.txt" 2>&1 &
for job in $GLUE_JOBS; do
  IFS=: read -r task seed orderings <<<"$job"
  timeout "$LIMIT_S" python3 examples/glue_finetune.py --device cuda --task "$task" --train-size 0 --dev-size 0 \
    --max-length 128 --batch-size 32 --epochs 3 --seeds 1 --first-seed "$seed" --capture watch \
    --orderings "$orderings" --out "$RUNS/glue_s$seed" >"$RUNS/glue_${task}_s$seed.log" 2>&1 &
done
for job in $WT_JOBS; do
  IFS=: read -r ordering seed <<<"$job"
  timeout "$LIMIT_S" python3 examples/wikitext2_lstm.py --device cuda --capture watch --train-tokens 0 \
    --valid-tokens 0 --epochs "$WT_EPOCHS" --seeds 1 --first-seed "$seed" --orderings "$ordering" \
    --out "$RUNS/wikitext2_${ordering}_s$seed" >"$RUNS/wikitext2_${ordering}_s$seed.log" 2>&1 &
done
sleep 60
nvidia-smi >>"$LOG" 2>&1
wait
date -u >>"$LOG"
tar czf "$OUT/runs.tgz" -C "$OUT" runs && rm -rf "$RUNS"
tail -3 "$OUT/test_watch_cuda.txt" >>"$LOG"
cat "$LOG"
