# The next H200 run for issue 7 (written 2026-11-29, not yet run): verify what landed after run 12
# (VAR's one-call grouped attention and its generate_fast decode step, second-sight tail capture, one
# capture helper, NeXT pool), then measure VAR at batch 1 and 16 against run 11's 4.4x.
export PYTHONPATH=$PWD
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_grouped.py 2>&1 | tail -3
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 7 --methods fastv,visionzip --budgets 64 --decode-tokens 4 --e2e-tokens 64 --var-tau 3 --out $OUT --name llava_b1_next 2>&1 | tail -16
python -m mmsink bench --shape llava-1.5-7b --batch 16 --reps 3 --methods fastv,visipruner --budgets 64 --decode-tokens 4 --var-tau 3 --out $OUT --name llava_b16_next 2>&1 | tail -6
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 7 --methods fastv,dart,visionzip,pool --budgets 320 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name next_b1_next 2>&1 | tail -8
