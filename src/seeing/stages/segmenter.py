"""``stage=segmenter``: train the scenes segmenter and export it.

    python train.py stage=segmenter data=scenes    # the U-Net: scenes_segmenter.pt
    python train.py stage=segformer                # a small SegFormer: scenes_segformer/

``architecture=unet`` trains :class:`SceneSegmenterNet` (the shipped scenes segmenter);
``architecture=segformer`` a randomly initialised SegFormer built from a transformers config
(``stage.segformer``: ``SegformerConfig`` keys plus ``input_size``), through the same torch
preprocessing the loaded segmenter applies, exported as a ``save_pretrained`` folder that
``segmenter=segformer segmenter.path=...`` reads.

Validation logs mean IoU and per-class IoU (torchmetrics ``MulticlassJaccardIndex``).
After fitting, :meth:`SegmenterTraining.export` measures the held-out (test split)
mIoU, writes ``scenes_segmenter.pt`` with that number and the exact command in its
metadata, plus ``heldout_iou.csv`` / ``heldout_metrics.json`` and a figure.
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchvision.transforms.v2 import functional as TF

from seeing.reporting import save_figure, torch_save_atomic, write_csv, write_json
from seeing.segmenters.scenes import ASSET_NAME, SceneSegmenterNet, make_weights_file
from seeing.validation import check_numbers

ARCHITECTURES = ("unet", "segformer")
SEGFORMER_FOLDER = "scenes_segformer"

log = logging.getLogger(__name__)


def augment(images: torch.Tensor, labels: torch.Tensor, strength: float = 1.0,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mild, label-preserving perturbations so the segmenter also reads GAN samples:
    per-image brightness / contrast / saturation jitter, horizontal flips, Gaussian
    blur on some images and additive noise. Images stay in [-1, 1]."""
    if strength <= 0:
        return images, labels
    n, dev = images.shape[0], images.device

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=generator, device="cpu").to(dev) * (hi - lo) + lo

    x = (images + 1) / 2  # [0, 1]
    s = strength
    x = x * uniform(1 - 0.2 * s, 1 + 0.2 * s, 1, 1, 1)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(1 - 0.25 * s, 1 + 0.25 * s, 1, 1, 1) + mean  # contrast
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * uniform(1 - 0.3 * s, 1 + 0.3 * s, 1, 1, 1) + grey  # saturation
    x = x + uniform(-0.03 * s, 0.03 * s, 3, 1, 1)  # colour cast

    flip = uniform(0, 1) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    labels = torch.where(flip[:, None, None], labels.flip(-1), labels)

    blur = (uniform(0, 1) < 0.3 * min(1.0, s)).nonzero().flatten().tolist()
    sigmas = uniform(0.3, 0.3 + 0.8 * s)
    for i in blur:  # a handful of 64x64 images: a per-image loop is cheap
        x[i] = TF.gaussian_blur(x[i], kernel_size=[5, 5], sigma=[float(sigmas[i])] * 2)

    noise = uniform(0, 0.04 * s, 1, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=generator, device="cpu").to(dev)
    return (x.clamp(0, 1) * 2 - 1), labels


def _plain(value: Any) -> Any:
    """Hydra's containers as plain dicts and lists (what torch.load(weights_only=True) reads back)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class SegmenterTraining(pl.LightningModule):
    """Cross-entropy training of a scenes segmenter (:class:`SceneSegmenterNet`, or a SegFormer) with
    AdamW and a cosine schedule."""

    def __init__(self, num_classes: int, widths: Sequence[int] | None = (16, 32, 64, 96), lr: float = 2e-3,
                 weight_decay: float = 1e-4, warmup_steps: int = 100, augment_strength: float = 1.0,
                 class_names: Sequence[str] | None = None, figure_images: int = 8,
                 name: str = "segmenter", architecture: str = "unet", segformer: dict[str, Any] | None = None):
        super().__init__()
        self.stage_name = name
        check_numbers({"lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                       "augment_strength": augment_strength, "figure_images": figure_images}, "stage")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"stage.architecture={architecture!r}: choose one of {list(ARCHITECTURES)}")
        # each architecture reads its own sizes; the other's, when set, would silently do nothing
        if architecture == "unet" and (widths is None or segformer is not None):
            raise ValueError("stage.architecture=unet takes stage.widths and no stage.segformer (that is "
                             "stage=segformer's)")
        if architecture == "segformer" and (widths is not None or not segformer):
            raise ValueError("stage.architecture=segformer takes stage.segformer (SegformerConfig keys, input_size) "
                             "and no stage.widths (the U-Net's): use stage=segformer")
        # plain Python values only (Hydra hands over ListConfigs): checkpoints must stay loadable
        # with torch.load(weights_only=True), which is how Lightning resumes (ckpt_path=last)
        self.save_hyperparameters({
            "num_classes": int(num_classes), "architecture": architecture,
            "widths": None if widths is None else [int(w) for w in widths],
            "segformer": None if segformer is None else _plain(segformer), "lr": float(lr),
            "weight_decay": float(weight_decay), "warmup_steps": int(warmup_steps),
            "augment_strength": float(augment_strength),
            "class_names": None if class_names is None else [str(n) for n in class_names],
            "figure_images": int(figure_images),
        })
        if architecture == "unet":
            self.net = SceneSegmenterNet(num_classes, widths)
        else:
            from seeing.segmenters.segformer import build_segformer_net

            self.net = build_segformer_net(num_classes, **self.hparams.segformer)
        self.val_iou = MulticlassJaccardIndex(num_classes, average="none")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self._fit_started: float | None = None
        self.train_seconds = 0.0

    # ------------------------------------------------------------------ names
    def class_names(self) -> list[str]:
        names = self.hparams.class_names
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for source in (dm, getattr(dm, "train_set", None)):
            if names is None and source is not None and getattr(source, "class_names", None) is not None:
                names = source.class_names
        if names is None:
            names = [f"class_{i}" for i in range(self.hparams.num_classes)]
        if len(names) != self.hparams.num_classes:
            raise ValueError(f"{len(names)} class names for num_classes={self.hparams.num_classes}")
        return list(names)

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_fit_start(self) -> None:
        self._fit_started = time.time()

    def on_fit_end(self) -> None:
        if self._fit_started is not None:
            self.train_seconds += time.time() - self._fit_started

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # wall time spent so far, so a resumed run (ckpt_path=last) reports its whole training time
        now = time.time() - self._fit_started if self._fit_started is not None else 0.0
        checkpoint["train_seconds"] = self.train_seconds + now

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.train_seconds = float(checkpoint.get("train_seconds", 0.0))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        images, labels = augment(images, labels, self.hparams.augment_strength)
        loss = F.cross_entropy(self.net(images), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"segmenter loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.net(images)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        pred = logits.argmax(1)
        self.val_iou.update(pred, labels)
        self.val_acc.update(pred, labels)

    def on_validation_epoch_end(self) -> None:
        # compute() gathers every process's counts, so each logs the same value; sync_dist only says so
        iou = self.val_iou.compute()
        self.log("val/miou", iou.mean(), prog_bar=True, sync_dist=True)
        self.log("val/pixel_acc", self.val_acc.compute(), sync_dist=True)
        for name, v in zip(self.class_names(), iou):
            self.log(f"val_iou/{name}", v, sync_dist=True)
        self.val_iou.reset()
        self.val_acc.reset()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(self.hparams.warmup_steps, max(1, total // 10))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def heldout_metrics(self, loader) -> dict[str, Any]:
        """Mean / per-class IoU and pixel accuracy of the current weights on ``loader``."""
        was_training = self.net.training
        self.net.eval()
        n = self.hparams.num_classes
        # process 0 scores the whole split alone (export): a sync would wait for processes that are not scoring
        iou = MulticlassJaccardIndex(n, average="none", sync_on_compute=False)
        acc = MulticlassAccuracy(n, average="micro", sync_on_compute=False)
        images_seen = 0
        for images, labels in loader:
            pred = self.net(images.to(self.device)).argmax(1).cpu()
            iou.update(pred, labels)
            acc.update(pred, labels)
            images_seen += len(images)
        self.net.train(was_training)
        per_class = iou.compute()
        return {"miou": float(per_class.mean()), "pixel_acc": float(acc.compute()), "images": images_seen,
                "per_class_iou": {name: float(v) for name, v in zip(self.class_names(), per_class)}}

    def export(self, output_dir: str | Path) -> Path:
        """Write ``scenes_segmenter.pt`` (the U-Net: weights + provenance) or the ``scenes_segformer/``
        folder (the SegFormer, with the provenance in ``training.json``) and the held-out report."""
        output_dir = Path(output_dir)
        meta: dict[str, Any] = {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "seed": int(os.environ["PL_GLOBAL_SEED"]) if "PL_GLOBAL_SEED" in os.environ else None,
            "global_step": int(self.global_step),
            "train_seconds": round(self.train_seconds, 1),
            "hparams": dict(self.hparams),
        }
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            meta["resolution"] = getattr(dm, "resolution", None)
            test = dm.test_dataloader()
            metrics = self.heldout_metrics(test)
            test_set = getattr(test, "dataset", None)
            meta["heldout"] = {
                "split": "test",
                "world_seed": getattr(test_set, "seed", None),
                "first_index": getattr(test_set, "offset", None),
                **metrics,
            }
            write_json(output_dir / "heldout_metrics.json", meta["heldout"])
            write_csv(output_dir / "heldout_iou.csv",
                      [{"class": k, "iou": v} for k, v in metrics["per_class_iou"].items()])
            self._save_examples(test_set, output_dir / "heldout_examples.png")
            for lg in self.loggers:
                lg.log_metrics({"heldout/miou": metrics["miou"], "heldout/pixel_acc": metrics["pixel_acc"]},
                               step=self.global_step)
            log.info("held-out mIoU %.4f, pixel accuracy %.4f on %d images",
                     metrics["miou"], metrics["pixel_acc"], metrics["images"])
        if self.hparams.architecture == "segformer":
            folder = self.net.save_pretrained(output_dir / SEGFORMER_FOLDER, self.class_names())
            write_json(folder / "training.json", meta)
            return folder
        path = output_dir / ASSET_NAME
        torch_save_atomic(make_weights_file(self.net, self.class_names(), **meta), path)
        return path

    @torch.no_grad()
    def _save_examples(self, dataset, path: Path) -> None:
        """Image / truth / prediction rows for the first few held-out scenes."""
        if dataset is None or self.hparams.figure_images <= 0:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from seeing.data.scenes import colorize_labels

        k = min(self.hparams.figure_images, len(dataset))
        images, labels = zip(*(dataset[i] for i in range(k)))
        images, labels = torch.stack(images), torch.stack(labels)
        self.net.eval()
        pred = self.net(images.to(self.device)).argmax(1).cpu()
        fig, axes = plt.subplots(3, k, figsize=(1.6 * k, 5), squeeze=False)
        for j in range(k):
            axes[0, j].imshow(((images[j].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            axes[1, j].imshow(colorize_labels(labels[j]))
            axes[2, j].imshow(colorize_labels(pred[j]))
        for ax, title in zip(axes[:, 0], ["image", "truth", "predicted"]):
            ax.set_ylabel(title)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        save_figure(fig, path)
