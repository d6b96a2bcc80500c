"""Data-parallel training: the one loop (`tasks/engine.py:train`) in N processes with torch.distributed.

`launch(fn, *args, devices=N)` starts N processes (spawned, so CUDA is safe),
joins them into one process group (gloo on CPU, NCCL on CUDA, rendezvous on a
loopback port), runs `fn(*args)` in each, and returns rank 0's result. Inside,
`current()` tells the loop it is one of N: it wraps the model in
DistributedDataParallel, gives each rank its share of every global batch (the
global batch size stays `batch_size`, so N processes take the same optimiser
steps as one process), sums the epoch's counters across ranks, and lets only
rank 0 write checkpoints.

Equivalence with one process: the same seed gives every rank the same initial
weights and the same shuffled order; each step averages the gradients of the
ranks' equal shares of the same global batch, which is the gradient of that
batch (up to float summation order, and up to how a label-budget mask splits
labelled rows across shares). tests/test_distributed.py checks the final
weights of a 2-process CPU run against a 1-process run.
"""

from __future__ import annotations

import copy
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distilflow.errors import DistilflowError


@dataclass
class Group:
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and returns the result."""
        return self.rank == 0

    def local_batch(self, global_batch: int) -> int:
        """Rows per step on this rank: an equal share of the global batch."""
        if global_batch % self.world_size:
            raise DistilflowError(
                f"batch_size {global_batch} does not split evenly over {self.world_size} devices "
                "(train.devices); use a multiple of it"
            )
        return global_batch // self.world_size

    def shard(self, order: torch.Tensor, global_batch: int) -> torch.Tensor:
        """This rank's share of each global batch of `order`, concatenated (drops a last batch too small to share)."""
        local = self.local_batch(global_batch)
        parts = []
        for start in range(0, len(order), global_batch):
            batch = order[start : start + global_batch]
            if len(batch) < global_batch:  # every rank must take the same number of steps
                share = len(batch) // self.world_size
                if share == 0:
                    break
                parts.append(batch[self.rank * share : (self.rank + 1) * share])
            else:
                parts.append(batch[self.rank * local : (self.rank + 1) * local])
        return torch.cat(parts) if parts else order[:0]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model wrapped in DistributedDataParallel (gradients averaged across ranks)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradients as views of DDP's buckets: no copy per step (and no stride-mismatch warnings for conv grads)
        return DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=False, gradient_as_bucket_view=True
        )

    def reduce_epoch(self, seen: int, correct: int, n_labelled: int, sums: dict[str, float]):
        """The epoch's counters summed over every rank (so every rank logs the same history)."""
        import torch.distributed as dist

        keys = sorted(sums)
        t = torch.tensor([seen, correct, n_labelled] + [sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        values = t.tolist()
        return int(values[0]), int(values[1]), int(values[2]), dict(zip(keys, values[3:]))


_GROUP: Group | None = None


def current() -> Group | None:
    """The data-parallel group this process belongs to, or None in an ordinary single-process run."""
    return _GROUP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, use_cuda: bool, out: str, fn: Callable, args: tuple) -> None:
    global _GROUP
    import torch.distributed as dist

    # torch.multiprocessing hands CPU tensors to the children in shared memory: without a private copy, every
    # rank's optimiser would update the same weights (N steps per step)
    args = copy.deepcopy(args)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # the rendezvous by URL, not MASTER_ADDR/MASTER_PORT: nothing here reads or writes the environment
    backend, url = "nccl" if use_cuda else "gloo", f"tcp://127.0.0.1:{port}"
    dist.init_process_group(backend, init_method=url, rank=rank, world_size=world_size)
    _GROUP = Group(rank, world_size, device)
    try:
        result = fn(*args)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()
        _GROUP = None


def launch(fn: Callable, *args, devices: int, device: str = "auto") -> Any:
    """Run `fn(*args)` in `devices` processes as one data-parallel group; return rank 0's result.

    `fn` and `args` must be picklable (a module-level function; tensors, arrays, modules).
    """
    import torch.multiprocessing as mp

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and torch.cuda.device_count() < devices:
        raise DistilflowError(
            f"train.devices={devices}, but only {torch.cuda.device_count()} CUDA device(s) are present"
        )
    with tempfile.TemporaryDirectory(prefix="distilflow-ddp-") as tmp:
        out = str(Path(tmp) / "result.pt")
        mp.start_processes(
            _worker,
            args=(devices, _free_port(), use_cuda, out, fn, args),
            nprocs=devices,
            join=True,
            start_method="spawn",
        )
        return torch.load(out, map_location="cpu", weights_only=False)  # our own rank 0's result, just written
