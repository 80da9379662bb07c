"""Which images each process sees at each step: a seeded permutation per epoch, cut in global batches.

Step ``s`` of epoch ``e`` takes images ``perm_e[s·B : (s+1)·B]`` (B = global batch); process ``r``
of ``W`` takes the ``r``-th contiguous slice of B/W of them. Gathering keys in rank order
therefore rebuilds exactly the 1-process batch, and resuming at step ``s`` is starting the
sampler there (no batches are loaded to be skipped, unlike ``accelerate.skip_first_batches``
over a random sampler). The last incomplete batch is dropped (``drop_last``).

Every random number of an augmentation comes from Python's, NumPy's and torch's global generators,
re-seeded from (seed, epoch, index) before each image (:func:`seeded`): the augmented image does not
depend on which worker or process loads it, nor on how many batches ran before, so a resumed run
sees exactly the images of an uninterrupted one and a W-process run those of a 1-process run.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from selfsup.errors import UsageError
from selfsup.imagefolder import first_readable
from selfsup.workers import leave_signals_to_the_main_process, shutdown_iterator


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one image in one epoch (independent streams through SeedSequence)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def seed_all(value: int) -> None:
    """Python's, NumPy's and torch's CPU generator (not CUDA's: augmentations run on the CPU, and
    :func:`seeded` restores only what it seeds)."""
    random.seed(value)
    np.random.seed(value)
    torch.default_generator.manual_seed(value)


@contextlib.contextmanager
def seeded(value: int) -> Iterator[None]:
    """Python's, NumPy's and torch's generators seeded with ``value`` inside the block.

    In a DataLoader worker the generators are ours to re-seed; in the main process they are
    restored afterwards, so loading an image leaves the training loop's random streams untouched.
    """
    if get_worker_info() is not None:
        seed_all(value)
        yield
        return
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        seed_all(value)
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler yielding this process's (index, augmentation seed) pairs for each step."""

    def __init__(
        self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        return self.steps_per_epoch() - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch).tolist()
        for step in range(self.start_step, self.steps_per_epoch()):
            start = step * self.global_batch + self.rank * self.local_batch
            indices = perm[start : start + self.local_batch]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in indices]


class SeededImages(Dataset):
    """``dataset[(index, seed)]`` -> (augmented image, label), the augmentation a pure function of
    the seed (:mod:`selfsup.sampling`): exact resume and W processes = 1 process.

    An unreadable sample (``None``: the file is logged by its dataset) is replaced by the next
    readable one of ``dataset`` itself, so the batch keeps its size and the replacement comes from the
    very images the sampler draws from (never a held-out or an unlabelled one)."""

    def __init__(self, dataset: Any, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        image, label = first_readable(self.dataset.__getitem__, index, len(self.dataset), "the training set")
        with seeded(seed):
            return self.transform(image), label


class EndlessBatches:
    """Batches from a DataLoader over a stream, restarting it when it runs dry; ``take(n)`` yields n."""

    def __init__(self, loader):
        self.loader = loader
        self.iterator = None

    def take(self, n: int) -> Iterator:
        for _ in range(n):
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                yield next(self.iterator)
            except StopIteration:
                self.iterator = iter(self.loader)
                try:
                    yield next(self.iterator)
                except StopIteration:
                    raise UsageError(
                        "the shard stream yields no complete batch on this process: it got fewer images "
                        "than batch_size/processes (or fewer shards than processes x workers); "
                        "use more shards, fewer num_workers or a smaller batch_size"
                    ) from None

    def close(self) -> None:
        """Stop the stream's worker processes (:func:`selfsup.workers.shutdown_iterator`)."""
        shutdown_iterator(self.iterator)
        self.iterator = None


def make_loader(dataset, num_workers: int, device: torch.device, **kwargs: Any) -> DataLoader:
    """Every stage's DataLoader: workers that leave SIGTERM/SIGINT to the main process and live across
    epochs, pinned memory on CUDA, and a generator of its own. (A loader draws its workers' base seed
    when an iterator starts; from the global generator that draw would shift drop path and mixup by
    the loader's settings, and a resumed run would differ from a straight one. Augmentations do not
    depend on it: they are seeded per sample.)"""
    return DataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        worker_init_fn=leave_signals_to_the_main_process,
        generator=torch.Generator(),
        **kwargs,
    )


def global_batch_loader(
    dataset, batch_size: int, rank: int, world: int, seed: int, num_workers: int, device: torch.device
) -> tuple[DataLoader, GlobalBatchSampler]:
    """The training loader of a map-style ``dataset``: this process's slice of each global batch
    (:class:`GlobalBatchSampler`), through :func:`make_loader`. Move it with ``sampler.set_position``."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, rank, world, seed)
    return make_loader(dataset, num_workers, device, batch_sampler=sampler), sampler
