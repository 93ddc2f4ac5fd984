"""LightningDataModule over the scenes world: disjoint index ranges for train / val / test."""
from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

from .scenes import NUM_CLASSES, ScenesDataset


class ScenesTrainingData(pl.LightningDataModule):
    """The training scenes alone, for a stage that does not validate (the GAN): Lightning warns
    about a validation loader that nothing reads. :class:`ScenesDataModule` adds the held-out
    splits; the training scenes are the same."""

    def __init__(self, resolution: int = 64, batch_size: int = 32, train_length: int = 20000,
                 val_length: int = 512, test_length: int = 512, seed: int = 0, drop: Sequence[str] = (),
                 drop_fraction: float = 1.0, num_workers: int = 0, shuffle_seed: int = 0, **_unused):
        super().__init__()
        from seeing.validation import check_numbers

        check_numbers({"resolution": resolution, "batch_size": batch_size, "train_length": train_length,
                       "val_length": val_length, "test_length": test_length, "shuffle_seed": shuffle_seed}, "data")
        self.shuffle_seed = int(shuffle_seed)
        self.resolution, self.batch_size, self.num_workers = resolution, batch_size, num_workers
        common = dict(resolution=resolution, seed=seed, drop=tuple(drop), drop_fraction=drop_fraction)
        self.train_set = ScenesDataset(train_length, offset=0, **common)
        self.val_set = ScenesDataset(val_length, offset=train_length, **common)
        self.test_set = ScenesDataset(test_length, offset=train_length + val_length, **common)
        self.num_classes = NUM_CLASSES

    def _loader(self, ds, shuffle: bool) -> StatefulDataLoader:
        # stateful: Lightning saves where the epoch's order stands, and the generator it is drawn from, in
        # each checkpoint, so a run resumed mid-epoch (ckpt_path=last) continues that order and the next
        # epochs'. The generator is the sampler's alone: the loader also draws from its own generator once
        # per epoch, a draw a restored loader does not repeat
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(self.shuffle_seed)) if shuffle else None
        return StatefulDataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                                  drop_last=shuffle, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, True)


class ScenesDataModule(ScenesTrainingData):
    """Train, validation and test scenes come from one world seed but disjoint index ranges,
    so held-out numbers are measured on scenes the model never saw."""

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.test_set, False)
