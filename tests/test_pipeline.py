from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seeing.pipeline import resolve_ckpt_path, train


def test_stage_outputs_follow_the_run_root_convention(compose, tmp_path):
    cfg = compose("train", ["stage=segmenter", "logger=csv"])
    assert Path(cfg.output_dir) == tmp_path / "runs" / cfg.model.id / cfg.stage.name


def test_wandb_logger_is_offline_by_default(compose):
    cfg = compose("train", ["stage=segmenter"])
    assert cfg.logger.wandb.offline is True


def test_ckpt_path_last_resumes_only_when_present(tmp_path):
    cfg = OmegaConf.create({"ckpt_path": "last", "output_dir": str(tmp_path)})
    assert resolve_ckpt_path(cfg) is None
    (tmp_path / "checkpoints").mkdir()
    import torch

    torch.save({"state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(cfg) == str(tmp_path / "checkpoints" / "last.ckpt")


def test_missing_explicit_checkpoint_errors(tmp_path):
    cfg = OmegaConf.create({"ckpt_path": str(tmp_path / "nope.ckpt"), "output_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        resolve_ckpt_path(cfg)


def test_unset_checkpoint_names_the_override_to_add(compose):
    cfg = compose("train", ["model=progan", "stage=layer3", "logger=csv"])
    with pytest.raises(ValueError, match=r"model\.checkpoint=/path/to/weights\.pth"):
        train(cfg)
