# Next GPU session: issues 17 and 20 on one H200, THREE device calls of <= 560 s each, from the repository
# root with OUT set (the wheels carried: optimum-quanto for int4 KV, torchao for the GPU tests):
#   run(command="PART=1 bash evals/results/gpu_next/run.sh", carry=["wheels"])  # GPU tests, profile, VAR
#   run(command="PART=2 bash evals/results/gpu_next/run.sh", carry=["wheels"])  # attention-only, serve --kv
#   run(command="PART=3 bash evals/results/gpu_next/run.sh", carry=["wheels"])  # serving bench, NeXT TTFT
# Every step runs under `timeout`: its cap, or what is left of the call's 540 s, whichever is less, so a
# slow step is cut and the call still ends inside the limit. Progress lines go to $OUT/run.log; at most 8
# files come back (sub-folders are tarred into .tgz when there would be more). TINY=1: tiny shapes on the
# CPU (checks the command lines; caps of TINY_CAP s, default 300, instead of the GPU ones).
set -u
: "${OUT:?set OUT}"
PART=${PART:?set PART=1, 2 or 3}
TINY=${TINY:-0}
START=$(date +%s)
TOTAL=540
LOG=$OUT/run.log
say() { echo "[gpu_next part$PART $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
lim() {  # seconds for a step: its cap, cut to what is left of the call
  if [ "$TINY" = 1 ]; then echo "${TINY_CAP:-300}"; return; fi
  local left=$(( TOTAL - ($(date +%s) - START) ))
  [ "$left" -lt 5 ] && left=5
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
step() {  # name, cap (s), command...: runs under timeout, the output's tail into the log
  local name=$1 cap=$2; shift 2
  local t; t=$(lim "$cap")
  say "$name (limit ${t}s): $*"
  timeout -k 5 "$t" "$@" > "$SCR/$name.out" 2>&1
  local rc=$?
  tail -25 "$SCR/$name.out" >> "$LOG"
  say "$name: exit $rc$( { [ $rc = 124 ] || [ $rc = 137 ]; } && echo ' (cut by timeout)')"
}
S=$(mktemp -d)
SCR=$(mktemp -d)
say "install: pip install --no-index --no-deps --target $S wheels/*.whl wheels/torchao/*.whl"
python -m pip install -q --no-index --no-deps --target "$S" wheels/*.whl wheels/torchao/*.whl 2>&1 | tail -3 \
  | tee -a "$LOG"
export PYTHONPATH=$PWD:$S
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
python -c "import optimum.quanto, torchao; print('optimum-quanto', optimum.quanto.__file__, 'torchao',
torchao.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

if [ "$TINY" = 1 ]; then
  DEV=cpu S1=tiny-cpu SN=tiny-next-cpu R=1 RN=1 B16=2 K=1 E2E=2
  PROF="--tiny" CTX=1024 KVSHAPE=tiny-next-cpu SNEW=8 SMAXB=2 SFIRST=1 NEW=2 MAXB=2 SECS=20 SR=1
else
  DEV=cuda S1=llava-1.5-7b SN=llava-next-7b R=3 RN=5 B16=16 K=16 E2E=16
  PROF="" CTX=8192,32768 KVSHAPE=llava-next-7b SNEW=64 SMAXB=256 SFIRST=8 NEW=64 MAXB=256 SECS=25 SR=2
fi

case $PART in
1)
  # issue 20 + 17: the GPU tests (skipped on a CPU), then where a decode step's time goes (writes its JSON
  # only at the end: ~5 min expected), then the VAR rows of var_ops/README.md
  step pytest 110 python -m pytest -q -p no:cacheprovider tests/test_kv_gpu.py tests/test_gpu.py \
    tests/test_orthorank_layers.py -m gpu
  step profile_decode 300 python evals/profile_decode.py $PROF --out "$OUT/profile_decode"
  cp "$SCR/profile_decode.out" "$OUT/profile_decode.log"
  step var_b1 60 python -m mmsink bench --device $DEV --shape $S1 --batch 1 --reps $R --methods fastv \
    --budgets 64 --var-tau 3 --out "$OUT/var" --name var_b1
  step var_b16 90 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $R --methods fastv \
    --budgets 64 --var-tau 3 --out "$OUT/var" --name var_b16
  ;;
2)
  # issue 17: attention alone at 8k / 32k (the >= 3x goal), then the largest batch per KV mode x pruning
  # method for LLaVA-NeXT-7B (rewritten after every row: a cut run keeps its rows)
  step attn 170 python -m evals.kv_decode --attention-only --contexts $CTX --out "$OUT/attn"
  step kv_serve 560 python -m mmsink serve-bench --device $DEV --shapes $KVSHAPE --budgets 320 \
    --methods none,fastv,visionzip --kv none,window2048,int4,lfps512 --new-tokens $SNEW --max-batch $SMAXB \
    --first-batch $SFIRST --seconds 20 --resolution 4 --reps 1 --out "$OUT/kv_serve" --name serve
  ;;
3)
  # issue 20: the serving bench (fast_path/wave2_run.sh PARTS=b), then LLaVA-NeXT bs 1 TTFT (next_b1)
  step serve 390 python -m mmsink serve-bench --device $DEV --shapes $S1,$SN --budgets 64,320 \
    --methods none,fastv,visionzip --new-tokens $NEW --max-batch $MAXB --seconds $SECS --resolution 4 \
    --reps $SR --out "$OUT/serve" --name serve
  step next_b1 150 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart,visipruner --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
  ;;
*) say "PART must be 1, 2 or 3, not $PART"; exit 2 ;;
esac

# at most 8 files back: tar the sub-folders (most files first) until the count fits
count() { find "$OUT" -type f | wc -l; }
for d in $(cd "$OUT" && for x in */; do [ -d "$x" ] && echo "$(find "$x" -type f | wc -l) ${x%/}"; done \
    | sort -rn | awk '{print $2}'); do
  [ "$(count)" -le 8 ] && break
  tar -czf "$OUT/$d.tgz" -C "$OUT" "$d" && rm -rf "${OUT:?}/$d"
  say "tarred $d/ into $d.tgz"
done
rm -rf "$S" "$SCR"
say "done after $(( $(date +%s) - START ))s; files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
