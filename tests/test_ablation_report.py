"""The ablation's claims are honest about their image counts, its figures are legible, and the
reconstruction's loss plot names the terms it shows."""
from __future__ import annotations

import matplotlib
import torch

matplotlib.use("Agg")


def _errors(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(n)
    base = torch.rand(n, generator=g) * 0.1 + 0.1
    return {("real", "d"): (ids, base), ("real", "a"): (ids, base + 0.05)}  # d better on every image


def test_a_claim_on_too_few_images_gets_no_verdict():
    from seeing.reports.ablation import MIN_IMAGES, ordering_checks

    assert MIN_IMAGES == 16
    [few] = ordering_checks(_errors(4))
    assert few["images"] == 4 and few["verdict"] == "too few images (4 < 16)"
    assert few["beyond_noise"] is None  # not True: 4 images cannot say so
    assert few["holds"]  # the means are what they are
    [enough] = ordering_checks(_errors(16))
    assert enough["images"] == 16 and enough["verdict"] == "holds" and enough["beyond_noise"] is True
    [lower] = ordering_checks(_errors(4), min_images=4)
    assert lower["verdict"] == "holds"
    # the image count and the verdict come first in the table
    assert list(few)[:4] == ["targets", "claim", "images", "verdict"]


def _captured_figures(monkeypatch, module) -> list:
    """The figures ``module`` saves, kept open for inspection (it saves them through save_figure)."""
    figures = []
    def keep(fig, path):
        fig.canvas.draw()
        figures.append(fig)
        return path


    monkeypatch.setattr(module, "save_figure", keep)
    return figures


def test_curves_figure_has_labelled_ticks_and_its_legend_beside_the_curves(tmp_path, monkeypatch):
    from seeing.reports import ablation

    steps = torch.arange(300).float()
    curves = {"a": (0.16 * torch.exp(-steps / 400)).expand(4, -1), "f": (0.15 * torch.exp(-steps / 150)).expand(4, -1)}
    labels = {"a": "z from the mean", "f": "layer-wise + deltas", "b": "direct", "d": "layer-wise"}
    assert ablation.curves_figure("real", curves, {"b": 0.14, "d": 0.12}, tmp_path / "c.png", labels).is_file()
    figures = _captured_figures(monkeypatch, ablation)
    ablation.curves_figure("real", curves, {"b": 0.14, "d": 0.12}, tmp_path / "c2.png", labels)
    ax = figures[0].axes[0]
    lo, hi = ax.get_ylim()
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert len(ticks) >= 3, ticks  # 0.05, 0.1, 0.2 ... on a log axis spanning little more than a decade
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # beside, not over, the curves


def test_the_loss_plot_names_its_terms(tmp_path, monkeypatch):
    from seeing.reports import reconstruction
    from seeing.reports.reconstruction import loss_figure, loss_terms

    loss = {"perceptual": "none", "perceptual_weight": 1.0, "delta_weight": 0.01, "encoder_weight": 0.0,
            "latent_delta_weight": 0.0}
    assert loss_terms(loss, ["layer1", "layer2"]) == "pixel L1 + 0.01 x sum_l mean(delta_l^2)"
    assert loss_terms(loss, ["z"]) == "pixel L1"
    paper = {**loss, "perceptual": "vgg", "delta_weight": 1.0, "encoder_weight": 0.25}
    assert loss_terms(paper, ["z"]) == "pixel L1 + 1 x VGG relu4_2 L1 + 0.25 x MSE(E(x), E(G(z)))"
    assert loss_terms(None, ["z"]) is None

    result = {"loss_curves": torch.rand(3, 20) + 0.5, "pixel_curves": torch.rand(3, 20) * 0.1 + 0.1}
    assert loss_figure(result, tmp_path / "l.png", "pixel L1").is_file()
    figures = _captured_figures(monkeypatch, reconstruction)
    loss_figure(result, tmp_path / "l.png", loss_terms(loss, ["layer1"]))
    loss_figure(result, tmp_path / "l.png", None)
    named, unknown = ([t.get_text() for t in f.axes[0].get_legend().get_texts()] for f in figures)
    assert named == ["mean loss = pixel L1 + 0.01 x sum_l mean(delta_l^2)", "its pixel L1 term, mean"]
    assert "not recorded" in unknown[0]
