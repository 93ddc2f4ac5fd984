"""Run identity as a user meets it: a sweep over any setting keeps every result, each saying what
made it; a smaller evaluate run leaves a larger report alone; samples written for FSD are read back
exactly; an ablation never mixes runs of different settings unnamed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seeing.pipeline import evaluate
from seeing.stages.reconstruct import load_result

from conftest import run_entry

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from seeing.data.scenes import CLASS_NAMES
    from seeing.segmenters.scenes import SceneSegmenterNet, make_weights_file

    path = tmp_path_factory.mktemp("identity") / "segmenter.pt"
    torch.manual_seed(0)
    torch.save(make_weights_file(SceneSegmenterNet(len(CLASS_NAMES), (4, 8)), CLASS_NAMES), path)
    return path


def test_a_steps_sweep_keeps_both_results_and_the_ablation_keeps_them_apart(tiny_gan_files, segmenter, tmp_path,
                                                                            compose):
    gen, _ = tiny_gan_files
    runs = tmp_path / "runs"
    args = ["stage=reconstruct", "variant=a", "stage.targets.count=2", "stage.batch_size=2", f"model.checkpoint={gen}",
            f"paths.run_root={runs}", "logger=csv", *QUIET]
    run_entry("train", ["-m", *args, "stage.steps=1,3"], tmp_path)
    model_runs = runs / "scenes_progan-tiny_progan"
    folders = sorted(p for p in model_runs.iterdir() if p.name.startswith("reconstruct_real_a"))
    assert len(folders) == 2, [p.name for p in folders]
    for steps in (1, 3):
        (folder,) = [f for f in folders if f"+steps:{steps}" in f.name]
        result = load_result(folder / "reconstruction.pt")
        assert result["loss_curves"].shape == (2, steps)  # its own steps, not the other job's
        assert result["provenance"]["config"]["stage.steps"] == steps
        record = json.loads((folder / "identity.json").read_text())
        assert record["status"] == "complete" and record["config"]["stage.steps"] == steps
        assert record["changed"]["stage.steps"] == steps and folder.name.endswith("@" + record["identity"][:8])
        assert any(i["role"] == "generator checkpoint" and i["path"] == str(gen) for i in record["inputs"])

    # the same settings again: complete, named, nothing redone
    again = run_entry("train", [*args, "stage.steps=3"], tmp_path)
    assert "already complete with these settings" in again.stdout and "force=true" in again.stdout

    # the ablation table takes one setting: two are refused, naming each and the override that picks it
    ablation = ["metric=ablation", f"segmenter.path={segmenter}", f"model.checkpoint={gen}", "logger=csv",
                f"metric.runs_dir={model_runs}"]
    with pytest.raises(ValueError, match=r"(?s)different settings.*stage\.steps.*metric\.settings=") as refused:
        evaluate(compose("evaluate", ablation))
    assert "metric.mix=true" in str(refused.value)
    rows = evaluate(compose("evaluate", [*ablation, "metric.settings={stage.steps:3}"]))
    assert [(r["variant"], r["steps"]) for r in rows] == [("a", 3)] and "stage.steps=3" in rows[0]["settings"]
    assert "+steps:3" in Path(rows[0]["run"]).name


def test_a_smaller_evaluate_run_leaves_a_larger_report_alone(tiny_gan_files, segmenter, compose):
    gen, hybrid = tiny_gan_files
    common = ["metric=reconstruction", f"model.checkpoint={gen}", f"stage.hybrid_file={hybrid}",
              f"segmenter.path={segmenter}", "logger=csv", "metric.fsd_report=null", *QUIET]
    larger = compose("evaluate", [*common, "stage.steps=4", "stage.targets.count=4"])
    evaluate(larger)
    report = Path(larger.output_dir) / "reconstruction.json"
    before = report.read_bytes()
    smaller = compose("evaluate", [*common, "stage.steps=2", "stage.targets.count=2"])
    evaluate(smaller)
    assert Path(smaller.output_dir) != Path(larger.output_dir)
    assert report.read_bytes() == before  # untouched
    mine = json.loads((Path(smaller.output_dir) / "reconstruction.json").read_text())
    assert mine["provenance"]["config"]["stage.steps"] == 2
    assert mine["provenance"]["config"]["stage.targets.count"] == 2


def test_samples_then_folder_fsd_counts_exactly_the_samples(tiny_gan_files, segmenter, compose):
    gen, _ = tiny_gan_files
    samples = compose("evaluate", ["metric=samples", "metric.n=5", "metric.batch_size=4", "logger=wandb",
                                   f"model.checkpoint={gen}"])
    evaluate(samples)
    images = Path(samples.output_dir) / "images"
    assert len(list(images.glob("*.png"))) == 5
    assert list(Path(samples.output_dir).rglob("wandb/offline-run-*")), "W&B logs beside the images"
    assert not list(images.rglob("wandb")), "no logger writes inside the images folder"
    report = evaluate(compose("evaluate", ["metric=fsd", "real=scenes", "fake=folder", f"fake.path={images}",
                                           f"segmenter.path={segmenter}", "metric.n=5", "metric.resolution=16",
                                           "metric.real_baseline=false", "logger=csv"]))
    assert report["fake"]["images"] == 5 and report["fake"]["skipped"] == 0


def test_an_optuna_search_gives_each_trial_its_folder_and_prints_the_best(tiny_gan_files, tmp_path):
    gen, _ = tiny_gan_files
    runs = tmp_path / "runs"
    done = run_entry("train", ["-m", "hparams_search=reconstruct_optuna", "hydra.sweeper.n_trials=2",
                               "stage.steps=choice(1,2)", "variant=a", "stage.targets.count=2", "stage.batch_size=2",
                               f"model.checkpoint={gen}", f"paths.run_root={runs}", "logger=csv", *QUIET], tmp_path)
    trials = [json.loads(line) for line in next((runs / "multirun").rglob("trials.jsonl")).read_text().splitlines()]
    assert len(trials) == 2 and len({t["folder"] for t in trials}) == 2  # every trial its own identity
    for t in trials:
        record = json.loads((Path(t["folder"]) / "identity.json").read_text())
        assert record["status"] == "complete" and record["metrics"]["final/pixel_l1"] == pytest.approx(t["objective"])
    best = min(trials, key=lambda t: t["objective"])
    assert f"[search] its folder: {best['folder']}" in done.stdout
