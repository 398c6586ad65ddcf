# Issue 16: every registered method at 33 / 22 / 11 % on both reference models, then VAR and ViT-sink
# forwarding alone and with each pruner at 33 / 11 % on synthllava-sinks. CPU, fp32, 2 torch threads, the
# first 600 synthvqa test questions (seed 0). Answers go to runs/ (git-ignored); score files and tables
# are copied next to this file and to ../var_sink_sweep_sinks. Run from the repository root.
set -e
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 PYTHONUNBUFFERED=1
M=none,random,pool,fastv,pdrop,dart,visipruner,visionzip,divprune,cdpruner,scope,vispruner_iccv,sparsevlm,orthorank,replay
C=".venv/bin/mmsink sweep --bench synthvqa --limit 600 --batch-size 64 --device cpu --dtype float32 --no-progress"
step=${1:-all}
copy() {  # copy() RUNDIR DEST PREFIX: tables and score files, not the answers
    mkdir -p "$2"
    for f in sweep.json sweep.md sweep.png; do [ -f "$1/$f" ] && cp "$1/$f" "$2/$3$f"; done
    mkdir -p "$2/$3scores" && cp "$1"/*.score.json "$2/$3scores/"
}
if [ "$step" = all ] || [ "$step" = sinks ]; then
    $C --model models/synthllava-sinks --methods $M --budgets 0.333,0.222,0.111 --adaptive visipruner --full \
        --out runs/sweep_sinks
    copy runs/sweep_sinks evals/results/synthvqa_sweep_sinks synthllava-sinks_
fi
if [ "$step" = all ] || [ "$step" = first ]; then
    $C --model models/synthllava --methods $M --budgets 0.333,0.222,0.111 --adaptive visipruner --full \
        --out runs/sweep_first
    copy runs/sweep_first evals/results/synthvqa_sweep_sinks synthllava_
fi
# sink dims (model at 435d2b1) from, with D=~/.cache/mmsink/synthvqa-0-700 (the test split the sweeps read):
# mmsink calibrate --model models/synthllava-sinks --data $D/test_questions.jsonl --images $D/images
#     --limit 16 --device cpu --out evals/results/var_sink_sweep_sinks/calib_synthllava-sinks.json
V='{"sink_dims": [449, 184]}'
if [ "$step" = all ] || [ "$step" = var ]; then
    $C --model models/synthllava-sinks --methods $M --budgets 0.333,0.111 --var "$V" --out runs/var_sinks
    copy runs/var_sinks evals/results/var_sink_sweep_sinks var_
fi
if [ "$step" = all ] || [ "$step" = sink ]; then
    $C --model models/synthllava-sinks --methods $M --budgets 0.333,0.111 --sink-forward --out runs/sink_sinks
    copy runs/sink_sinks evals/results/var_sink_sweep_sinks sink_
fi
