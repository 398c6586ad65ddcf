# Issue 20, second wave, on one H200, as TWO device calls (run from the repository root, OUT set):
#   PARTS=a bash evals/results/fast_path/issue20_targets.sh  # GPU test + 3 benches: ~5.5 min, cut at 7.7 min
#   PARTS=b bash evals/results/fast_path/issue20_targets.sh  # serving bench: ~5.5 min, cut at 6.7 min
# (PARTS=ab, the default, runs both in one call: up to 14.4 min, over the 10-minute limit.) Each part
# runs under `timeout` (limits below), so a slow part is cut and the next still runs. Outputs, all in
# $OUT (at most 7 files): wave2.log (progress and test lines), wave2.md (the three bench tables),
# llava_b1.json, llava_b16.json, next_b1.json, serve.json + serve.md (rewritten after every serving row,
# so a cut run keeps its rows). WAVE2_TINY=1: tiny shapes on the CPU, no time limits (checks every
# command line; slow on a loaded 2-core CPU).
set -u
export PYTHONPATH=$PWD
PARTS=${PARTS:-ab}
if [ "${WAVE2_TINY:-0}" = 1 ]; then
  S1=tiny-cpu SN=tiny-next-cpu DEV=cpu R=1 RN=1 K=1 K1=1 E2E=2 NEW=2 MAXB=2 SECS=60 SR=1 B16=2 SCALE=0
else
  S1=llava-1.5-7b SN=llava-next-7b DEV=cuda R=3 RN=5 K=16 K1=32 E2E=16 NEW=64 MAXB=256 SECS=25 SR=2 B16=16 SCALE=1
fi
TMP=$(mktemp -d)
LOG=$OUT/wave2.log
say() { echo "[wave2 $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
lim() { echo $(( $1 * SCALE )); }  # seconds, or 0 (no limit) in tiny mode
bench() {  # name, time limit (s), bench arguments...
  local name=$1 t=$2; shift 2
  say "bench $name (limit ${t}s): $*"
  timeout "$(lim "$t")" python -m mmsink bench --device $DEV "$@" --out "$TMP" --name "$name" 2>>"$LOG" | tail -12
  say "bench $name: exit ${PIPESTATUS[0]}"
  if [ -f "$TMP/$name.json" ]; then
    cp "$TMP/$name.json" "$OUT/"
    { echo "## $name"; echo; cat "$TMP/$name.md"; echo; } >> "$OUT/wave2.md"
  fi
}
if [[ $PARTS == *a* ]]; then
  # (1) the bf16 teacher-forcing test (tiny model; first generate_fast compiles the layer step): ~1 min
  say "pytest (limit 90s)"
  timeout "$(lim 90)" python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k teacher_forcing 2>&1 \
    | tail -4 | tee -a "$LOG"
  # (2) LLaVA-1.5-7B bs 1 and 16, budget 64, the decode column now from generate_fast: ~1.5 and ~2 min
  bench llava_b1 100 --shape $S1 --batch 1 --reps $R --methods fastv,dart,visipruner,visionzip \
    --budgets 64 --decode-tokens $K1
  bench llava_b16 120 --shape $S1 --batch $B16 --reps $R --methods fastv,dart,visipruner,visionzip \
    --budgets 64 --decode-tokens $K
  # (3) LLaVA-NeXT-7B bs 1 TTFT at 320 (alternated HF prefill / graphed unpruned / method): ~2.5 min
  bench next_b1 150 --shape $SN --batch 1 --reps $RN --methods fastv,visionzip,dart,visipruner \
    --budgets 320 --decode-tokens $K --e2e-tokens $E2E
fi
if [[ $PARTS == *b* ]]; then
  # (4) serving throughput: 6 rows, each a search (no new batch tried after 25 s) then 4 calls at the largest: ~5.5 min
  say "serve-bench (limit 400s)"
  timeout "$(lim 400)" python -m mmsink serve-bench --device $DEV --shapes $S1,$SN --budgets 64,320 \
    --methods none,fastv,visionzip --new-tokens $NEW --max-batch $MAXB --seconds $SECS --resolution 4 --reps $SR \
    --out "$OUT" --name serve 2>>"$LOG" | tail -10
  say "serve-bench: exit ${PIPESTATUS[0]}"
fi
rm -rf "$TMP"
say "done; files: $(ls "$OUT" | tr '\n' ' ')"
