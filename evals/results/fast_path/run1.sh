# H200 runs for issue 7 (device tool, one H200). Part 1: GPU tests, where batch-1 prefill time goes,
# prefill + 64 tokens with generate vs generate_fast on LLaVA-1.5-7B.
export PYTHONPATH=$PWD
nvidia-smi -L; python -c "import torch,transformers;print(torch.__version__,transformers.__version__)"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4
python evals/profile_prefill.py --shape llava-1.5-7b --methods none,fastv:64,pdrop:64,dart:64 --out $OUT 2>&1 | grep -v Warn
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 5 --methods fastv,pdrop --budgets 64 --e2e-tokens 64 --out $OUT --name e2e_llava-1.5-7b_b1 2>&1 | tail -12
