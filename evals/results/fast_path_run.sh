# Next H200 run for issue 7 (written 2026-11-29, not yet run): CUDA-graph decode correctness, then
# prefill + 64 tokens with generate vs generate_fast, and LLaVA-NeXT-7B keeping 320 of 2928 tokens.
export PYTHONPATH=$PWD
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 5 --methods fastv,pdrop --budgets 64,adaptive --e2e-tokens 64 --out $OUT --name e2e_llava-1.5-7b_b1 2>&1 | tail -12
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 5 --methods fastv,dart,visionzip --budgets 320 --out $OUT 2>&1 | tail -8
python -m mmsink bench --shape qwen2-vl-7b --batch 1 --reps 5 --methods fastv,dart,visionzip --budgets 833,278 --e2e-tokens 64 --out $OUT 2>&1 | tail -16
