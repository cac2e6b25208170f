"""Distributed stage one on PyTorch's own runtime: torchrun's environment and ``torch.distributed``.

``torchrun`` starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in each. :func:`start_distributed` reads them, joins the
process group (gloo on the CPU, nccl on CUDA with device ``cuda:LOCAL_RANK``) and returns a
:class:`DistributedContext`. Without those variables it returns a single-process context whose
barriers do nothing, so stage one runs the same code in both cases.

Stage one needs no collective on features: each rank writes whole shards, and shard ``k`` belongs
to rank ``k % world_size``. The process group only carries barriers and a check that every rank
computed the same cache key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from pipeline.settings import SettingsError

logger = logging.getLogger(__name__)

# Variables that torchrun sets in every process it starts (torch.distributed.run, PyTorch 2.x).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Barriers wait for the slowest rank, so this timeout must exceed the difference in extraction time
# between ranks. Six hours is an estimate that covers an uneven resume of a large store. A crashed
# rank does not make the others wait this long, because torchrun stops the other ranks when one
# fails (seen with torch 2.14 on one node).
TIMEOUT_VARIABLE = "FEATCACHE_DISTRIBUTED_TIMEOUT_S"
DEFAULT_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class DistributedContext:
    """The rank of this process, the number of ranks, and the device this rank extracts on."""

    rank: int = 0
    world_size: int = 1
    # Rank within this node, which picks the GPU cuda:LOCAL_RANK.
    local_rank: int = 0
    # Device setting for this rank: the user's setting in one process, "cpu" or "cuda:LOCAL_RANK" under torchrun.
    device: str = "auto"
    # "gloo" or "nccl" when a process group is joined, and None in a single process.
    backend: str | None = None
    # True when start_distributed created the process group, so close() must destroy it.
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns_shard(self, shard: int) -> bool:
        return shard % self.world_size == self.rank

    def owned_shards(self, shard_count: int) -> list[int]:
        return list(range(self.rank, shard_count, self.world_size))

    def barrier(self) -> None:
        """Wait until every rank reaches this call, or return at once in a single process."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        # NOTE: the nccl branch has not run on a GPU yet. Only the gloo branch is tested.
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0 first and on the other ranks after it.

        Steps that write shared files on first use (rendering the embedded digits, caching downloaded
        weights) then run once, and the other ranks find their output in place.
        """
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def check_same(self, value: str, description: str) -> None:
        """Raise when ``value`` differs between ranks, naming the ranks and their values."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        values: list[str | None] = [None] * self.world_size
        dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            listing = ", ".join(f"rank {rank}: {item}" for rank, item in enumerate(values))
            raise RuntimeError(
                f"The ranks computed different {description} ({listing}). Every rank must see the same dataset files "
                "and settings: on several nodes, put the dataset and the output folder on a shared file system "
                "at the same path."
            )

    def close(self) -> None:
        if not self.owns_group:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def read_torchrun_environment() -> dict[str, str] | None:
    """Return torchrun's variables of this process, or None when it was not started by torchrun."""
    present = {name: os.environ[name] for name in TORCHRUN_VARIABLES if name in os.environ}
    if "RANK" not in present and "WORLD_SIZE" not in present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in present]
    if missing:
        raise SettingsError(
            f"The environment sets {sorted(present)} but not {missing}: start distributed extraction with "
            "torchrun, which sets all of them, or unset RANK and WORLD_SIZE to run in one process."
        )
    return present


def read_timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise SettingsError(f"{TIMEOUT_VARIABLE}={text!r} is invalid: use a positive number of seconds.")
    return timedelta(seconds=seconds)


def select_backend(device: str, local_rank: int) -> tuple[str, str]:
    """Return (backend, device of this rank) for a device setting: gloo on the CPU, nccl on CUDA."""
    import torch

    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        if device not in ("cpu", "auto"):
            raise SettingsError(f"device={device!r} is invalid under torchrun: use cpu, cuda or auto.")
        return "gloo", "cpu"

    if not torch.cuda.is_available():
        raise SettingsError(f"device={device!r} was requested, but no CUDA GPU is available: use --device cpu.")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise SettingsError(
            f"LOCAL_RANK={local_rank} has no GPU: this node has {count}. Start at most {count} processes per node "
            f"(torchrun --nproc-per-node {count})."
        )
    if device not in ("cuda", "auto", f"cuda:{local_rank}"):
        logger.warning("Ignoring the GPU index of device=%r: under torchrun each rank uses cuda:LOCAL_RANK.", device)
    return "nccl", f"cuda:{local_rank}"


def start_distributed(device: str) -> DistributedContext:
    """Join torchrun's process group when this process was started by torchrun.

    Return a single-process context otherwise. A process group that the caller already
    initialized is reused and left open by :meth:`DistributedContext.close`.
    """
    environment = read_torchrun_environment()
    if environment is None:
        return DistributedContext(device=device)

    import torch
    import torch.distributed as dist

    rank = int(environment["RANK"])
    world_size = int(environment["WORLD_SIZE"])
    local_rank = int(environment["LOCAL_RANK"])
    backend, rank_device = select_backend(device, local_rank)

    # join the group through env://, which reads the MASTER_ADDR and MASTER_PORT that torchrun's rendezvous set
    owns_group = not dist.is_initialized()
    if owns_group:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=read_timeout())
    else:
        backend = dist.get_backend()

    logger.info(
        "Rank %d of %d (local rank %d) joined the %s process group at %s:%s and extracts on %s",
        rank, world_size, local_rank, backend, environment["MASTER_ADDR"], environment["MASTER_PORT"], rank_device,
    )
    return DistributedContext(rank, world_size, local_rank, rank_device, backend, owns_group)


def is_main_process() -> bool:
    """Return True unless torchrun started this process with a rank other than 0."""
    return int(os.environ.get("RANK", "0")) == 0
