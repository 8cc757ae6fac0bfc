"""The loader ``initialize(training_data=...)`` returns, and a loader that never ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler


def build_dataloader(dataset: Dataset, micro_batch_size: int, dp_rank: int, dp_world_size: int,
                     collate_fn: Callable[[list[Any]], Any] | None = None, drop_last: bool = False,
                     shuffle: bool = True, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """Each data-parallel rank reads its own 1/N of ``dataset`` (DistributedSampler) in micro-batches
    ("auto batch creation"); an IterableDataset is read as is, its sharding being its own business."""
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=micro_batch_size, collate_fn=collate_fn, drop_last=drop_last,
                          num_workers=num_workers)
    sampler = DistributedSampler(dataset, num_replicas=dp_world_size, rank=dp_rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn,
                      drop_last=drop_last, num_workers=num_workers)


class ResumableLoader:
    """The loader ``initialize()`` returns: a DataLoader that knows its position (epoch, batches
    served), so a checkpoint can resume the data exactly where it stopped. Each new iteration is a
    new epoch (a new shuffle); other attributes are the DataLoader's."""

    resumable = True

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.epoch = 0
        self.position = 0  # batches served in the current epoch
        self._skip = 0
        self._started = False

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[Any]:
        if self._started and not self._skip:
            self.epoch += 1
        self._started = True
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        skip, self._skip = self._skip, 0
        self.position = 0
        for i, batch in enumerate(self.loader):
            if i < skip:  # resuming: these batches were consumed before the checkpoint
                self.position += 1
                continue
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip, self._started = state["epoch"], state["position"], True


class RepeatingLoader:
    """Iterate a loader forever, starting a new epoch (and a new shuffle) when it runs out."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.epoch = 0
        self._it = iter(loader)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            sampler = getattr(self.loader, "sampler", None)
            if hasattr(sampler, "set_epoch") and not getattr(self.loader, "resumable", False):
                sampler.set_epoch(self.epoch)
            self._it = iter(self.loader)
            return next(self._it)
