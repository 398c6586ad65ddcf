# H200 run 8 for issue 7 (device tool, one H200): generate_fast's prefill hands off where the plan is
# final and runs the remaining layers as one CUDA graph. GPU tests (graph tail + decode == generate),
# then batch-1 TTFT and prefill + 16 tokens on LLaVA-1.5-7B and LLaVA-NeXT-7B.
export PYTHONPATH=$PWD
python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "cuda_graph or varlen" 2>&1 | tail -1
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 5 --methods fastv,pdrop,visionzip --budgets 64 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name tail_llava_b1 2>&1 | tail -6
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 5 --methods fastv,visionzip --budgets 320 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name tail_next_b1 2>&1 | tail -5
