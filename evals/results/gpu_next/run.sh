# The H200 sessions' device calls, one part per call (each part's comment says what it checks), from the
# repository root with OUT set:
#   run(command="PART=56 bash evals/results/gpu_next/run.sh")  # the last one run: DART's GPU tests
# Parts 1-4 carried wheels (optimum-quanto for int4 KV, torchao: carry=["wheels"]); later parts need none.
# Every step runs under `timeout`: its cap, or what is left of the call's 540 s, whichever is less, so a
# slow step is cut and the call still ends inside the limit; each script rewrites its JSON + Markdown as it
# goes, so a cut step keeps what it measured. Progress lines go to $OUT/run.log; at most 8 files come back
# (sub-folders are tarred into .tgz when there would be more). TINY=1: tiny shapes on the CPU (checks the
# command lines; caps of TINY_CAP s, default 300, instead of the GPU ones).
set -u
: "${OUT:?set OUT}"
PART=${PART:?set PART=1 to 56}
TINY=${TINY:-0}
START=$(date +%s)
TOTAL=${TOTAL:-540}
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
# commands later parts repeat (their cap first): serving, unpruned vs VisionZip 320 (part 11's command, those
# two rows); VisionZip 320's chunked serving prefill of a batch of 16 under the profiler; NeXT's batch-1 TTFT
serve_vz() {
  step serve_c "$1" python -m mmsink serve-bench --device $DEV --shapes $SN --budgets 320 \
    --methods none,visionzip --new-tokens $NEW --max-batch $PBMAX --first-batch $PB --prefill-batch $PB \
    --compile auto --seconds 60 --resolution 4 --reps $SR --out "$OUT/serve_c" --name serve_compiled
  cp "$SCR/serve_c.out" "$OUT/serve_c.log"
}
prefill_trace() {
  step phases "$1" python -m evals.kv_serving_phases --device $DEV --shape $SN --kv none --method visionzip \
    --budget 320 --batch $B16 --step default --compile auto --prefill-batch $PB --reps 1 --trace \
    --out "$OUT/phases"
}
next_ttft() {
  step next_b1 "$1" python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
}
S=$(mktemp -d)
SCR=$(mktemp -d)
say "install: pip install --no-index --no-deps --target $S wheels/*.whl wheels/torchao/*.whl"
python -m pip install -q --no-index --no-deps --target "$S" wheels/*.whl wheels/torchao/*.whl 2>&1 | tail -3 \
  | tee -a "$LOG"
export PYTHONPATH=$PWD:$S
python -c "import torch, transformers, optimum.quanto, torchao; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available(), 'torchao', torchao.__version__)" 2>&1 | tail -1 \
  | tee -a "$LOG"

if [ "$TINY" = 1 ]; then
  DEV=cpu SN=tiny-next-cpu S1=tiny-cpu SQ=tiny-qwen-cpu RN=1 K=1 E2E=2 PROF="--tiny --reps 1 --steps 16" CTX=1024
  NEW=2 MAXB=2 FIRST=1 NB=2 SR=1 KVNEW=8 KVMAXB=2 KVFIRST=1 TR=1 VR=1 B16=2 PB=1 PBMAX=2 PBIG=3 TOWER=--tiny
else
  DEV=cuda SN=llava-next-7b S1=llava-1.5-7b SQ=qwen2-vl-7b RN=5 K=16 E2E=16 PROF="" CTX=8192,32768
  NEW=64 MAXB=512 FIRST=8 NB=76 SR=2 KVNEW=64 KVMAXB=512 KVFIRST=4 TR=7 VR=3 B16=16 PB=8 PBMAX=1024 PBIG=412 TOWER=
fi

case $PART in
1)
  # correctness on the GPU first: the LFPS Triton kernels (their own tests and generate_fast == generate),
  # the KV modes after the int4 read / window rotate changes, the tower launched before the forward, VAR
  # compiled; then the issue-17 goal (LFPS attention >= 3x dense at 32k: the 'lfps triton graph' row)
  # and the issue-20 NeXT TTFT targets (bench + per-stage breakdown with each plan's floor)
  step pytest 170 python -m pytest -q -p no:cacheprovider tests/test_lfps_triton.py tests/test_kv_gpu.py \
    tests/test_gpu.py tests/test_gpu_tower_first.py tests/test_orthorank_layers.py -m gpu
  step attn 80 python -m evals.kv_decode --attention-only --contexts $CTX --out "$OUT/attn"
  step next_b1 110 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart,visipruner --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
  step ttft 200 python evals/ttft_breakdown.py --device $DEV --shape $SN \
    --methods none,visionzip:320,fastv:320,dart:320,visipruner:320 --ideal --reps $TR --out "$OUT/next"
  cp "$SCR/ttft.out" "$OUT/ttft.log"
  ;;
2)
  # issue 20: VAR compiled by default (targets 1.15x at bs 1, 1.05x at bs 16; stderr says if a function
  # fell back to eager), then where a decode step's time goes (files rewritten after every stage)
  step var_b1 90 python -m mmsink bench --device $DEV --shape $S1 --batch 1 --reps $VR --methods fastv \
    --budgets 64 --var-tau 3 --out "$OUT/var" --name var_b1
  step var_b16 110 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR --methods fastv \
    --budgets 64 --var-tau 3 --out "$OUT/var" --name var_b16
  grep -h "did not compile" "$SCR/var_b1.out" "$SCR/var_b16.out" | head -3 | tee -a "$LOG"
  step profile_decode 320 python evals/profile_decode.py $PROF --out "$OUT/profile_decode"
  cp "$SCR/profile_decode.out" "$OUT/profile_decode.log"
  ;;
3)
  # the serving bench with the predicted batch search (NeXT first: the >= 6x goal; rows rewritten after
  # every row), then the largest batch per KV mode x pruning method for NeXT (issue 17; slow modes' rows
  # may report their prediction "not verified")
  step serve 280 python -m mmsink serve-bench --device $DEV --shapes $SN,$S1 --budgets 320,64 \
    --methods none,fastv,visionzip --new-tokens $NEW --max-batch $MAXB --first-batch $FIRST --seconds 60 \
    --resolution 4 --reps $SR --out "$OUT/serve" --name serve
  cp "$SCR/serve.out" "$OUT/serve.log"
  step kv_serve 260 python -m mmsink serve-bench --device $DEV --shapes $SN --budgets 320 \
    --methods none,fastv,visionzip --kv none,window2048,int4,lfps512 --new-tokens $KVNEW \
    --max-batch $KVMAXB --first-batch $KVFIRST --seconds 20 --resolution 4 --reps 1 --out "$OUT/kv_serve" \
    --name serve
  ;;
4)
  # the eighth session's changes on a GPU: generate_fast(prefill_batch=N) (CUDA graphs / compile per
  # chunk), the tower truncated to the layer read, VAR's one compiled call per layer; then NeXT TTFT,
  # serving with the prefill in chunks of 8 (first batch 8: both probes hold one chunk's transient), VAR
  # at batch 1, and the tower probe (plain / truncated / compiled layers; Qwen's tower compiled)
  step pytest 130 python -m pytest -q -p no:cacheprovider tests/test_gpu_prefill_batch.py \
    tests/test_gpu_tower_first.py tests/test_gpu.py -m gpu
  step next_b1 90 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
  step serve_pb 200 python -m mmsink serve-bench --device $DEV --shapes $SN --budgets 320 \
    --methods none,fastv,visionzip --new-tokens $NEW --max-batch $PBMAX --first-batch $PB --prefill-batch $PB \
    --seconds 50 --resolution 4 --reps $SR --out "$OUT/serve_pb" --name serve_pb
  cp "$SCR/serve_pb.out" "$OUT/serve_pb.log"
  step var_b1 58 python -m mmsink bench --device $DEV --shape $S1 --batch 1 --reps $VR --methods fastv \
    --budgets 64 --var-tau 3 --out "$OUT/var" --name var_b1
  step tower 130 python -m evals.tower_speed $TOWER --skip-after 80 --out "$OUT/tower_speed"
  ;;
5)
  # the paths that are opt-in on CUDA until these pass: VAR's hand-off (var_handoff=True) and the compiled
  # tower (tower_compile=True); one compile thread (part 4's pytest hung at exit on its compile workers)
  # (the defaults are flipped in this code: if the tests fail, the rows after them are not quoted)
  step pytest 300 env TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_var_fast.py tests/test_gpu_tower_compile.py tests/test_gpu_prefill_batch.py -m gpu
  step next_b1 110 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart,visipruner --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
  step var_b1 90 python -m mmsink bench --device $DEV --shape $S1 --batch 1 --reps $VR --methods fastv \
    --budgets 64 --var-tau 3 --e2e-tokens $E2E --out "$OUT/var" --name var_b1
  ;;
6)
  # PART 5's VAR test failed once (fastv, VAR compiled) after the tail's single compiled step reached
  # dynamo's recompile limit: the VAR test again (separate code objects now), with its whole output;
  # then selection overhead at batch 16 for every pruner (target <= 3 %), the 2025-26 ones included
  step pytest 190 env TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_var_fast.py -m gpu --tb=long -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step b16 300 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR \
    --methods fastv,visipruner,dart,pdrop,visionzip,cdpruner,divprune,scope,sparsevlm,vispruner_iccv \
    --budgets 64 --out "$OUT/b16" --name overhead_b16
  ;;
7)
  # the VAR GPU test again (PART 6's copy was cut at 190 s with nothing printed: unbuffered now, -x);
  # Qwen2-VL TTFT with its tower blocks compiled (target 2.2x); VAR at batch 16 through generate_fast
  step pytest 270 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -x \
    -p no:cacheprovider tests/test_gpu_var_fast.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step qwen_b1 120 python -m mmsink bench --device $DEV --shape $SQ --batch 1 --reps $RN \
    --methods fastv,visionzip --budgets 278 --decode-tokens 4 --e2e-tokens $E2E --out "$OUT/qwen" --name qwen_b1
  step var_b16 120 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR --methods fastv \
    --budgets 64 --var-tau 3 --e2e-tokens $E2E --out "$OUT/var" --name var_b16
  ;;
8)
  # serving with the compiled tower (now the default), NeXT in prefill chunks of 8 (target 6x)
  step serve_pb 240 python -m mmsink serve-bench --device $DEV --shapes $SN --budgets 320 \
    --methods none,fastv,visionzip --new-tokens $NEW --max-batch $PBMAX --first-batch $PB --prefill-batch $PB \
    --seconds 45 --resolution 4 --reps $SR --out "$OUT/serve_pb" --name serve_pb
  cp "$SCR/serve_pb.out" "$OUT/serve_pb.log"
  ;;
9)
  # the selection loops as CUDA graphs (core.graphs.Graphed) and the step options on CUDA, then the
  # batch-16 selection overhead of every pruner again (target <= 3 %)
  step pytest 200 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_gpu_graphed*.py tests/test_gpu_step_options.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step b16 300 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR \
    --methods fastv,visipruner,dart,pdrop,visionzip,cdpruner,divprune,scope,sparsevlm,vispruner_iccv \
    --budgets 64 --out "$OUT/b16" --name overhead_b16
  ;;
10)
  # Qwen2-VL TTFT with its tower blocks compiled (target 2.2x; part 7's 120 s cap was too short), VAR at
  # batch 16 through generate_fast
  step qwen_b1 ${QCAP:-280} python -m mmsink bench --device $DEV --shape $SQ --batch 1 --reps $RN \
    --methods fastv,visionzip --budgets 278 --decode-tokens 4 --e2e-tokens $E2E --out "$OUT/qwen" --name qwen_b1
  [ "${VARB16:-1}" = 1 ] && step var_b16 240 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR --methods fastv \
    --budgets 64 --var-tau 3 --e2e-tokens $E2E --out "$OUT/var" --name var_b16
  ;;
11)
  # serving with compile on (the compiled tower and steps; serve-bench's default is compile off)
  step serve_c 500 python -m mmsink serve-bench --device $DEV --shapes $SN --budgets 320 \
    --methods none,fastv,visionzip --new-tokens $NEW --max-batch $PBMAX --first-batch $PB --prefill-batch $PB \
    --compile auto --seconds 60 --resolution 4 --reps $SR --out "$OUT/serve_c" --name serve_compiled
  cp "$SCR/serve_c.out" "$OUT/serve_c.log"
  ;;
12)
  # VisiPruner at batch 16: its masked path up to the fallback (mask_until_fallback=null: 2 reads a
  # prefill) against the default (a read per observed layer), each with its ideal and the baseline
  step vp_gather 150 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR \
    --methods visipruner --budgets 64 --out "$OUT/vp" --name visipruner_b16_gather
  step vp_masked 150 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR \
    --methods visipruner --budgets 64 --opt visipruner.mask_until_fallback=null --out "$OUT/vp" \
    --name visipruner_b16_masked
  ;;
13)
  # PART 9's failures mended (plain-int tuples no longer keep a selection off its graph; SparseVLM's and
  # VisionZip's merges a one-hot matmul, not CUDA's atomic scatter_add_): the graphed GPU tests again and
  # the fused step as the CUDA default; then batch-16 overhead of the methods they touch, and VisiPruner's
  # masked path (PART 12's A/B) in the same bench run as its default
  step pytest 200 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_gpu_graphed*.py tests/test_gpu_step_options.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step b16 200 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR \
    --methods visipruner,sparsevlm,vispruner_iccv,visionzip --budgets 64 --out "$OUT/b16" --name overhead_b16
  step vp_masked 120 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR \
    --methods visipruner --budgets 64 --opt visipruner.mask_until_fallback=null --out "$OUT/vp" \
    --name visipruner_b16_masked
  ;;
14)
  # where the remaining batch-16 overheads go (each method against its plan replayed, by aten operator), and
  # VisionZip's scores on Qwen2-VL's 10,000-patch tower
  step prof_b16 240 python evals/profile_prefill.py --device $DEV --shape $S1 --batch $B16 \
    --methods vispruner_iccv:64,visionzip:64,cdpruner:64,visipruner:64 --ideal --out "$OUT/prof"
  cp "$SCR/prof_b16.out" "$OUT/prof_b16.log"
  step prof_qwen 200 python evals/profile_prefill.py --device $DEV --shape $SQ --batch 1 \
    --methods fastv:278,visionzip:278 --ideal --out "$OUT/prof"
  cp "$SCR/prof_qwen.out" "$OUT/prof_qwen.log"
  ;;
15)
  # Qwen's VisionZip scores through the fp32-output GEMM (part 14: 17 ms of fp32 GEMM, scale, softmax, sum),
  # its GPU tests and test_gpu.py (the merges' one-hot sums on CUDA), then Qwen2-VL's VisionZip TTFT again
  step pytest 150 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_gpu_qwen_scores.py tests/test_gpu.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step qwen_vz 220 python -m mmsink bench --device $DEV --shape $SQ --batch 1 --reps $RN \
    --methods visionzip --budgets 278 --decode-tokens 4 --e2e-tokens $E2E --out "$OUT/qwen" --name qwen_vz_b1
  ;;
16)
  # next session: the whole of test_gpu.py and the chunked-prefill GPU tests (part 15's copy was cut at
  # 150 s after 23 passed), then LLaVA-NeXT's batch-1 TTFT and decode step with the fused step as default
  step pytest 300 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_gpu.py tests/test_gpu_prefill_batch.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step next_b1 160 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart,visipruner --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1_fused
  ;;
17)
  # the decode step's attention as Triton kernels (mmsink.fast.decode_kernel, attn="kernel": also writes the
  # new key / value / validity): their GPU tests and generate's tokens through them, then the step profile
  # against the fused default
  step pytest 230 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_decode_kernel.py tests/test_gpu_step_options.py tests/test_fast_step.py \
    -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step prof_decode 260 python evals/profile_decode.py $PROF --device $DEV --configs base,fuse+kernel,kernel \
    --out "$OUT/pd"
  cp "$SCR/prof_decode.out" "$OUT/prof_decode.log"
  ;;
18)
  # the decode kernels as the fused step's default (two warps): the step-option tests (step=None), the kernel
  # tests, the bf16 teacher-forcing bound through the default; the step profile (base = the new default,
  # fuse = the fused step with SDPA); then VAR's fast-path GPU tests after its eager path took the compiled
  # region's edit (e8f719b)
  step pytest 170 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_gpu_step_options.py tests/test_decode_kernel.py \
    tests/test_gpu.py::test_bf16_generate_fast_logits_match_generate_under_teacher_forcing -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step prof_decode 110 python evals/profile_decode.py $PROF --device $DEV --configs base,fuse --out "$OUT/pd"
  cp "$SCR/prof_decode.out" "$OUT/prof_decode.log"
  step pytest_var 240 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -x \
    -p no:cacheprovider tests/test_gpu_var_fast.py -m gpu --tb=short -rf
  cp "$SCR/pytest_var.out" "$OUT/pytest_var.log"
  ;;
20)
  # VisiPruner's bookkeeping cut (Graphed reuse= / own=): the graphed GPU tests of the layer pruners and of
  # Graphed itself, then VisiPruner's batch-16 overhead (TOTAL=230: what is left of the session's budget)
  step pytest 120 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_gpu_graphed_layer_pruners.py tests/test_gpu_graphed.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step b16 170 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR \
    --methods visipruner --budgets 64 --out "$OUT/b16" --name visipruner_b16
  ;;
19)
  # the decode kernels after moving the value read up: one layer against SDPA + index writes at five 7B
  # shapes and 18 block / program / warp choices, and their GPU tests
  step dk_speed 200 python evals/decode_kernel_speed.py --out "$OUT/dk"
  cp "$SCR/dk_speed.out" "$OUT/dk_speed.log"
  step pytest 120 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider tests/test_decode_kernel.py \
    -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  ;;
21)
  # next session: the decode kernels with no combine where one chunk covers the slots (batch >= 16 at 7B
  # shapes; untested on a GPU when written): their GPU tests, one layer at the five shapes, the step
  step pytest 150 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_decode_kernel.py tests/test_gpu_step_options.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step dk_speed 120 python evals/decode_kernel_speed.py --no-tunes --out "$OUT/dk"
  step prof_decode 110 python evals/profile_decode.py $PROF --device $DEV --configs base,fuse --out "$OUT/pd"
  ;;
23)
  # (part 22 ran this part's first three steps at 601e4db: the kernel rotating q / k, the cross-layer norm)
  # the decode kernel combining in its last program per head (311990f: no second kernel), then attention
  # with log-sum-exp through cuDNN (2ad2fb6, untested on a GPU when merged): its tests and speed probe
  step pytest 160 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_decode_kernel.py tests/test_gpu_step_options.py tests/test_fast_step.py \
    tests/test_gpu.py::test_bf16_generate_fast_logits_match_generate_under_teacher_forcing -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step dk_speed 70 python evals/decode_kernel_speed.py --no-tunes --out "$OUT/dk"
  step prof_decode 90 python evals/profile_decode.py $PROF --device $DEV --configs base,fuse --out "$OUT/pd"
  step pytest_lse 90 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider -rs tests/test_gpu_lse.py \
    tests/test_gpu.py::test_attention_lse_cuda --tb=short -rf
  cp "$SCR/pytest_lse.out" "$OUT/pytest_lse.log"
  step lse_speed 120 python evals/lse_attention_speed.py --out "$OUT/lse"
  cp "$SCR/lse_speed.out" "$OUT/lse_speed.log"
  ;;
24)
  # attention with LSE through cuDNN by default (the unaligned bias padded eagerly for both kernels): its
  # tests, the graphed pruners' (VisiPruner's shallow stage), VisiPruner's batch-16 overhead (4.4 % with the
  # efficient kernel), VAR at batch 1 and VAR's fast-path tests
  step pytest 110 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_gpu_lse.py tests/test_gpu.py::test_attention_lse_cuda \
    tests/test_gpu_graphed_layer_pruners.py tests/test_gpu_graphed.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step b16 110 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR \
    --methods visipruner --budgets 64 --out "$OUT/b16" --name visipruner_b16
  step var_b1 80 python -m mmsink bench --device $DEV --shape $S1 --batch 1 --reps $VR --methods fastv \
    --budgets 64 --var-tau 3 --out "$OUT/var" --name var_b1
  step pytest_var 240 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -x \
    -p no:cacheprovider tests/test_gpu_var_fast.py -m gpu --tb=short -rf
  cp "$SCR/pytest_var.out" "$OUT/pytest_var.log"
  ;;
25)
  # VAR's fast-path GPU tests after the step changes, with the efficient LSE kernel the default again
  # (part 24's run of them, with cuDNN's, was cut after 2 of 4 passed); TOTAL=270
  step pytest_var 265 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -x \
    -p no:cacheprovider tests/test_gpu_var_fast.py -m gpu --tb=short -rf --durations=0
  cp "$SCR/pytest_var.out" "$OUT/pytest_var.log"
  ;;
26)
  # the Triton GEMV (60e4c3d, StepOptions(gemv=True), off by default; untested on a GPU when written): the
  # kernel against its reference at the 7B shapes, generate_fast's fp32 tokens through it, each projection
  # against cuBLAS with the tunes, then the step with it against today's default (base: fuse + kernel)
  step pytest 100 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider tests/test_gemv.py -m gpu \
    -k "not generate_fast" --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step pytest_gen 100 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q \
    -p no:cacheprovider tests/test_gemv.py -k generate_fast --tb=short -rf
  cp "$SCR/pytest_gen.out" "$OUT/pytest_gen.log"
  step gemv_a 110 python evals/gemv_speed.py --shapes qkv,o,down --out "$OUT/gemv"
  step gemv_b 90 python evals/gemv_speed.py --shapes gate_up,lm_head --out "$OUT/gemv_b"
  step prof_decode 110 python evals/profile_decode.py $PROF --device $DEV --configs base,fuse+kernel+gemv \
    --out "$OUT/pd"
  ;;
27)
  # cuDNN's LSE tests as changed after part 24 (the efficient kernel the default, cuDNN forced), NeXT's
  # batch-1 TTFT, then LLaVA-1.5-7B's prefill + 64 tokens with the 4.38 ms step (target <= 300 ms; last
  # measured 347-361 ms with 5.3-6 ms steps)
  step pytest_lse 80 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider -rs tests/test_gpu_lse.py \
    --tb=short -rf
  cp "$SCR/pytest_lse.out" "$OUT/pytest_lse.log"
  step next_b1 130 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart,visipruner --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
  step e2e_b1 150 python -m mmsink bench --device $DEV --shape $S1 --batch 1 --reps $RN \
    --methods fastv,pdrop,dart,visionzip,visipruner --budgets 64 --decode-tokens $K --e2e-tokens 64 \
    --out "$OUT/e2e" --name llava_b1_e2e64
  ;;
28)
  # part 26 again after its measurement: the GEMV's tunes now the fastest per shape (o / down 16x256 with 2
  # warps, the wide ones 64x128), K a compile-time constant (Triton 3.6's interpreter could not loop to a
  # runtime K: part 26's one error); its tests, then the step with it against today's default
  step pytest 150 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gemv.py --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step prof_decode 110 python evals/profile_decode.py $PROF --device $DEV --configs base,fuse+kernel+gemv \
    --out "$OUT/pd"
  ;;
29)
  # NeXT's batch-1 TTFT went 17.5 (part 5, the plain step) -> 21.1 (part 16, the fused step the default) ->
  # 23.4 ms (part 27, the decode kernel and the GEMV too) for visionzip 320: stage by stage, each method
  # also through the plain step (step={}), alternated
  step ttft 300 python evals/ttft_breakdown.py --device $DEV --shape $SN --methods \
    none,visionzip:320,fastv:320,dart:320 --plain-step --reps $RN --out "$OUT/ttft"
  cp "$SCR/ttft.out" "$OUT/ttft.log"
  ;;
30)
  # an unwrapped model's prompt through generate_fast now runs as under prune="none" (every layer in the
  # graphed tail): the GPU tests (the bare model's case added), then LLaVA-1.5-7B's prefill + 64 tokens
  # (part 27: unpruned 310.6 ms with the model's own prefill, pruned 276-287; target <= 300)
  step pytest 230 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step e2e_b1 150 python -m mmsink bench --device $DEV --shape $S1 --batch 1 --reps $RN \
    --methods fastv,visionzip --budgets 64 --decode-tokens $K --e2e-tokens 64 --out "$OUT/e2e" --name llava_b1_e2e64
  ;;
31)
  # the synced stage timings say where time goes, not when the GPU waits for the host: a profile of
  # steady-state calls (no syncs added) lists each idle gap with its stage and the host's work then
  step trace 240 python evals/ttft_breakdown.py --device $DEV --shape $SN --methods \
    none,visionzip:320,fastv:320,dart:320 --trace --out "$OUT/trace"
  cp "$SCR/trace.out" "$OUT/trace.log"
  ;;
32)
  # VisionZip's scores on Qwen2-VL's tower through the Triton kernels (mmsink.core.received; untested on a GPU
  # when written): the kernels' compiled cases, at a 1400x1400 image's size against the fp64 sums and the
  # GEMM path, the tiny bf16 Qwen2-VL's VisionZip set; then the kernels against the torch path's time
  step pytest 150 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider tests/test_gpu_qwen_scores.py \
    tests/test_received_kernel.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step received 240 python evals/received_speed.py $([ "$TINY" = 1 ] && echo --tiny) --out "$OUT/received"
  cp "$SCR/received.out" "$OUT/received.log"
  ;;
33)
  # the thirteenth session's changes tested on the CPU only: a padded batch with the ragged (varlen) kernel
  # hands off again (bf16 padded cases), the compiled prefill tail's joint q / k / v and gate / up GEMMs
  # (fp32 tokens of generate through graphs + compile), the bare model's handle without the attention
  # entry; the prefill batches' chunks through the same tail
  step pytest 420 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_gpu_step_options.py tests/test_gpu_prefill_batch.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  ;;
34)
  # after part 33 passed: NeXT's batch-1 TTFT with the tail's joint GEMMs (part 27: visionzip 4.37x, fastv
  # 4.44x, dart 4.37x; targets 6x / 5x), Qwen2-VL's with the received-attention kernels (part 10: fastv 1.85x,
  # visionzip 1.63x; target 2.2x)
  step next_b1 150 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart,visipruner --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
  step qwen_b1 150 python -m mmsink bench --device $DEV --shape $SQ --batch 1 --reps $RN \
    --methods fastv,visionzip --budgets 278 --decode-tokens 4 --e2e-tokens 16 --out "$OUT/qwen" --name qwen_b1
  ;;
35)
  # part 31's trace: after the tower, visionzip's host work is exposed (GPU idle 7.3 of 22.7 ms, most of it
  # from the language model's pre-hook to the tail's launch: 4 ms of host for 49 operators): the same calls
  # under cProfile, saved; then part 34's Qwen2-VL row (cut at 150 s there) with the received kernels' tune
  step trace 200 python evals/ttft_breakdown.py --device $DEV --shape $SN --methods \
    none,visionzip:320,fastv:320 --trace --host-profile --out "$OUT/trace"
  cp "$SCR/trace.out" "$OUT/trace.log"
  step qwen_b1 320 python -m mmsink bench --device $DEV --shape $SQ --batch 1 --reps $RN \
    --methods fastv,visionzip --budgets 278 --decode-tokens 4 --e2e-tokens 16 --out "$OUT/qwen" --name qwen_b1
  cp "$SCR/qwen_b1.out" "$OUT/qwen.log"
  ;;
36)
  # part 35's host profile acted on: the fused-weights check by a stamp (was 2.4 ms of host time per prefill
  # after the hand-off here), VisionZip's selection as one CUDA graph; the GPU tests they touch, NeXT's
  # batch-1 TTFT (part 34: fastv 4.73x, visionzip 4.21x, dart 4.26x, visipruner 2.25x), the trace again
  step pytest 150 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_graphed_visionzip.py tests/test_gpu_graphed.py tests/test_gpu_step_options.py \
    "tests/test_gpu.py::test_cuda_graphed_vision_tower_equals_generate" -m gpu \
    --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step next_b1 150 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart,visipruner --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
  step trace 120 python evals/ttft_breakdown.py --device $DEV --shape $SN --methods \
    none,visionzip:320,fastv:320,dart:320 --trace --host-profile --out "$OUT/trace"
  cp "$SCR/trace.out" "$OUT/trace.log"
  ;;
37)
  # the session's last device time (run with TOTAL=190): the graphed tower's tokens after its family is
  # passed in (49f689b: no Family made per call), and NeXT's batch-1 TTFT once more (part 36: visionzip 6.15x)
  step pytest 70 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider \
    "tests/test_gpu.py::test_cuda_graphed_vision_tower_equals_generate" -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step next_b1 120 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
  ;;
38)
  # batch-16 selection overhead after VisionZip's selection became one graph (part 13: visionzip 3.6 %,
  # visipruner 4.3 %, vispruner_iccv 8.3 %; target <= 3 %), same command as part 13's b16 step; first the
  # GPU test files the fourteenth session's review edited (shared helper, conftest's skip for the fixture)
  step pytest 150 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider tests/test_gpu_graphed_visionzip.py \
    tests/test_gpu_graphed_scope_vispruner.py tests/test_gpu_qwen_scores.py -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step b16 300 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps $VR \
    --methods visionzip,visipruner,vispruner_iccv --budgets 64 --out "$OUT/b16" --name overhead_b16
  cp "$SCR/b16.out" "$OUT/b16.log"
  ;;
39)
  # serving throughput with today's prefill and step (part 11: VisionZip 320 5.34x the unpruned tokens/s at
  # each one's largest batch; goal 6x): part 11's command, the unpruned and VisionZip rows
  serve_vz 500
  ;;
40)
  # part 39's serving fell from part 11's 591 / 3,153 tokens/s (unpruned 72 / VisionZip 416) to 339 / 662
  # (75 / 412) while batch 16 kept its time: where a call's time goes at a large batch, per step option
  # (the decode kernel and the fused step came after part 11), and whether a last chunk of fewer rows matters
  step phases 500 python -m evals.kv_serving_phases --device $DEV --shape $SN --kv none --method visionzip \
    --budget 320 --batch 16,128,124 --step default,sdpa --compile auto --prefill-batch $PB --reps 2 \
    --out "$OUT/phases"
  cp "$SCR/phases.out" "$OUT/phases.log"
  ;;
41)
  # part 40: the decode kernel's step 58.8 ms at batch 128 against SDPA's 13.5: its chunk ran past the slots
  # (plan: per-program slots from the programs aimed at, not capped at the slots; fixed). The kernel
  # against SDPA per layer (a batch-128 shape added), then part 40's phases at 128 and 412
  step dk 150 python evals/decode_kernel_speed.py --no-tunes --out "$OUT/dk"
  step phases 360 python -m evals.kv_serving_phases --device $DEV --shape $SN --kv none --method visionzip \
    --budget 320 --batch 128,$PBIG --step default,sdpa --compile auto --prefill-batch $PB --reps 2 \
    --out "$OUT/phases"
  cp "$SCR/dk.out" "$OUT/dk.log"; cp "$SCR/phases.out" "$OUT/phases.log"
  ;;
42)
  # the decode kernel's GPU tests after its plan's cap (f890b01); where VisionZip's chunked serving prefill
  # spends its GPU time (part 41: ~114 ms a chunk of 8 rows, ~500 TFLOP/s; 6x needs ~10 % off); NeXT's
  # batch-1 TTFT with more reps (visionzip 5.97-6.15x over parts 36-37)
  step pytest 90 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider tests/test_decode_kernel.py \
    -m gpu --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  prefill_trace 120
  cp "$SCR/phases.out" "$OUT/phases.log"
  step next 150 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps 9 --methods visionzip \
    --budgets 320 --decode-tokens 4 --e2e-tokens 16 --out "$OUT/next" --name next_b1
  cp "$SCR/next.out" "$OUT/next.log"
  ;;
43)
  # the compiled layer functions whole again (the prefill tail's layer and the plain step broke their graph
  # at SDPA: a symbolic enable_gqa): the CPU test under this torch first, then the GPU tests of the paths
  # they run in (graphs + compile, chunked prefill, VAR's compiled tail)
  step pytest 470 env PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -p no:cacheprovider \
    tests/test_fast_whole_graph.py tests/test_gpu.py tests/test_gpu_step_options.py \
    tests/test_gpu_prefill_batch.py tests/test_gpu_var_fast.py --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  ;;
44)
  # after part 43 passed: NeXT's batch-1 TTFT with the tail's layers as one graph each (part 37: fastv 4.76x,
  # dart 4.59x against 5x; visionzip 5.97-6.15x), then VisionZip's chunked serving prefill traced (part 42's
  # trace was the unpruned one)
  next_ttft 150
  prefill_trace 150
  cp "$SCR/phases.out" "$OUT/phases.log"
  step trace 150 python evals/ttft_breakdown.py --device $DEV --shape $SN --methods \
    none,visionzip:320,fastv:320,dart:320 --trace --out "$OUT/trace"
  cp "$SCR/trace.out" "$OUT/trace.log"
  ;;
45)
  # the decode kernel against SDPA over the batches serving runs (part 41 checked 128 and 412 after the
  # chunk's cap; parts 16-19 batch 1 and 16): NeXT unpruned (~3,000 slots) and VisionZip 320 (~450)
  step phases_none 220 python -m evals.kv_serving_phases --device $DEV --shape $SN --kv none --method none \
    --batch $PB,32 --step default,sdpa --compile auto --prefill-batch $PB --reps 2 --out "$OUT/phases_none"
  step phases_vz 220 python -m evals.kv_serving_phases --device $DEV --shape $SN --kv none --method visionzip \
    --budget 320 --batch 32,64,256 --step default,sdpa --compile auto --prefill-batch $PB --reps 2 \
    --out "$OUT/phases_vz"
  ;;
46)
  # after the head size became a constant of the compiled layers (it was hidden / a symbolic head count, so
  # every element-wise kernel indexed through runtime divisions): VisionZip's chunked serving prefill traced
  # (part 44: rotary 8.2 ms, the buffer copies 7.2 + 7.1, the SiLU gate 8.4 of 232), serving (part 39 again:
  # 5.54x), the GPU tests of the steps, NeXT's batch-1 TTFT (part 44: fastv 5.13x, visionzip 6.14x, dart 4.76x)
  prefill_trace 70
  serve_vz 170
  step pytest 110 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider tests/test_gpu_step_options.py \
    tests/test_gpu.py -k "graph_decode_equals_generate or teacher_forcing or step_options" --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  next_ttft 110
  ;;
47)
  # VisPruner's rounds from one GEMM: its GPU test, then the batch-16 overheads (part 38: visionzip 3.1 %,
  # visipruner 7.7 %, vispruner_iccv 7.0 %; target 3 %); the joint gate / up split at the modules' sizes
  # (part 46: the SiLU gate 8.5 ms of VisionZip's 210 ms serving prefill) traced again; serving's decode step
  # at each row's largest batch under the profiler (part 46: VisionZip 320 at 412 sequences ~35 ms a step
  # against a floor of ~27: ~19 of keys and values at the HBM rate, ~8 of GEMMs), then unpruned at 76
  step pytest 60 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_graphed_scope_vispruner.py tests/test_graphed_scope_vispruner.py --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  step b16 100 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps 3 \
    --methods visionzip,visipruner,vispruner_iccv --budgets 64 --out "$OUT/b16" --name overhead_b16
  prefill_trace 70
  step decode_vz 150 python -m evals.kv_serving_phases --device $DEV --shape $SN --kv none --method visionzip \
    --budget 320 --batch $PBIG --step default --compile auto --prefill-batch $PB --reps 1 --trace-decode \
    --out "$OUT/decode_vz"
  step decode_none 150 python -m evals.kv_serving_phases --device $DEV --shape $SN --kv none --method none \
    --batch $NB --step default --compile auto --prefill-batch $PB --reps 1 --trace-decode --out "$OUT/decode_none"
  ;;
48)
  # VisPruner's LLaVA-size test in fp64 (part 47: fp32 rounding on the host's CPU reordered a near-tie); the
  # decode kernel at serving's largest batches, warps / block / stages swept (part 47: VisionZip 320 at 412
  # sequences 26.4 ms of attention a step, ~3.3 TB/s, unpruned at 76 ~3.9 TB/s); what the batch-16
  # selections of visipruner / vispruner_iccv / cdpruner add over their plans replayed (part 47: 4.2 / 4.0 %)
  step pytest 60 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_graphed_scope_vispruner.py tests/test_graphed_scope_vispruner.py --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  if [ "$TINY" = 1 ]; then DKS="--tiny"; else DKS="--serving --reps 10"; fi
  step dk 150 python evals/decode_kernel_speed.py $DKS --out "$OUT/dk"
  step prof 200 python evals/profile_prefill.py --device $DEV --shape $S1 --batch $B16 \
    --methods visipruner:64,vispruner_iccv:64,cdpruner:64 --ideal --out "$OUT/prof"
  cp "$SCR/prof.out" "$OUT/prof.log"
  ;;
49)
  # the decode kernel with a running softmax per row of the block (no exchange between rows inside the loop)
  # and no loop step past the slot written: its GPU tests, then serving's batches swept (part 48: SDPA 785 /
  # 852 us a layer against the kernel's 820 / 977 at VisionZip 412 / unpruned 76) and the other shapes
  step pytest 90 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider tests/test_decode_kernel.py -k cuda \
    --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  if [ "$TINY" = 1 ]; then DKS="--tiny"; else DKS="--serving --reps 10"; fi
  step dk 300 python evals/decode_kernel_speed.py $DKS --out "$OUT/dk"
  ;;
50)
  # part 49: no loop step past the slot (the kernel 820 -> 757 us a layer at VisionZip 412, SDPA 786), the
  # per-row softmax no gain; unpruned 76 and batch 128 still behind SDPA (990 / 854, 275 / 261): with one
  # chunk per head the programs come in a few waves. Programs aimed at swept with block and warps
  if [ "$TINY" = 1 ]; then DKS="--tiny"; else DKS="--serving --reps 10"; fi
  step dk 200 python evals/decode_kernel_speed.py $DKS --out "$OUT/dk"
  ;;
51)
  # part 50: the programs aimed at mattered only at unpruned 76 (8192 with blocks of 32: 967 us a layer against
  # the default's 1003, SDPA's 877); blocks of 32 won at VisionZip 412 (716 against 760). The slots loop
  # pipelined by Triton (tl.range stages) swept with them, at serving's batches and the batch-1 / 16 shapes
  step pytest 60 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider tests/test_decode_kernel.py -k \
    "cuda or hopper" --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  if [ "$TINY" = 1 ]; then DKS="--tiny"; else DKS="--serving --reps 10"; fi
  step dk 200 python evals/decode_kernel_speed.py $DKS --out "$OUT/dk"
  ;;
52)
  # the GPU tests of the decode kernel's defaults after parts 49-51 (steps of 32 on short buffers; SDPA on
  # long, wide MHA ones: through_sdpa) and of VisPruner's round kernel (mmsink/core/pair_max.py), serving
  # again (part 39d: 647 / 3,523 tokens/s, 5.44x; the unpruned row now attends through SDPA), the batch-16
  # overheads of the methods over 3 % in part 47 (visipruner 4.2 %, vispruner_iccv 4.0 %), with more reps
  step pytest 120 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider tests/test_decode_kernel.py \
    tests/test_pair_max.py tests/test_gpu_graphed_scope_vispruner.py tests/test_gpu_step_options.py -k \
    "(cuda or hopper or gpu or step) and not interpreted" --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  serve_vz 170
  step b16 150 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps 5 \
    --methods visipruner,vispruner_iccv --budgets 64 --out "$OUT/b16" --name overhead_b16
  ;;
53)
  # DART's whole decision as one graph (0966b7e: its hook's eager ops 59 -> 29; the keys' rotation not undone
  # where generate_fast's positions start at 0): its GPU tests, NeXT's batch-1 TTFT (part 46: dart 4.74x
  # against 5x, fastv 5.00x, visionzip 6.63x), the trace of both layer-K pruners, the batch-16 overheads
  step pytest 100 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_graphed_layer_pruners.py tests/test_gpu_prefill_batch.py tests/test_gpu_tower_first.py \
    -k dart --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  next_ttft 120
  step trace 110 python evals/ttft_breakdown.py --device $DEV --shape $SN --methods fastv:320,dart:320 \
    --trace --out "$OUT/trace"
  cp "$SCR/trace.out" "$OUT/trace.log"
  step b16 100 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps 5 \
    --methods fastv,dart --budgets 64 --out "$OUT/b16" --name overhead_b16
  ;;
54)
  # the issue's closing tables: the batch-16 selection overhead of every pruner (part 7: reps of 3; since then
  # 52-53 for some, reps of 5), NeXT's batch-1 TTFT with VisiPruner's row too (part 53: fastv 20.0 ms, dart
  # 20.9, visionzip 15.0), Qwen2-VL's (part 35: fastv 1.79x, visionzip 1.76x)
  step b16 260 python -m mmsink bench --device $DEV --shape $S1 --batch $B16 --reps 5 \
    --methods fastv,visipruner,dart,pdrop,visionzip,cdpruner,divprune,scope,sparsevlm,vispruner_iccv \
    --budgets 64 --out "$OUT/b16" --name overhead_b16
  step next_b1 150 python -m mmsink bench --device $DEV --shape $SN --batch 1 --reps $RN \
    --methods fastv,visionzip,dart,visipruner --budgets 320 --decode-tokens $K --e2e-tokens $E2E \
    --out "$OUT/next" --name next_b1
  step qwen_b1 140 python -m mmsink bench --device $DEV --shape $SQ --batch 1 --reps $RN \
    --methods fastv,visionzip --budgets 278 --decode-tokens 4 --e2e-tokens $E2E --out "$OUT/qwen" --name qwen_b1
  ;;
55)
  # Qwen2-VL's batch-1 TTFT alone (part 54 cut it at 140 s: its baseline row takes ~92 s; part 35: fastv
  # 1.79x, visionzip 1.76x)
  step qwen_b1 330 python -m mmsink bench --device $DEV --shape $SQ --batch 1 --reps $RN \
    --methods fastv,visionzip --budgets 278 --decode-tokens 4 --e2e-tokens $E2E --out "$OUT/qwen" --name qwen_b1
  ;;
56)
  # DART's set-order constants made inside its graph (no module cache): its GPU tests again
  step pytest 150 env PYTHONUNBUFFERED=1 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_graphed_layer_pruners.py tests/test_gpu_prefill_batch.py tests/test_gpu_tower_first.py \
    -k dart --tb=short -rf
  cp "$SCR/pytest.out" "$OUT/pytest.log"
  ;;
*) say "PART must be 1-56, not $PART"; exit 2 ;;
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
