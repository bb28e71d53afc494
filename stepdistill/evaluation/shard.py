"""This process's share of a sharded evaluation (``torchrun --nproc_per_node N eval/evaluate.py`` or ``accelerate
launch eval/evaluate.py``): which batches it generates and scores, on which device, and the few collectives that
bring the shares together on the main process.

With one process (``WORLD_SIZE`` unset or 1) nothing distributed is started and every call is a no-op. With several,
Accelerate's ``PartialState`` starts the process group (gloo on CPU, NCCL on GPUs) and the Python objects (counts,
per-batch features) travel over a gloo group, so the same code serves both.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a launch, or the only process: the one that prints and writes the shared files."""
    return int(os.environ.get("RANK", "0")) == 0


class Shard:
    def __init__(self):
        self.num_processes, self.index, self.local_index = 1, 0, 0
        self._group = None
        if world_size() > 1:
            import torch.distributed as dist
            from accelerate import PartialState

            # Accelerate picks MULTI_CPU (gloo) for a torchrun launch only when told to use the CPU
            state = PartialState(cpu=not torch.cuda.is_available())
            self.num_processes, self.index = state.num_processes, state.process_index
            self.local_index = state.local_process_index
            # object collectives need a CPU backend; NCCL's default group has none
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, name: str) -> str:
        """A bare ``cuda`` becomes this process's own GPU (its local rank); anything else is taken as given."""
        return f"cuda:{self.local_index}" if name == "cuda" and self.num_processes > 1 else name

    def split(self, items: Sequence[T]) -> list[T]:
        """This process's items: every ``num_processes``-th, starting at its rank (balanced, in order)."""
        return list(items[self.index::self.num_processes])

    def barrier(self) -> None:
        if self._group is not None:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj``, in rank order, on the main process; ``None`` on the others."""
        if self._group is None:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.num_processes if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        if self._group is None:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]
