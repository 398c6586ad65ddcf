# H200 run 9 for issue 7: the vision tower as CUDA graphs in generate_fast, batched VisionZip merge,
# VisiPruner's shallow-stage index reuse. GPU tests; where the method's extra device time goes (profile
# against its replayed plan); NeXT and LLaVA-1.5 batch-1 TTFT, alternated HF prefill / graphed / method.
export PYTHONPATH=$PWD
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
python evals/profile_prefill.py --shape llava-1.5-7b --batch 16 --methods visipruner:64 --ideal --out $OUT 2>&1 | grep -v USDT | tail -24
python evals/profile_prefill.py --shape llava-next-7b --batch 1 --methods visionzip:320,fastv:320 --ideal --out $OUT 2>&1 | grep -v USDT | tail -40
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 5 --methods fastv,dart,visionzip --budgets 320 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name next_b1_vgraph 2>&1 | tail -7
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 5 --methods fastv,pdrop,visionzip,visipruner --budgets 64 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name llava_b1_vgraph 2>&1 | tail -8
