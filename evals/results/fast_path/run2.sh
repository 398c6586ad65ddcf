# H200 run 2 for issue 7: batch-1 prefill profile + generate_fast breakdown, LLaVA-NeXT-7B and Qwen2-VL-7B.
export PYTHONPATH=$PWD
python evals/profile_prefill.py --shape llava-1.5-7b --methods none,fastv:64,pdrop:64,dart:64 --out $OUT 2>&1 | grep -v Warn
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 5 --methods fastv,dart,visionzip --budgets 320 --out $OUT 2>&1 | tail -7
python -m mmsink bench --shape qwen2-vl-7b --batch 1 --reps 5 --methods fastv,dart,visionzip --budgets 833,278 --out $OUT 2>&1 | tail -9
