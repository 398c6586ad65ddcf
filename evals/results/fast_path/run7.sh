# H200 run 7 for issue 7 (device tool, one H200): the ragged kernel for padded segments. GPU tests (incl.
# varlen against masked SDPA in bf16), then LLaVA-1.5-7B batch 16 with left-padded prompts (sample i
# padded by 2 i tokens), varlen off and on; ratios against the unwrapped model (masked SDPA) in each run.
export PYTHONPATH=$PWD
python -c "import inspect, torch.nn.attention.varlen as v; print(inspect.signature(v.varlen_attn))"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
G="--batch 16 --reps 3 --ragged --methods none,fastv,visipruner --budgets 64,adaptive --decode-tokens 4"
python -m mmsink bench --shape llava-1.5-7b $G --varlen off --out $OUT --name ragged_b16_varlen_off 2>&1 | tail -6
python -m mmsink bench --shape llava-1.5-7b $G --out $OUT --name ragged_b16_varlen_on 2>&1 | tail -6
