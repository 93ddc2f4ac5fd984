"""Sweeps through Hydra's launchers (the `launchers` extra, which `dev` includes): the SLURM
preset composed against the trainer and written out as the sbatch script submitit would submit,
and real `evaluate.py -m` grids through the joblib and submitit-local launchers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from omegaconf.errors import MissingMandatoryValue

from conftest import REPO, compose_config, run_folder

# the grid of the README's launcher commands, small: oracle labels, 20 images a side
FSD_GRID = ["metric=fsd", "metric.oracle=true", "fake=scenes,scenes_drop", "metric.n=20", "metric.batch_size=10",
            "logger=csv"]


def launcher_of(cfg):
    """The launcher Hydra would build for a multirun of ``cfg`` (composed with its hydra node)."""
    return hydra.utils.instantiate(cfg.hydra.launcher)


def compose_with_hydra(overrides: list[str], run_root: Path):
    """``compose_config`` keeps the hydra node here: the launcher config lives in it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.run_root={run_root}"] + overrides,
                       return_hydra_config=True)


# ------------------------------------------------------------------------------ SLURM preset
def test_slurm_trainer_sizes_the_launcher_and_resumes(tmp_path):
    cfg = compose_with_hydra(["trainer=slurm", "trainer.devices=4", "trainer.num_nodes=2"], tmp_path)
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    launcher = launcher_of(cfg)
    assert type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    assert (p["tasks_per_node"], p["gpus_per_node"], p["nodes"]) == (4, 4, 2)
    assert p["max_num_timeout"] > 0 and p["timeout_min"] > 0 and 0 < p["signal_delay_s"] <= 600
    assert p["partition"] is None  # the cluster's default unless hydra.launcher.partition= says otherwise
    # DDP on exactly that many devices and nodes, and a requeued job resumes its stage
    assert (cfg.trainer.strategy, cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes) == (
        "ddp", "gpu", 4, 2)
    assert cfg.ckpt_path == "last"


def test_slurm_launcher_with_ddp_trainer(tmp_path):
    """hydra/launcher=slurm on its own follows any trainer; only trainer=slurm adds the resume."""
    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
                             tmp_path)
    p = launcher_of(cfg).params
    assert (p["tasks_per_node"], p["gpus_per_node"], p["nodes"]) == (4, 4, 2)
    assert cfg.ckpt_path is None
    p = launcher_of(compose_with_hydra(["hydra/launcher=slurm", "trainer=gpu"], tmp_path)).params
    assert (p["tasks_per_node"], p["gpus_per_node"], p["nodes"]) == (1, 1, 1)


def test_ddp_needs_a_device_count(tmp_path):
    """trainer=ddp has no "all visible GPUs" (-1) default: sbatch needs a count. Without one the
    launcher cannot be built, and a single run stops before any work, naming the setting."""
    from seeing.config import check_config

    cfg = compose_with_hydra(["trainer=slurm"], tmp_path)
    with pytest.raises(Exception) as err:
        launcher_of(cfg)
    assert isinstance(err.value, MissingMandatoryValue) or isinstance(err.value.__cause__, MissingMandatoryValue)
    cfg = compose_config("train", ["trainer=ddp"], run_root=tmp_path)
    with pytest.raises(ValueError, match=r"missing required settings: trainer\.devices"):
        check_config(cfg, [k for k in cfg.keys() if k != "model"])


def test_slurm_sbatch_script(tmp_path, monkeypatch):
    """The script submitit hands to sbatch for trainer=slurm (srun and sbatch faked: the fake
    sbatch keeps the script and refuses the job, so nothing waits for a cluster)."""
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {script}\necho 'no cluster here' >&2\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    cfg = compose_with_hydra(["trainer=slurm", "trainer.devices=4", "trainer.num_nodes=2",
                              "hydra.launcher.partition=gpu"], tmp_path / "runs")
    launcher = launcher_of(cfg)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Exception, match="no cluster here"):
        launcher.launch([["stage=layer1"]], initial_job_idx=0)
    lines = set(script.read_text().splitlines())
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240",
                 "--signal=USR2@120", "--requeue"):
        assert f"#SBATCH {flag}" in lines, flag
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    # the pickled job that srun runs: what submitit's USR2 handler reads to requeue it, and the
    # resubmission it requeues (the launcher's checkpoint(): the same overrides, so with
    # ckpt_path=last the rerun resumes the stage)
    from submitit.core.utils import DelayedSubmission

    (pickled,) = (tmp_path / "runs" / "multirun").glob("*/.submitit/*.pkl")
    job = DelayedSubmission.load(pickled)
    assert (job._timeout_min, job._timeout_countdown) == (240, 6)
    assert job.function.checkpoint(*job.args, **job.kwargs).args[0] == ["stage=layer1"]


# ------------------------------------------------------------------------------ real sweeps
# Both grids start together (each is mostly Python start-up: the parent and one process per job
# import torch and Lightning), so the pair takes about as long as one of them run alone.
LAUNCHERS = {"joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
             "submitit_local": ["hydra/launcher=submitit_local"]}


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    env = dict(os.environ, SEEING_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    started = {}
    for name, overrides in LAUNCHERS.items():
        root = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(REPO / "evaluate.py"), "-m", *overrides, *FSD_GRID,
               f"paths.run_root={root}/runs", f"paths.cache_dir={root}/cache"]
        with open(root / "output.txt", "w") as log:  # a file, not a pipe nobody reads yet
            started[name] = (subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), root)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished_grid(grids, name: str) -> tuple[str, Path]:
    proc, root = grids[name]
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    output = (root / "output.txt").read_text()
    assert proc.returncode == 0, f"{name} grid: exit {proc.returncode}\n{output[-6000:]}"
    for fake, dropped in (("scenes", []), ("scenes_drop", ["person"])):
        out = run_folder(root / "runs" / "eval" / "fsd", f"scenes_vs_{fake}") / "fsd.json"
        assert out.is_file(), f"{out} missing:\n{output[-3000:]}"
        report = json.loads(out.read_text())
        assert report["fake"]["identity"]["drop"] == dropped and report["n"] == 20 and report["fsd"] > 0
    return output, root


@pytest.mark.slow
def test_joblib_grid(grids):
    output, _ = finished_grid(grids, "joblib")
    assert "Joblib.Parallel(n_jobs=2" in output


@pytest.mark.slow
def test_submitit_local_grid(grids):
    _, root = finished_grid(grids, "submitit_local")
    # each job ran in its own submitit process, with its logs under the sweep folder
    assert len(list((root / "runs" / "multirun").glob("*/.submitit/*/*_log.out"))) == 2
