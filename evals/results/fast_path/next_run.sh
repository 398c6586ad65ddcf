# The next H200 run for issue 7 (written 2026-11-29, not yet run: this work's device time is spent).
# Verifies what landed after run 12 -- VAR's one-call grouped attention and its generate_fast decode step,
# second-sight tail capture, one capture helper, NeXT pool; fewer device reads per prefill (layout, plan
# changes, VisiPruner's shallow groups and decisions, DART / VisionZip from host sizes, varlen packing);
# Qwen's vision tower fed host-computed bounds -- then measures VAR at batch 1 and 16 against run 11's
# 4.4x, VisiPruner's batch-16 overhead against run 12's 6.0 %, and Qwen2-VL's TTFT against run 12.
export PYTHONPATH=$PWD
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_grouped.py 2>&1 | tail -3
python evals/count_reads.py --device cuda --shape tiny-cpu 2>&1 | grep reads
python evals/count_reads.py --device cuda --shape tiny-next-cpu --methods fastv:320,visionzip:320 2>&1 | grep reads
python -m mmsink bench --shape llava-1.5-7b --batch 16 --reps 3 --methods fastv,dart,visipruner --budgets 64 --decode-tokens 4 --var-tau 3 --out $OUT --name llava_b16_next 2>&1 | tail -6
python -m mmsink bench --shape llava-1.5-7b --batch 1 --reps 7 --methods fastv,visionzip --budgets 64 --decode-tokens 4 --e2e-tokens 64 --var-tau 3 --out $OUT --name llava_b1_next 2>&1 | tail -16
python -m mmsink bench --shape llava-next-7b --batch 1 --reps 7 --methods fastv,dart,visionzip,pool --budgets 320 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name next_b1_next 2>&1 | tail -8
python -m mmsink bench --shape qwen2-vl-7b --batch 1 --reps 5 --methods fastv,visionzip --budgets 278 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name qwen_b1_next 2>&1 | tail -6
