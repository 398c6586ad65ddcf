# H200 run 4 for issue 7 (device tool, one H200): the LLaVA-1.5-7B grid at batch 1 (with prefill + 64
# tokens, generate vs generate_fast) and batch 16; prefill, ideal and baseline timed alternately.
export PYTHONPATH=$PWD
nvidia-smi -L; python -c "import torch,transformers;print(torch.__version__,transformers.__version__)"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -2
G="--methods fastv,pdrop,dart,visipruner --budgets 192,64,adaptive --decode-tokens 16"
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 7 $G --e2e-tokens 64 --out $OUT 2>&1 | tail -24
python -m mmsink bench --shape llava-1.5-7b --batch 16 --reps 3 $G --out $OUT 2>&1 | tail -13
