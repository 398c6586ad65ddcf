# Issue 8 on nvidia-h200-x2 (2026-11-29, second session): the multi-GPU and GPU tests, then data-parallel
# eval scaling with a compute-bound checkpoint (reference model's tokenizer / processor / vision tower, a
# LLaVA-1.5-7B-shaped language model, random bf16 weights: evals/scaling_model.py), 1 against 2 processes,
# answers compared byte for byte. Last, issue 7's NeXT TTFT stage breakdown on GPU 0.
export PYTHONPATH=$PWD; nvidia-smi -L; python -c "import torch,transformers;print(torch.__version__,transformers.__version__)"
python -m pytest -q -p no:cacheprovider tests/test_multigpu.py tests/test_gpu.py 2>&1 | tail -15 | tee $OUT/gpu_tests_run2.log
python evals/scaling_model.py --out /tmp/big 2>&1 | tail -1
E="python -m mmsink eval --model /tmp/big --bench synthvqa --scenes 200 --batch-size 16 --dtype bfloat16 --no-progress --device cuda"
$E --limit 16 --out /tmp/warm.jsonl > /dev/null 2>&1
for n in 1 2; do TIMEFORMAT="processes $n: %R s wall (load + answer)"; { time $E --num-processes $n --out /tmp/big$n.jsonl > /tmp/big$n.log 2>&1; } 2>> $OUT/scaling_7b.log; grep -E "answering|answered" /tmp/big$n.log >> $OUT/scaling_7b.log; done
cmp /tmp/big1.jsonl /tmp/big2.jsonl && echo "answers identical" >> $OUT/scaling_7b.log; cat $OUT/scaling_7b.log
python evals/ttft_breakdown.py --shape llava-next-7b --methods none,fastv:320,visionzip:320 --out $OUT 2>&1 | tail -30
