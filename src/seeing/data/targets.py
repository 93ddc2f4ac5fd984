"""The fixed set of images a reconstruction run tries to reproduce.

* ``kind="real"``: images of any image source (:mod:`seeing.data.sources`: the scenes
  world, an image folder, an LSUN lmdb), resized to the generator's resolution. For the
  scenes world the default offset lies beyond every training, validation and test range,
  so the scenes are held out. ``with_classes`` keeps only images whose ground truth shows
  one of these classes (e.g. ``[person, car]``: scenes with planted persons or cars).
* ``kind="generated"``: the generator's own samples ``sample_z(offset + n, seed)[offset:]``,
  whose true latents (and true layer features) are known.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from seeing.gans.layered import LATENT, LayeredGenerator
from seeing.gans.values import feature_tensor

log = logging.getLogger(__name__)


@dataclass
class TargetSet:
    images: torch.Tensor  # N x 3 x R x R in [-1, 1], R = the generator's resolution
    ids: torch.Tensor  # N: the index of each image in its source (seeds per-image random starts)
    kind: str
    labels: torch.Tensor | None = None  # N x R x R ground truth, when the source knows it
    true_latents: torch.Tensor | None = None  # generated targets: the latent they came from
    true_features: dict[str, torch.Tensor] = field(default_factory=dict)  # generated: true r_i
    description: str = ""

    def extras(self) -> dict[str, Any]:
        """What a result file carries along for the report."""
        out: dict[str, Any] = {"ids": self.ids, "target_kind": self.kind, "target_source": self.description}
        if self.labels is not None:
            out["target_labels"] = self.labels
        if self.true_latents is not None:
            out["true_latents"] = self.true_latents
        if self.true_features:
            out["true_features"] = dict(self.true_features)
        return out


@torch.no_grad()
def generated_targets(generator: LayeredGenerator, count: int, seed: int, offset: int = 0,
                      record: Sequence[str] = (), latent_name: str = LATENT, batch_size: int = 32) -> TargetSet:
    """Samples with known latents; ``record`` lists the positions whose true features are kept
    (position "z" is the searched latent: z, or w+ after ``mapping``)."""
    z_all = generator.sample_z(offset + count, seed)[offset:]
    device = next((p.device for p in generator.parameters()), torch.device("cpu"))
    images, feats = [], {p: [] for p in record}
    wanted = [latent_name if p == LATENT else p for p in record]
    wanted = [w for w in wanted if w != LATENT]
    for i in range(0, count, batch_size):
        z = z_all[i:i + batch_size].to(device)
        images.append(generator(z).clamp(-1, 1).float().cpu())
        got = generator.features(z, wanted) if wanted else {}
        for p in record:
            if p == LATENT:
                value = z if latent_name == LATENT else got[latent_name]
            else:
                value = got[p]
            feats[p].append(feature_tensor(value).float().cpu())
    ids = torch.arange(offset, offset + count)
    return TargetSet(torch.cat(images), ids, "generated", true_latents=z_all.clone(),
                     true_features={p: torch.cat(v) for p, v in feats.items()},
                     description=f"generator samples (seed {seed}, offset {offset})")


def _class_indices(names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; the source's classes are {list(class_names)}")
    return [list(class_names).index(n) for n in names]


def real_targets(source: Any, count: int, resolution: int, with_classes: Sequence[str] = (),
                 min_fraction: float = 0.01, scan_limit: int = 100, batch_size: int = 32) -> TargetSet:
    """``count`` images of ``source`` (a :class:`seeing.data.sources.ImageSource`) from its offset on;
    with ``with_classes``, only images whose ground truth covers at least ``min_fraction`` of the
    image with one of them (scanning at most ``scan_limit * count`` images)."""
    if count <= 0:
        raise ValueError("targets.count must be positive")
    wanted: list[int] = []
    if with_classes:
        if not getattr(source, "has_labels", False):
            raise ValueError(f"targets.with_classes={list(with_classes)} needs ground-truth labels, "
                             f"which source {source.describe()} does not have")
        from seeing.data.scenes import CLASS_NAMES

        wanted = _class_indices(with_classes, CLASS_NAMES)
    scan = count if not wanted else count * int(scan_limit)
    images, labels, ids = [], [], []
    seen = 0
    for batch in source.batches(scan, batch_size, resolution):
        for j in range(batch.images.shape[0]):
            index = source.offset + seen + j
            if wanted:
                area = torch.stack([(batch.labels[j] == c).float().mean() for c in wanted])
                if not bool((area >= min_fraction).any()):
                    continue
            images.append(batch.images[j].float().cpu())
            if batch.labels is not None:
                labels.append(batch.labels[j].cpu())
            ids.append(index)
            if len(images) == count:
                break
        seen += batch.images.shape[0]
        if len(images) == count:
            break
    if len(images) < count:
        what = f" showing one of {list(with_classes)}" if wanted else ""
        raise ValueError(f"found only {len(images)} of {count} target images{what} in {seen} images of "
                         f"{source.describe()}")
    desc = source.describe() + (f", images showing {'/'.join(with_classes)}" if wanted else "")
    return TargetSet(torch.stack(images), torch.tensor(ids), "real",
                     labels=torch.stack(labels) if len(labels) == len(images) else None, description=desc)
