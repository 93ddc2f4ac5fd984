"""FSD in torchmetrics' conventions: logged from a LightningModule, in a MetricCollection,
forward, plot, the functional form equal to the class, images in through a segmenter; the docs'
examples run."""
from __future__ import annotations

import doctest
from pathlib import Path

import matplotlib
import pytest
import torch

from seeing.metrics import FrechetSegmentationDistance
from seeing.metrics import functional as F

ROOT = Path(__file__).resolve().parents[1]
K = 5


def _maps(n: int, seed: int, classes: int = K) -> torch.Tensor:
    return torch.randint(0, classes, (n, 6, 7), generator=torch.Generator().manual_seed(seed))


def test_compute_is_the_scalar_fsd_and_lightning_logs_it():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    real, fake = _maps(24, 0), _maps(24, 1, K - 1)  # the last class is never generated

    class Evaluation(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fsd = FrechetSegmentationDistance(num_classes=K)

        def validation_step(self, batch, batch_idx):
            r, f = batch
            self.fsd.update(r, real=True)
            self.fsd.update(f, real=False)
            self.log("val/fsd", self.fsd)

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    [scores] = trainer.validate(Evaluation(), DataLoader(TensorDataset(real, fake), batch_size=5), verbose=False)
    want = F.frechet_segmentation_distance(real, fake, K)
    assert want.dim() == 0 and want.dtype == torch.float64 and float(want) > 1
    assert scores["val/fsd"] == pytest.approx(float(want), rel=1e-6)  # Lightning keeps float32


def test_functional_forms_equal_the_class_and_terms_add_up():
    real, fake = _maps(30, 2), _maps(20, 3)
    metric = FrechetSegmentationDistance(K)
    metric.update(real, real=True)
    metric.update(F.class_tally(fake, K), real=False)  # label maps or tallies, mixed
    value, terms = metric.compute(), metric.terms()
    assert torch.equal(value, F.frechet_segmentation_distance(real, fake, K))
    from_tallies = F.frechet_segmentation_distance_from_tallies(F.class_tally(real, K), F.class_tally(fake, K))
    assert torch.equal(value, from_tallies) and torch.equal(terms["fsd"], value)
    assert torch.allclose(terms["mean_term"] + terms["cov_term"], value, rtol=1e-12)
    assert {k: float(v) for k, v in F.fsd_terms(F.class_tally(real, K), F.class_tally(fake, K)).items()} == {
        k: float(v) for k, v in terms.items()}


def test_forward_adds_the_batch_and_returns_its_own_value():
    real, fake = _maps(12, 4), _maps(12, 5)
    metric = FrechetSegmentationDistance(K)
    assert torch.isnan(metric(real, real=True))  # one side alone: no distance, no error
    assert torch.isnan(metric(fake[:1], real=False))
    assert metric.counts() == {"real": 12, "fake": 1}  # ... but both were added
    metric(fake[1:], real=False)
    # the state is the sum over batches (equal up to the order of additions)
    assert torch.allclose(metric.compute(), F.frechet_segmentation_distance(real, fake, K), rtol=1e-12, atol=0)
    # a batch holding both sides (real: a per-image mask) has its own FSD
    mixed = FrechetSegmentationDistance(K)
    both = mixed(torch.cat([real, fake]), real=torch.arange(24) < 12)
    assert torch.equal(both, F.frechet_segmentation_distance(real, fake, K))
    with pytest.raises(ValueError, match="mask of 24 images"):
        mixed(torch.cat([real, fake]), real=torch.ones(3, dtype=torch.bool))
    # compute() itself still refuses too few images, clearly
    with pytest.raises(ValueError, match="at least 2 images on each side, got 0"):
        FrechetSegmentationDistance(K).compute()


def test_metric_collection_and_plot():
    from torchmetrics import MetricCollection

    matplotlib.use("Agg")
    real, fake = _maps(10, 6), _maps(10, 7)
    metrics = MetricCollection({"fsd": FrechetSegmentationDistance(K)})
    metrics.update(real, real=True)
    metrics.update(fake, real=False)
    assert torch.equal(metrics.compute()["fsd"], F.frechet_segmentation_distance(real, fake, K))
    metric = FrechetSegmentationDistance(K)
    values = []
    for seed in range(3):  # e.g. one value per epoch
        metric.update(_maps(6, 10 + seed), real=True)
        metric.update(_maps(6, 20 + seed, K - seed), real=False)
        values.append(metric.compute())
        metric.reset()
    fig, ax = metric.plot(values)
    assert len(ax.lines[0].get_xdata()) == 3 and ax.get_ylabel() == "FrechetSegmentationDistance"
    metric.update(real, real=True)
    metric.update(fake, real=False)
    fig, ax = metric.plot()  # the current value
    assert fig is not None


def test_images_in_through_a_segmenter_as_fid_takes_a_feature_extractor():
    from seeing.data.scenes import CLASS_NAMES, ScenesDataset
    from seeing.segmenters.scenes import load_scenes_segmenter

    segmenter = load_scenes_segmenter(device="cpu")
    images = torch.stack([ScenesDataset(16, seed=0, offset=7000)[i][0] for i in range(16)])
    with_segmenter = FrechetSegmentationDistance(segmenter=segmenter)
    assert with_segmenter.num_classes == len(CLASS_NAMES) and with_segmenter.class_names == list(CLASS_NAMES)
    with_segmenter.update(images[:8], real=True)
    with_segmenter.update(images[8:], real=False)
    labels = segmenter.segment(images)
    from_labels = F.frechet_segmentation_distance(labels[:8], labels[8:], len(CLASS_NAMES))
    assert torch.equal(with_segmenter.compute(), from_labels)
    # the segmenter stays a frozen instrument whatever mode its owner is switched to
    with_segmenter.train()
    assert not segmenter.training
    with pytest.raises(ValueError, match="no segmenter"):
        FrechetSegmentationDistance(len(CLASS_NAMES)).update(images, real=True)
    with pytest.raises(ValueError, match="class-count mismatch: num_classes=5 but the segmenter has 12"):
        FrechetSegmentationDistance(5, segmenter=segmenter)


def test_the_docs_examples_run():
    """docs/metrics.md (FSD in one's own LightningModule, MetricCollection, forward, plot, missing
    objects) and the module doctests."""
    import seeing.metrics.fsd
    import seeing.metrics.functional

    matplotlib.use("Agg")
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testfile(str(ROOT / "docs" / "metrics.md"), module_relative=False, optionflags=flags)
    assert result.attempted > 20 and result.failed == 0
    for module in (seeing.metrics.functional, seeing.metrics.fsd):
        result = doctest.testmod(module, optionflags=flags)
        assert result.attempted > 0 and result.failed == 0
