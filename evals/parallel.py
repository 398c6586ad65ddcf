"""Data-parallel ``mmsink eval`` / ``mmsink sweep``: every process answers its own share of the questions.

    accelerate launch --num_processes 2 -m mmsink eval --model PATH --bench synthvqa --out a.jsonl
    torchrun --nproc-per-node 2 -m mmsink eval --model PATH --bench synthvqa --out a.jsonl
    mmsink eval --num-processes 2 --model PATH --bench synthvqa --out a.jsonl   # spawns the processes
    mmsink sweep --num-processes 2 --model PATH --bench synthvqa --out DIR      # same for sweeps

On a host with several GPUs accelerate picks its multi-GPU launcher by itself; on CPU add ``--multi_gpu``
(accelerate's name for that launcher; without it accelerate starts one process). accelerate is not needed
by mmsink: the launchers only set the environment that torch.distributed reads.

A run launched with WORLD_SIZE / RANK / LOCAL_RANK in the environment (torchrun, accelerate launch) or
with ``--num-processes N`` joins one process group: NCCL with one GPU per process (``cuda:LOCAL_RANK``),
else gloo (CPU). The questions still to answer are cut into batches of ``--batch-size`` and the batches
dealt out in turn (batch k to rank k mod N), so a fresh run forms exactly the batches of a single
process and gives the same answers file. Rank r appends to ``<out>.part<r>.jsonl``; when every rank is
done, rank 0 adds the parts' answers to ``--out`` in question order, then deletes the parts, scores and
prints the summary. A killed run keeps its parts: re-running the command (with any number of processes)
skips every question answered in ``--out`` or in any part.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import pickle
import socket
import sys
from pathlib import Path

# ----------------------------------------------------------------------------- process group


def launched() -> bool:
    """True in a process started by torchrun / accelerate launch / --num-processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    return rank() == 0


def start(device=None) -> str:
    """Join the process group when launched in parallel; return this process's device."""
    import torch

    if not launched():
        return device or ("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    own_gpu = device in (None, "cuda") and 0 < gpus and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= gpus
    if own_gpu:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)  # NCCL's object collectives use the current device
    elif device in (None, "cuda"):
        device = f"cuda:{local % gpus}" if gpus else "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if own_gpu else "gloo")
        atexit.register(_stop)
    return device


def _stop():
    """Leave the group together: a gloo peer that exits while another still tears down aborts it."""
    from datetime import timedelta

    dist = _dist()
    if not dist:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=60))  # a rank that died does not hang us
        else:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if size() > 1:
        _dist().barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block before the others (e.g. generating a cached data set once)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def _portable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def from_main(fn):
    """``fn()`` on rank 0; every rank returns its value or raises its exception (so none waits forever)."""
    if size() == 1:
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = (True, fn())
        except Exception as e:
            box[0] = (False, _portable(e))
    _dist().broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def together(fn) -> list:
    """``fn()`` on every rank; the list of every rank's value, or the first rank's exception raised on all."""
    if size() == 1:
        return [fn()]
    try:
        mine = (True, fn())
    except Exception as e:
        mine = (False, _portable(e))
    every = [None] * size()
    _dist().all_gather_object(every, mine)
    for ok, value in every:
        if not ok:
            raise value
    return [value for _, value in every]


# ----------------------------------------------------------------------------- shards and part files


def shard(items: list, batch_size: int, rank: int = 0, ranks: int = 1) -> list:
    """This rank's batches: batch k of ``items`` goes to rank k mod ranks (balanced to one batch)."""
    mine = []
    for k, start in enumerate(range(0, len(items), batch_size)):
        if k % ranks == rank:
            mine += items[start : start + batch_size]
    return mine


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}.jsonl")


def parts(out: Path) -> list[Path]:
    """Part files of ``out`` left by any earlier parallel run (any number of processes)."""
    found = glob.glob(glob.escape(str(out)) + ".part*.jsonl")
    return sorted((Path(p) for p in found), key=lambda p: p.name)


def merge(out: Path, order: list[str]) -> None:
    """Add the parts' answers not yet in ``out`` after its records, in question order; then delete the
    parts. ``out`` is replaced in one step, so a kill before the deletion only repeats the merge."""
    from .vqa import read_answers

    found = parts(out)
    if not found:
        return
    done = read_answers(out)
    seen = {str(r["question_id"]) for r in done}
    new = []
    for p in found:
        for r in read_answers(p):
            if str(r["question_id"]) not in seen:
                seen.add(str(r["question_id"]))
                new.append(r)
    place = {qid: i for i, qid in enumerate(order)}
    new.sort(key=lambda r: place.get(str(r["question_id"]), len(place)))  # stable: unknown ids keep order
    tmp = out.with_name(out.name + ".merge.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in done + new), encoding="utf-8")
    tmp.replace(out)
    for p in found:
        p.unlink()


# ----------------------------------------------------------------------------- --num-processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(module: str, argv, n: int) -> int:
    """Run ``module.main(argv)`` in ``n`` local processes (one process group); their exit code."""
    import torch
    import torch.multiprocessing as mp

    argv = list(sys.argv[1:] if argv is None else argv)
    threads = max(1, torch.get_num_threads() // n)  # the processes share this machine's cores
    try:
        mp.spawn(_worker, args=(module, argv, n, free_port(), threads), nprocs=n, join=True)
    except mp.ProcessExitedException as e:
        return e.exit_code or 1
    except mp.ProcessRaisedException as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def _worker(rank: int, module: str, argv: list, n: int, port: int, threads: int) -> None:
    import importlib

    import torch

    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": n, "LOCAL_WORLD_SIZE": n}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    _stop()
    # leave without interpreter shutdown: its teardown of native threads aborted now and then under pytest
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
