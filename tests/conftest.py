"""Shared test fixtures: Hydra composition against the repo's own conf/, offline W&B."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import seeing.config  # noqa: F401 - registers the resolvers the YAML files use

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


# Overrides that make a Lightning stage a quick CPU run in tests: CSV logs, no progress bar
# or model summary.
QUICK_TRAIN = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def compose_config(config_name: str, overrides: list[str], run_root: Path | None = None):
    """Compose ``conf/<config_name>.yaml`` as the entry points do (with the hydra node, so
    ``${hydra:...}`` interpolations resolve) and point every output at ``run_root``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    extra = [f"paths.run_root={run_root}", f"paths.cache_dir={run_root}/cache"] if run_root else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=extra + list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests run tiny models on a shared 2-core machine: extra intra-op threads only add
    OpenMP contention (it made some tests 20x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose(tmp_path):
    """``compose("train", ["stage=layer1", ...])`` with outputs under the test's tmp dir."""

    def _compose(config_name: str, overrides: list[str] | None = None):
        return compose_config(config_name, overrides or [], run_root=tmp_path / "runs")

    return _compose


class Interrupted(RuntimeError):
    """What :class:`InterruptAt` raises: a run cut off (a crash, a killed job) before it ended."""


class InterruptAt:
    """A Lightning callback that cuts a run off when it reaches ``step`` (added with
    ``+callbacks.interrupt={_target_: conftest.InterruptAt, step: N}``; callbacks are not part
    of a run's identity, so the rerun without it is the same run)."""

    def __new__(cls, step: int):
        import pytorch_lightning as pl

        class _Interrupt(pl.Callback):
            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step >= step:
                    raise Interrupted(f"cut off at step {trainer.global_step}")

        return _Interrupt()


def run_folder(parent: Path, name: str) -> Path:
    """The one output folder of ``name`` under ``parent``: ``name`` itself for a preset's run, else
    ``name+<what changed>@<digest>`` (seeing.identity)."""
    found = [p for p in Path(parent).iterdir() if p.name == name or p.name.startswith((f"{name}+", f"{name}@"))]
    assert len(found) == 1, f"expected one folder of {name} in {parent}, found {[p.name for p in found]}"
    return found[0]


def run_entry(script: str, args: list[str], cwd: Path, check: bool = True):
    """``python <script>.py <args>`` (train or evaluate) in a subprocess, as a user runs it: W&B offline,
    one torch thread. With ``check``, a non-zero exit fails the test showing the end of stderr."""
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "offline", "SEEING_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / f"{script}.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="session")
def tiny_gan_files(tmp_path_factory):
    """A random 16x16 ProGAN in the project's generator file format and a random hybrid encoder for it."""
    import torch

    from seeing.gans import ProGANGenerator, save_generator
    from seeing.models.hybrid import new_hybrid_encoder
    from seeing.reporting import torch_save_atomic

    root = tmp_path_factory.mktemp("tiny_gan")
    torch.manual_seed(0)
    g = ProGANGenerator(z_dim=16, widths=[16, 16, 8])
    gen = save_generator(g, root / "tiny_progan.pt", meta={"z_dim": 16, "widths": [16, 16, 8]})
    hybrid = torch_save_atomic(new_hybrid_encoder(g, ["layer1", "layer2", "layer3", "layer4"]).to_file_dict(),
                               root / "hybrid.pt")
    return gen, hybrid


def vgg_by_hand(state: dict, h):
    """torchvision's VGG-16 conv / ReLU / max-pool stack up to relu4_2 (features[:21]), written out from
    a state dict: what the perceptual loss must compute."""
    import torch

    for i in range(21):
        if f"features.{i}.weight" in state:
            h = torch.nn.functional.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1)
        elif i in (4, 9, 16):
            h = torch.nn.functional.max_pool2d(h, 2)
        else:
            h = torch.relu(h)
    return h
