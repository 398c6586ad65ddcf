# Issue 8 follow-up on nvidia-h200-x2: run 2's 1- and 2-process answers of the 7B-shaped random model
# differed. Is that the split, or run-to-run / device-to-device numerics of a bf16 model whose random
# logits tie often? Two 1-process runs on GPU 0, one on GPU 1, one 2-process run; count differing answers.
export PYTHONPATH=$PWD
python evals/scaling_model.py --out /tmp/big 2>&1 | tail -1
E="python -m mmsink eval --model /tmp/big --bench synthvqa --scenes 200 --batch-size 16 --dtype bfloat16 --no-progress --device cuda"
$E --out /tmp/a.jsonl 2>&1 | grep answering
$E --out /tmp/b.jsonl 2>&1 | grep answering
CUDA_VISIBLE_DEVICES=1 $E --out /tmp/c.jsonl 2>&1 | grep answering
$E --num-processes 2 --out /tmp/d.jsonl 2>&1 | grep answering
for x in b c d; do echo "a vs $x:"; python evals/compare_answers.py /tmp/a.jsonl /tmp/$x.jsonl; done 2>&1 | tee $OUT/determinism.log
