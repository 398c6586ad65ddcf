# H200 run 5 for issue 7 (device tool, one H200): LLaVA-NeXT-7B (2928 visual tokens) and Qwen2-VL-7B
# (2500) at batch 1; where the batch-1 NeXT prefill spends its time (host against kernels).
export PYTHONPATH=$PWD
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 7 --methods fastv,dart,visionzip --budgets 320 --e2e-tokens 64 --out $OUT 2>&1 | tail -16
python -m mmsink bench --shape qwen2-vl-7b --batch 1 --reps 5 --methods fastv,dart,visionzip --budgets 833,278 --out $OUT 2>&1 | tail -9
python evals/profile_prefill.py --shape llava-next-7b --methods fastv:320,dart:320,visionzip:320 --out $OUT 2>&1 | grep "wall"
