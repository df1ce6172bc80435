"""Multi-process training on torch.distributed, started by a standard launcher (torchrun, srun + torchrun,
`accelerate launch --multi_gpu`): they set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR.

One process (no launcher) is the same code with a world of one: every helper here is then a no-op.
The data-parallel engine itself is torch's DistributedDataParallel (see stages/loop.py); this file
only starts the process group and splits a global batch into this rank's rows.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..data import Batch


def init_from_environment() -> None:
    """Join the process group a launcher described in the environment (gloo on CPU, nccl on GPUs)."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def training_device() -> torch.device:
    """This process's device: its own GPU under a launcher on a GPU node, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Elementwise sum of ``values`` over all processes (float64, so every rank gets identical numbers)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.to(training_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def shard_rows(batch: Batch) -> Batch:
    """This rank's rows of a global batch (contiguous, as even as possible)."""
    world = world_size()
    if world == 1:
        return batch
    rows = batch.input_ids.shape[0]
    if rows < world:
        raise ValueError(
            f"a global batch of {rows} row(s) cannot be split over {world} processes: raise batch_tokens to at "
            f"least {world} x seq_len, or run fewer processes"
        )
    index = torch.tensor_split(torch.arange(rows), world)[rank()]
    return Batch(batch.input_ids[index], batch.attention_mask[index], batch.labels[index])


def shard_model(model: torch.nn.Module, layers) -> None:
    """FSDP (torch's fully_shard): every decoder layer, then the rest, sharded over the processes, so each
    holds 1/world of the frozen base weights; parameters become DTensors, gathered layer by layer in use."""
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every process must call it); others as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor
