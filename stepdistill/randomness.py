"""Randomness that depends only on (seed, iteration, call) and a sample's global index.

Every draw generates the GLOBAL batch from a generator seeded by the iteration and takes this process's slice. So
2 processes with batch B draw exactly what 1 process with batch 2B draws, a resumed run draws what an uninterrupted
one would, and a checkpoint needs no RNG state.
"""

from __future__ import annotations

import hashlib

import torch


class StepRandom:
    def __init__(self, seed: int, iteration: int, rank: int = 0, world_size: int = 1, device="cpu"):
        self.seed, self.iteration, self.rank, self.world_size = seed, iteration, rank, world_size
        self.device = torch.device(device)
        self._calls = 0

    def _generator(self) -> torch.Generator:
        self._calls += 1
        key = f"{self.seed}/{self.iteration}/{self._calls}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    def _slice(self, full: torch.Tensor, local_batch: int) -> torch.Tensor:
        start = self.rank * local_batch
        return full[start:start + local_batch].to(self.device)

    def randn(self, local_batch: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
        g = self._generator()
        return self._slice(torch.randn(local_batch * self.world_size, *shape, generator=g, dtype=dtype), local_batch)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[0], *x.shape[1:], dtype=x.dtype).to(x.device)

    def rand(self, local_batch: int, *shape: int) -> torch.Tensor:
        g = self._generator()
        return self._slice(torch.rand(local_batch * self.world_size, *shape, generator=g), local_batch)

    def randint(self, low: int, high: int, local_batch: int) -> torch.Tensor:
        """Integers in [low, high), one per sample."""
        g = self._generator()
        return self._slice(torch.randint(low, high, (local_batch * self.world_size,), generator=g), local_batch)

    def shared_randint(self, low: int, high: int) -> int:
        """One integer in [low, high), identical on every process (e.g. a simulated depth)."""
        g = self._generator()
        return int(torch.randint(low, high, (1,), generator=g))

    def stream(self, name: str) -> "StepRandom":
        """An independent stream of the same iteration, named (the loop gives each phase its own; a method may
        name more, e.g. the "sample" stream DMD2's two phases share)."""
        return StepRandom(f"{self.seed}/{name}", self.iteration, self.rank, self.world_size, self.device)
