# Issue 17's decode benchmark on one H200, one device call, from the repository root with OUT set:
#   run(command="bash evals/results/kv_decode/run.sh", carry=["wheels"])
# `wheels/` (ignored, 165 KB) holds optimum_quanto-0.2.7-py3-none-any.whl (pure Python), fetched with
#   pip download --no-deps optimum-quanto==0.2.7 -d wheels
# The GPU machine has no network and no optimum-quanto (int2 / int4 KVSink storage needs it). It is
# installed --no-deps into a scratch folder: its requirements torch, numpy, safetensors and
# huggingface_hub are there already; ninja only builds quanto's C++ kernels, which mmsink never calls
# (mmsink/kv/store.py unpacks the codes itself). Two runs, 8k then 32k context, each under `timeout`
# (expected ~1-2 min each; cut at 200 s); each rewrites its JSON + table after every row, so a cut run
# keeps its rows. --profile: each mode's decode steps also under torch.profiler (CUDA op table by GPU time
# and by bytes allocated). Outputs in $OUT (7 files, under the device's 8): kv_decode.log, kv_8k/ and
# kv_32k/ (kv_decode.json, kv_decode.md, profiles.txt).
# KV_TINY=1: 64-wide model on the CPU, short contexts, no time limits (checks the command lines).
set -u
SITE=$(mktemp -d)
LOG=$OUT/kv_decode.log
say() { echo "[kv_decode $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
say "install: pip install --no-index --no-deps --target $SITE wheels/*.whl"
python -m pip install -q --no-index --no-deps --target "$SITE" wheels/*.whl 2>&1 | tail -3 | tee -a "$LOG" \
  || python -m zipfile -e wheels/optimum_quanto-*.whl "$SITE"
export PYTHONPATH=$PWD:$SITE
python -c "import optimum.quanto as q; print('optimum-quanto from', q.__file__)" 2>&1 | tee -a "$LOG"
python -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())" 2>&1 | tee -a "$LOG"
if [ "${KV_TINY:-0}" = 1 ]; then
  ARGS="--tiny --steps 4 --profile --no-compile" C8=256 C32=512 LIM=0
else
  ARGS="--profile --no-compile" C8=8192 C32=32768 LIM=200
fi
for pair in "8k $C8" "32k $C32"; do
  set -- $pair
  say "kv_decode --contexts $2 (limit ${LIM}s)"
  timeout $LIM python -m evals.kv_decode $ARGS --contexts "$2" --out "$OUT/kv_$1" 2>&1 | tail -20 | tee -a "$LOG"
  say "kv_decode $1: exit ${PIPESTATUS[0]}"
done
rm -rf "$SITE"
say "done; files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
