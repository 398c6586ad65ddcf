# H200 run 11 for issue 7: the prefill tail as compiled layer_prefill steps inside its CUDA graph
# (compile=True, the default with Triton). GPU tests; NeXT TTFT stages; NeXT and LLaVA-1.5 batch-1 benches
# (alternated TTFT: HF prefill / graphed unpruned / method; prefill + 64 tokens; the VAR row).
export PYTHONPATH=$PWD
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_grouped.py 2>&1 | tail -2
python evals/ttft_breakdown.py --shape llava-next-7b --methods none,fastv:320,visionzip:320 --out $OUT 2>&1 | tail -24
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 7 --methods fastv,dart,visionzip --budgets 320 --decode-tokens 4 --e2e-tokens 64 --out $OUT --name next_b1_run11 2>&1 | tail -16
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 7 --methods fastv,pdrop,dart,visionzip,visipruner --budgets 64 --decode-tokens 4 --e2e-tokens 64 --var-tau 3 --out $OUT --name llava_b1_run11 2>&1 | tail -20
