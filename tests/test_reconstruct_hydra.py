"""The reconstruct stage, the direct encoder stage and the reports through Hydra + Lightning, on a
tiny random generator with a random hybrid encoder and a random scenes segmenter."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException

from seeing.gans import load_generator
from seeing.pipeline import evaluate, train
from seeing.stages.reconstruct import load_result
from seeing.models.direct_encoder import load_direct_encoder

from conftest import QUICK_TRAIN, run_folder

QUICK = QUICK_TRAIN
RECON = ["stage=reconstruct", "stage.steps=3", "stage.targets.count=3", "stage.batch_size=2"]


@pytest.fixture(scope="module")
def files(tiny_gan_files, tmp_path_factory):
    """The shared random 16x16 ProGAN and its random hybrid encoder, and a random 12-class scenes segmenter."""
    from seeing.data.scenes import CLASS_NAMES
    from seeing.segmenters.scenes import SceneSegmenterNet, make_weights_file

    gen, hybrid = tiny_gan_files
    seg = tmp_path_factory.mktemp("recon") / "segmenter.pt"
    torch.manual_seed(0)
    torch.save(make_weights_file(SceneSegmenterNet(len(CLASS_NAMES), (4, 8)), CLASS_NAMES), seg)
    return {"generator": gen, "hybrid": hybrid, "segmenter": seg}


def test_every_variant_runs_and_the_ablation_reports_them(compose, files, tmp_path):
    # outputs are keyed by the model and its checkpoint file
    runs = tmp_path / "runs" / "scenes_progan-tiny_progan"
    model = [f"model.checkpoint={files['generator']}"]
    # variants b, c need the direct encoder first
    # (Hydra wraps the FileNotFoundError raised while building the stage module)
    with pytest.raises((FileNotFoundError, InstantiationException),
                       match=r"python train\.py model=scenes_progan model\.checkpoint=\S*tiny_progan\.pt \S+ "
                             r"stage=direct_encoder"):
        train(compose("train", [*RECON, "variant=b", *QUICK, *model]))

    metrics = train(compose("train", ["stage=direct_encoder", "trainer.max_steps=2",
                                      "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0",
                                      "stage.batch_size=4", "stage.val_size=4",
                                      "stage.val_batch_size=4", *QUICK, *model]))
    assert "val/corr_z" in metrics
    # that smoke run is not the preset's direct encoder: variant b does not take it unnamed, and says
    # where it is and how to use it
    smoke = run_folder(runs, "direct_encoder") / "direct_encoder.pt"
    assert smoke.parent.name != "direct_encoder"
    with pytest.raises((FileNotFoundError, InstantiationException), match=r"(?s)trainer\.max_steps=2.*"
                       + re.escape(f"stage.direct_encoder_file={smoke}")):
        train(compose("train", [*RECON, "variant=b", *QUICK, *model]))
    direct = load_direct_encoder(smoke, load_generator(files["generator"]))
    z = direct(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert z.shape == (2, 16) and torch.allclose(z.pow(2).mean(1), torch.ones(2), atol=1e-4)  # unit RMS, like N(0, I)

    results = {}
    encoders = [f"stage.hybrid_file={files['hybrid']}", f"stage.direct_encoder_file={smoke}"]
    for v in "abcdef":
        cfg = compose("train", [*RECON, f"variant={v}", *QUICK, *model, *encoders])
        train(cfg)
        assert Path(cfg.output_dir) == run_folder(runs, f"reconstruct_real_{v}")
        results[v] = load_result(Path(cfg.output_dir) / "reconstruction.pt")
        assert len(list((Path(cfg.output_dir) / "images").glob("*.png"))) == 3
        # the result knows what made it: its settings and the encoder files it started from
        made = results[v]["provenance"]
        assert made["config"]["stage.steps"] == 3 and made["config"]["variant.name"] == v
        assert str(files["hybrid"]) in {i["path"] for i in made["inputs"]} or v in "abc"
    # what each variant optimises
    assert results["f"]["positions"] == ["layer1", "layer2", "layer3"]
    assert results["a"]["positions"] == results["c"]["positions"] == results["e"]["positions"] == ["z"]
    for v in "bd":  # encoders alone: no optimisation, the final image is the initial one
        assert results[v]["positions"] == [] and torch.equal(results[v]["final"], results[v]["initial"])
    for v in "acef":
        assert torch.isfinite(results[v]["loss_curves"]).all() and results[v]["loss_curves"].shape == (3, 3)
        assert torch.isfinite(results[v]["pixel_curves"]).all() and results[v]["pixel_curves"].shape == (3, 3)
    # d, e, f start from the hybrid's latent; b, c from the direct encoder's; a elsewhere
    assert torch.equal(results["d"]["init_latents"], results["f"]["init_latents"])
    assert torch.equal(results["b"]["init_latents"], results["c"]["init_latents"])
    assert not torch.allclose(results["a"]["init_latents"], results["d"]["init_latents"])
    assert torch.equal(results["a"]["targets"], results["f"]["targets"])  # the same held-out scenes
    assert int(results["f"]["ids"][0]) >= 1_000_000

    train(compose("train", [*RECON, "variant=f", "stage.targets.kind=generated", *QUICK, *model, *encoders]))
    gen = load_result(run_folder(runs, "reconstruct_generated_f") / "reconstruction.pt")
    assert "true_latents" in gen and gen["target_kind"] == "generated"

    # W&B (offline) as well: its tables refuse columns of mixed types
    cfg = compose("evaluate", ["metric=ablation", f"segmenter.path={files['segmenter']}", "logger=wandb", *model])
    rows = evaluate(cfg)
    assert {(r["targets"], r["variant"]) for r in rows} == {("real", v) for v in "abcdef"} | {("generated", "f")}
    out = Path(cfg.output_dir)
    with open(out / "ablation.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7 and "corr_layer2" in table[0] and "miou" in table[0]
    generated_f = next(r for r in table if r["targets"] == "generated")
    assert -1.0 <= float(generated_f["corr_z"]) <= 1.0
    assert (out / "ablation_real.png").is_file() and (out / "ablation.md").is_file()
    # the paper's pairwise claims, checked on the real targets (generated has only f: no pair)
    with open(out / "ablation_ordering.csv") as f:
        ordering = list(csv.DictReader(f))
    assert (out / "ablation_ordering.md").read_text().count("\n") == len(ordering) + 2
    assert {r["claim"] for r in ordering} == {"f < d", "f < e", "e < a", "e < b", "e < c", "d < b", "d < a", "d < c"}
    l1 = {r["variant"]: float(r["pixel_l1"]) for r in table if r["targets"] == "real"}
    for r in ordering:
        better, worse = r["claim"].split(" < ")
        assert r["targets"] == "real" and int(r["images"]) == 3
        assert float(r["better"]) == pytest.approx(l1[better]) and float(r["worse"]) == pytest.approx(l1[worse])
        assert (r["holds"] == "True") == (l1[better] < l1[worse])
    # each optimising variant against each single-pass one (b, d), on the real targets
    assert (out / "ablation_curves_real.png").is_file() and (out / "ablation_curves_generated.png").is_file()
    with open(out / "ablation_equivalent_steps.csv") as f:
        equivalents = list(csv.DictReader(f))
    # (c starts from b's latent, e and f from d's: they match it at step 0 by construction, not listed)
    assert {(r["single_pass"], r["optimised"]) for r in equivalents} == {("b", "a"), ("b", "e"), ("b", "f"),
                                                                          ("d", "a"), ("d", "c")}
    for r in equivalents:
        assert float(r["single_pass_pixel_l1"]) == pytest.approx(l1[r["single_pass"]])
        curve = results[r["optimised"]]["pixel_curves"].mean(0)
        reached = [t for t in range(3) if float(curve[t]) <= float(r["single_pass_pixel_l1"])]
        assert r["steps_to_match"] == (str(reached[0]) if reached else "")


def test_ordering_checks_pair_images_by_id_and_bound_the_difference():
    from seeing.reports.ablation import ordering_checks

    g = torch.Generator().manual_seed(0)
    ids = torch.arange(100, 140)
    base = torch.rand(40, generator=g) * 0.1 + 0.1
    errors = {("real", "a"): (ids, base + 0.05),  # f, d better than a on every image
              ("real", "d"): (ids.flip(0), (base - 0.02).flip(0)),  # same images, other order
              ("real", "f"): (ids, base - 0.05),
              ("real", "c"): (ids, base - 0.02 + torch.randn(40, generator=g) * 0.05),  # d vs c: noise only
              ("generated", "f"): (ids, base)}
    checks = {(c["targets"], c["claim"]): c for c in ordering_checks(errors)}
    assert set(checks) == {("real", "f < d"), ("real", "d < a"), ("real", "d < c")}  # pairs whose runs exist
    d_a = checks[("real", "d < a")]
    assert d_a["holds"] and d_a["beyond_noise"] and d_a["better_wins"] == 1.0 and d_a["images"] == 40
    assert d_a["diff_ci_low"] == pytest.approx(0.07, abs=1e-6) and d_a["diff_ci_high"] == pytest.approx(0.07, abs=1e-6)
    assert checks[("real", "f < d")]["beyond_noise"]
    d_c = checks[("real", "d < c")]
    assert d_c["diff_ci_low"] < 0 < d_c["diff_ci_high"] and not d_c["beyond_noise"]
    # disjoint target sets: nothing to compare
    assert ordering_checks({("real", "d"): (ids, base), ("real", "b"): (ids + 1000, base)}) == []


def test_equivalent_steps_finds_where_an_optimiser_catches_up_with_one_pass():
    from seeing.reports.ablation import equivalent_steps

    ids = torch.arange(10, 14)
    steps = torch.arange(6, dtype=torch.float32)
    curve = 0.5 - 0.05 * steps + torch.tensor([[0.01], [-0.01], [0.02], [-0.02]])  # image means: 0.5 - 0.05 t
    curve[2, 4:] = float("nan")  # image 12 stopped (non-finite loss) after step 3: out of the later means
    curves = {("real", "c"): (ids, curve), ("generated", "c"): (ids, curve)}
    single = {("real", "d"): (ids.flip(0), torch.full((4,), 0.36)),  # reached after 3 steps (0.35)
              ("real", "b"): (ids[:2], torch.tensor([0.47, 0.47])),  # images 10, 11 only: 0.5, 0.45 ...
              ("generated", "d"): (ids, torch.full((4,), 0.1)),  # never within 6 steps
              ("generated", "b"): (ids + 100, torch.full((4,), 0.9)),  # no shared images: left out
              # reached at step 5 by the mean of the three images still running (0.25 - 0.02/3)
              ("real", "x"): (ids, torch.full((4,), 0.245))}
    rows = {(r["targets"], r["single_pass"]): r for r in equivalent_steps(curves, single)}
    assert set(rows) == {("real", "d"), ("real", "b"), ("real", "x"), ("generated", "d")}
    assert rows[("real", "d")]["steps_to_match"] == 3 and rows[("real", "d")]["images"] == 4
    assert rows[("real", "b")]["steps_to_match"] == 1 and rows[("real", "b")]["images"] == 2
    assert rows[("real", "b")]["pixel_l1_at_start"] == pytest.approx(0.5)
    gen = rows[("generated", "d")]
    assert gen["steps_to_match"] is None and gen["steps_run"] == 6
    # the stopped image is dropped from the later means rather than making them NaN
    assert rows[("real", "x")]["steps_to_match"] == 5
    # a run that starts where the single pass ends is not compared with it
    starts = {("real", "c"): "direct_encoder", ("real", "b"): "direct_encoder", ("real", "d"): "hybrid"}
    assert {r["single_pass"] for r in equivalent_steps(curves, single, starts) if r["targets"] == "real"} == {"d", "x"}


def test_reconstruction_report_runs_here_and_fails_clearly_without_encoder(compose, files, tmp_path, monkeypatch):
    from seeing.assets import asset

    # the shipped hybrid fits the shipped GAN only: a tiny generator needs its own encoder
    with pytest.raises(ValueError, match=r"trained for another model.*stage=hybrid"):
        evaluate(compose("evaluate", ["metric=reconstruction", f"model.checkpoint={files['generator']}",
                                      f"stage.hybrid_file={asset('scenes_progan_hybrid.pt')}",
                                      f"segmenter.path={files['segmenter']}", "logger=csv"]))
    model = [f"model.checkpoint={files['generator']}", f"segmenter.path={files['segmenter']}", "logger=csv",
             "stage.steps=4", "stage.targets.count=3", "trainer.enable_progress_bar=false"]
    # nor is the shipped encoder looked for under another model's name: the command says what to run
    with pytest.raises(FileNotFoundError, match=r"python train\.py model=scenes_progan model\.checkpoint=\S+ \S+ "
                                                r"stage=hybrid`"):
        evaluate(compose("evaluate", ["metric=reconstruction", *model]))
    # every missing file in one error, each with the command that makes it
    with pytest.raises(FileNotFoundError) as missing:
        evaluate(compose("evaluate", ["metric=reconstruction", "model.checkpoint=/nonexistent/gen.pt",
                                      "segmenter.path=/nonexistent/seg.pt", "logger=csv"]))
    for needed in ["/nonexistent/gen.pt", "python train.py stage=gan", "/nonexistent/seg.pt",
                   "python train.py stage=segmenter data=scenes", "stage=hybrid"]:
        assert needed in str(missing.value), needed
    cfg = compose("evaluate", ["metric=reconstruction", f"stage.hybrid_file={files['hybrid']}", *model])
    report = evaluate(cfg)
    out = Path(cfg.output_dir)
    for name in ["reconstruction.json", "missing_classes.csv", "missing_classes.md", "iou_per_class.csv",
                 "missing.png", "loss_curves.png", "run/reconstruction.pt", "run/per_image.csv"]:
        assert (out / name).is_file(), name
    assert report["images"] == 3 and report["variant"] == "f" and report["steps"] == 4 and report["diverged"] == 0
    assert report["pixel_l1_final"] <= report["pixel_l1_initial"] + 1e-6
