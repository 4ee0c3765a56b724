"""One machine or many: the torchrun environment, the process group, and gathering results.

Launch any distributed tok command with ``torchrun --nproc_per_node=N -m tokcli ...`` (or ``torchrun ... $(which
tok) ...``). WORLD_SIZE > 1 turns it on: gloo on CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``); rank 0 writes
the outputs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from tokcli.errors import TokError


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def process_group(device) -> Iterator[tuple[int, int, Any]]:
    """Yield (rank, world, device) with the default process group up when WORLD_SIZE > 1 (created here and torn
    down on exit unless the caller already made one). On CUDA each rank gets ``cuda:LOCAL_RANK``."""
    import torch
    import torch.distributed as dist

    rank, world, local = dist_env()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    own = world > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank, world, device
    except BaseException:
        if own:
            dist.destroy_process_group()
        raise
    if own:
        # no rank tears its connections down while a peer's last collective may still be reading from them (a
        # gloo peer closing early can abort the other process at exit); on failure the ranks have already met in
        # all_ok, so only the normal exit waits here
        dist.barrier()
        dist.destroy_process_group()


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank; ``[obj]`` when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ok(failure: BaseException | None, world: int) -> None:
    """Collective: every rank learns whether any rank failed. The failing rank re-raises its own error; the others
    raise a one-line TokError naming it (with its exit code), so no rank waits forever for another."""
    if world == 1:
        if failure is not None:
            raise failure
        return
    mine = None if failure is None else (getattr(failure, "exit_code", 1), _one_line(failure))
    parts = gather_objects(mine)
    if failure is not None:
        raise failure
    for r, part in enumerate(parts):
        if part is not None:
            e = TokError(f"rank {r} failed: {part[1]}")
            e.exit_code = part[0]
            raise e


def in_turn(fn, rank: int, world: int):
    """``fn()`` on rank 0, then, once it succeeded there, on the other ranks (checks that make and remove folders
    must not race); a failure on any rank raises on every rank. Returns this rank's ``fn()``."""
    out, failure = None, None
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - re-raised by all_ok on this rank
                failure = e
        if world > 1 or failure is not None:
            all_ok(failure, world)
    return out


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return msg if isinstance(e, TokError) else f"{type(e).__name__}: {msg}"
