"""A shuffled, distributed, endlessly repeating loader that resumes at the exact sample."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler):
    """Per-epoch permutation from (seed, epoch); rank r takes every world-th index; starts at `position`.

    Each rank sees len(dataset) // world samples per epoch (the tail that does not divide is dropped that epoch,
    and a different tail next epoch since the permutation changes).
    """

    def __init__(self, length: int, rank: int, world: int, seed: int, shuffle: bool = True):
        if length < world:
            raise ValueError(f"dataset of {length} examples is smaller than the world size {world}")
        self.length, self.rank, self.world, self.seed, self.shuffle = length, rank, world, seed, shuffle
        self.epoch, self.position = 0, 0

    def per_rank(self) -> int:
        return self.length // self.world

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        else:
            order = torch.arange(self.length)
        return order[: self.per_rank() * self.world][self.rank :: self.world].tolist()

    def __iter__(self):
        return iter(self.indices(self.epoch)[self.position :])

    def __len__(self) -> int:
        return self.per_rank() - self.position


class ResumableLoader:
    """Yields micro-batches {"x": (B, ...), "y": (B,)} forever; state_dict() is the exact position."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world: int, seed: int,
                 num_workers: int = 0, pin_memory: bool = False):
        self.sampler = ResumableSampler(len(dataset), rank, world, seed)
        if self.sampler.per_rank() < batch_size:
            raise ValueError(f"each rank gets {self.sampler.per_rank()} examples per epoch, fewer than the "
                             f"micro-batch {batch_size}; use a smaller train.micro_batch or more data")
        self.batch_size = batch_size
        # persistent workers: no worker start-up at each epoch; the sampler still runs in this process, so
        # a new epoch (or a resumed position) takes effect when the next iterator is made
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                                 # its own generator: each new iterator draws a worker seed, and drawing it
                                 # from the global RNG would shift the training noise after a mid-epoch resume
                                 generator=torch.Generator().manual_seed(seed * 1000 + rank))
        self.epoch, self.position = 0, 0  # samples of this epoch already handed to the training loop

    def close(self) -> None:
        """Stop the persistent worker processes now rather than at interpreter shutdown."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        while True:
            self.sampler.epoch, self.sampler.position = self.epoch, self.position
            for batch in self.loader:
                self.position += self.batch_size  # counted when handed over, not when prefetched
                yield batch
            self.epoch, self.position = self.epoch + 1, 0
