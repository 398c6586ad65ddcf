export PYTHONPATH=$PWD; nvidia-smi -L; python -c "import torch,transformers;print(torch.__version__,transformers.__version__)"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_multigpu.py 2>&1 | tail -25 | tee $OUT/gpu_tests.log
E="python -m mmsink eval --model models/synthllava --bench synthvqa --batch-size 16 --no-progress --device cuda"
$E --limit 32 --out runs/warm.jsonl > /dev/null 2>&1
for n in 1 2; do TIMEFORMAT="processes $n: %R s"; { time $E --num-processes $n --out runs/dp$n.jsonl > runs/dp$n.log 2>&1; } 2>> $OUT/scaling.log; grep accuracy runs/dp$n.log; done; cat $OUT/scaling.log
cmp runs/dp1.jsonl runs/dp2.jsonl && echo "answers identical" | tee -a $OUT/scaling.log
s=$(date +%s); python -m mmsink sweep --model models/synthllava --bench synthvqa --methods none,random,pool,fastv,pdrop,dart,visipruner,visionzip --budgets 0.333,0.222,0.111 --adaptive visipruner --full --batch-size 64 --num-processes 2 --no-progress --device cuda --out runs/sweep 2>&1 | grep -v Loading | tail -40; echo "sweep $(( $(date +%s) - s )) s"
cd runs && tar czf $OUT/sweep.tgz sweep && ls -la $OUT
