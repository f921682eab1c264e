"""torchrun awareness: one process per rank, DDP over gloo (CPU) or NCCL (GPU)."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # robuq created the process group, so robuq destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# A training collective that waits longer than this fails, so that a dead or hung rank stops the others within
# half an hour. Work that is uneven by nature (rank 0's AMPN sensitivities, the last sample or latent shards) is
# never waited for in a collective: the others poll for its files, for up to LONG_WAIT_HOURS.
DEFAULT_TIMEOUT_HOURS = 0.5
LONG_WAIT_HOURS = 6.0
TIMEOUT_HELP = (
    "how long a process waits for the others at a collective before failing (hours; torchrun only); uneven "
    "work (sensitivities, sample shards) is waited for by polling its files instead, for up to 6 hours"
)


def init_distributed(device: torch.device, timeout_hours: float = DEFAULT_TIMEOUT_HOURS) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for a single process.

    A group the caller already created is used as it is (and left to the caller to destroy)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    owns = not dist.is_initialized()
    if owns:
        timeout = datetime.timedelta(hours=timeout_hours)
        if device.type == "cuda":  # binds NCCL's communicator to this rank's GPU
            dist.init_process_group(backend="nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        owns_group=owns,
    )


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_rank(info: DistInfo, flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce), so that all ranks stop together."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def wait_for_files(paths: Iterable[Path], timeout_hours: float = LONG_WAIT_HOURS, poll_seconds: float = 2.0) -> None:
    """Wait until every path exists (the files other ranks write as they finish uneven shares of work):
    polling, unlike a barrier, does not fail after the collective timeout of a process group."""
    waiting = [Path(p) for p in paths]
    deadline = time.monotonic() + timeout_hours * 3600
    while waiting := [p for p in waiting if not p.is_file()]:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {timeout_hours} h for {len(waiting)} files the other ranks write, first "
                f"{waiting[0]}; a rank may have died (see its log), then run the same command again"
            )
        time.sleep(poll_seconds)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
