# H200 run 12 for issue 7 (same machine, right after run 11): batch 16 on LLaVA-1.5-7B after VisiPruner's
# shallow-stage change and the batched VisionZip merge; Qwen2-VL-7B batch-1 TTFT.
export PYTHONPATH=$PWD
python -m mmsink bench --shape llava-1.5-7b --batch 16 --reps 3 --methods fastv,dart,visionzip,visipruner --budgets 64 --decode-tokens 4 --out $OUT --name llava_b16_run12 2>&1 | tail -7
python -m mmsink bench --shape qwen2-vl-7b --batch 1 --reps 5 --methods fastv,visionzip --budgets 278 --decode-tokens 4 --e2e-tokens 16 --out $OUT --name qwen_b1_run12 2>&1 | tail -6
