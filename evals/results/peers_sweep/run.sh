# Every method on the reference model at 33 / 22 / 11 % of its 256 visual tokens (issue 15): one H200,
# fp32, the first 200 synthvqa test scenes (600 questions). Writes sweep.json / sweep.md / sweep.png and the
# runs' score files (scores.tgz) to $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L; python -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
M=none,random,pool,fastv,pdrop,dart,visipruner,visionzip,divprune,cdpruner,scope,vispruner_iccv,sparsevlm
s=$(date +%s)
python -m mmsink sweep --model models/synthllava --bench synthvqa --scenes 200 --methods $M \
    --budgets 0.333,0.222,0.111 --adaptive visipruner --full --batch-size 64 --no-progress --device cuda \
    --out runs/sweep 2>&1 | grep -v Loading | tail -60
echo "sweep $(( $(date +%s) - s )) s"
cp runs/sweep/sweep.json runs/sweep/sweep.md runs/sweep/sweep.png $OUT/
cd runs/sweep && tar czf $OUT/scores.tgz *.score.json
