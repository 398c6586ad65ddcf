# H200 run 6 for issue 7 (device tool, one H200): batch 1 again after removing device syncs from the
# prefill path (host-side image sizes, sort-based top-k, fixed-shape scatter back to full length, one
# sync per observed VisiPruner layer); LLaVA-1.5-7B grid and LLaVA-NeXT-7B at 320 tokens.
export PYTHONPATH=$PWD
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -1
G="--methods fastv,pdrop,dart,visipruner --budgets 192,64,adaptive --decode-tokens 16"
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 7 $G --out $OUT --name b1_after_syncs 2>&1 | tail -11
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 7 --methods fastv,dart,visionzip --budgets 320 --out $OUT --name next_b1_after_syncs 2>&1 | tail -5
