# H200 run 3 for issue 7: generate_fast with kept decoders and a compiled layer step; NeXT prefill profile.
export PYTHONPATH=$PWD
python -c "import triton; print('triton', triton.__version__)"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4
python evals/profile_prefill.py --shape llava-1.5-7b --methods none,fastv:64,dart:64 --decode --out $OUT 2>&1 | grep -v "Warn\|warn"
python evals/profile_prefill.py --shape llava-next-7b --methods fastv:320,dart:320,visionzip:320 --out $OUT 2>&1 | grep -v "Warn\|warn"
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 5 --methods fastv,pdrop --budgets 64 --e2e-tokens 64 --out $OUT --name e2e_llava-1.5-7b_b1 2>&1 | tail -12
