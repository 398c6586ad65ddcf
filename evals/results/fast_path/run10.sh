# H200 run 10 for issue 7: VisiPruner's shallow stage without the image group's partial attention (the
# flash kernel's LSE gives its mass), VisiPruner handing off once decided, host work trimmed from
# generate_fast (cached placement, FLOPs bookkeeping, NeXT token map on the host). GPU tests; b16 profile
# against the replayed plan; NeXT TTFT stages; batch-1 TTFT benches.
export PYTHONPATH=$PWD
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_grouped.py 2>&1 | tail -3
python evals/profile_prefill.py --shape llava-1.5-7b --batch 16 --methods visipruner:64 --ideal --out $OUT 2>&1 | grep -v USDT | grep -A16 "^visipruner"
python evals/ttft_breakdown.py --shape llava-next-7b --methods none,fastv:320,visionzip:320 --out $OUT 2>&1 | tail -24
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 7 --methods fastv,dart,visionzip --budgets 320 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name next_b1_run10 2>&1 | tail -7
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 5 --methods fastv,pdrop,visionzip,visipruner --budgets 64 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name llava_b1_run10 2>&1 | tail -8
