# The H200 run behind evals/results/prefill_llava-1.5-7b_cuda_b{1,16}.* (device tool, one H200).
export PYTHONPATH=$PWD
nvidia-smi -L; python -c "import torch,transformers;print(torch.__version__,transformers.__version__)"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_replay.py 2>&1 | tail -3
G="--methods fastv,pdrop,dart,visipruner --budgets 192,64,adaptive --decode-tokens 16"
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 5 $G --out $OUT 2>&1 | tail -14
python -m mmsink bench --shape llava-1.5-7b --batch 16 --reps 3 $G --out $OUT 2>&1 | tail -14
ls $OUT
