# Host operators and syncs per stage of generate_fast's LLaVA-NeXT prefill (issue 20), on the CPU. Each
# run from a clean tree (git archive, with mmsink/patches and mmsink/evals linked to the top-level
# folders as the wheel installs them; PYTHONPATH=. ), so that other uncommitted work does not count:
#   before: commit 314becc with this commit's evals/ttft_breakdown.py
#   after:  commit 314becc with this commit's evals/ttft_breakdown.py, patches/llava_next.py,
#           mmsink/fast/vision_graph.py and mmsink/fast/generate.py (this commit's code)
R=evals/results/fast_path/next_host_ops
python evals/ttft_breakdown.py --count --out $R --tag _before  # in the before tree
python evals/ttft_breakdown.py --count --out $R --before $R/host_ops_tiny-next-cpu_before.json  # after tree
