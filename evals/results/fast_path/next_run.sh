# The next H200 run for issue 7 (written 2026-11-29, not yet run): TTFT of every method through
# generate_fast against the unpruned model through the same graphed prefill ("graphed unpruned"
# column), LLaVA-1.5-7B, LLaVA-NeXT-7B and Qwen2-VL-7B at batch 1; GPU tests first.
export PYTHONPATH=$PWD
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -1
E="--batch 1 --reps 7 --decode-tokens 4 --e2e-tokens 64"
python -m mmsink bench --shape llava-1.5-7b $E --methods fastv,pdrop,dart,visionzip --budgets 64 --var-tau 3 --out $OUT 2>&1 | tail -8
python -m mmsink bench --shape llava-next-7b $E --methods fastv,dart,visionzip --budgets 320 --out $OUT 2>&1 | tail -6
python -m mmsink bench --shape qwen2-vl-7b $E --methods fastv,visionzip --budgets 278 --out $OUT 2>&1 | tail -5
