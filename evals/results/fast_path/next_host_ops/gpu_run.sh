# Issue 20, NeXT TTFT after the tower launch (one H200 device call, from the repository root, OUT set;
# ~6 min, each step cut by `timeout`). Writes $OUT/gpu_run.log, $OUT/next/next_b1.{json,md} and
# $OUT/next/ttft_breakdown_llava-next-7b.json.
#   1. GPU tests of the launch (tokens == generate with it on and off, the pinned layout) and the
#      existing graphed-tower / teacher-forcing tests;
#   2. the bench line of /tmp/gpu_now/3/next/next_b1.md (HF prefill vs generate_fast TTFT);
#   3. ttft_breakdown: per config TTFT with the tower launched first vs called in the forward (alternated),
#      each method's plan replayed (--ideal: its TTFT floor without selection work), synced stages.
set -u
export PYTHONPATH=$PWD
mkdir -p "$OUT/next"
LOG=$OUT/gpu_run.log
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu_tower_first.py \
  tests/test_gpu.py -k "tower or pinned or teacher_forcing" 2>&1 | tail -4 | tee -a "$LOG"
timeout 240 python -m mmsink bench --device cuda --shape llava-next-7b --batch 1 --reps 5 \
  --methods fastv,visionzip,dart,visipruner --budgets 320 --decode-tokens 16 --e2e-tokens 16 \
  --out "$OUT/next" --name next_b1 2>&1 | tail -8 | tee -a "$LOG"
timeout 200 python evals/ttft_breakdown.py --shape llava-next-7b \
  --methods none,visionzip:320,fastv:320,dart:320,visipruner:320 --ideal --reps 9 \
  --out "$OUT/next" 2>&1 | tee -a "$LOG"
