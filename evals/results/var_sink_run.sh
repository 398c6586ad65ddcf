# The H200 run behind evals/results/var_sink_sweep (device tool, one H200): VAR and ViT-sink forwarding
# on/off, alone and with fastv / visipruner, on the reference model (sink dims from `mmsink calibrate`).
export PYTHONPATH=$PWD
C="python -m mmsink sweep --model models/synthllava --bench synthvqa --methods none,fastv,visipruner --budgets 0.333,0.111 --batch-size 128 --no-progress --device cuda"
V='{"sink_dims": [53, 200]}'
$C --var "$V" --out runs/var 2>&1 | tail -9; cp runs/var/sweep.json $OUT/var.json; cp runs/var/sweep.md $OUT/var.md
$C --sink-forward --out runs/sink 2>&1 | tail -9; cp runs/sink/sweep.json $OUT/sink.json; cp runs/sink/sweep.md $OUT/sink.md
$C --var "$V" --sink-forward --out runs/vs 2>&1 | tail -9; cp runs/vs/sweep.json $OUT/var_sink.json; cp runs/vs/sweep.md $OUT/var_sink.md
