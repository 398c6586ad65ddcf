# Host operators, syncs and host Python time per stage of generate_fast's LLaVA-NeXT prefill (issue 20),
# on the CPU. Each column from its own tree so that other uncommitted work does not count:
#   before: a clean tree of 517546e (git archive; mmsink/patches and mmsink/evals linked to the top-level
#           folders as the wheel installs them; PYTHONPATH=.) with this commit's evals/ttft_breakdown.py
#   after:  this commit's working tree
R=evals/results/fast_path/next_host_ops
python evals/ttft_breakdown.py --count --out $R --tag _before  # in the before tree (writes into $R)
python evals/ttft_breakdown.py --count --out $R --before $R/host_ops_tiny-next-cpu_before.json
# (earlier column, bec819d: the same commands at 314becc; its tables were replaced by these)
# GPU (one device call): OUT=$OUT bash $R/gpu_run.sh
