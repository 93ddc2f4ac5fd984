"""``python evaluate.py metric=samples n=10000``: write generator samples to an image folder.

Sample ``k`` is ``generator(sample_z(n, seed)[k])`` saved as ``<path>/<k:06d>.png``, so a
folder is a deterministic function of (generator, seed) and any tool that reads image
folders (``fake=folder``, the paper's FSD scripts) can use it. Re-running skips files that
already exist, so an interrupted job resumes; each file is written to a temporary name and
renamed, so a killed job never leaves a truncated PNG behind. ``samples.json`` records
what made the folder; asking for a different generator or seed in the same folder is
refused rather than mixing two sample sets.
"""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from seeing.reporting import WandbReport, to_uint8, write_bytes_atomic, write_json

log = logging.getLogger(__name__)

MANIFEST = "samples.json"


def sample_name(index: int) -> str:
    return f"{index:06d}.png"


def _save_png(image: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def sample_grid(folder: Path, count: int) -> np.ndarray:
    """The first ``count`` samples of ``folder`` as one image grid (H x W x 3 uint8), for W&B."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.utils import make_grid

    images = [pil_to_tensor(Image.open(folder / sample_name(i)).convert("RGB"))
              for i in range(count) if (folder / sample_name(i)).is_file()]
    return make_grid(torch.stack(images), nrow=8, padding=2).permute(1, 2, 0).numpy()


def _identity(cfg: DictConfig, generator) -> dict[str, Any]:
    """What the folder's images are a function of: the weights themselves (``checkpoint: null``
    names a packaged asset, whose replacement no config change would show) and the seed."""
    from seeing.state_dicts import fingerprint

    return {
        "model": cfg.model.get("name"),
        "weights_sha256": fingerprint(generator),
        "seed": int(cfg.metric.seed),
    }


def write_samples(generator, path: str | Path, n: int, seed: int, batch_size: int = 100,
                  device: torch.device | str = "cpu", progress: bool = True) -> dict[str, int]:
    """Write samples ``0..n-1`` of ``generator`` for ``seed`` under ``path``; skip existing files."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    missing = [k for k in range(n) if not (out / sample_name(k)).is_file()]
    counts = {"requested": n, "existing": n - len(missing), "written": 0}
    if not missing:
        return counts
    generator = generator.to(device).eval()
    z_all = generator.sample_z(n, seed)  # latent k depends only on (seed, k)

    from seeing.progress import progress as progress_bar

    with progress_bar(n, f"samples -> {out}", initial=counts["existing"], enabled=progress) as bar:
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            with torch.no_grad():
                images = to_uint8(generator(z_all[chunk].to(device)))
            for k, image in zip(chunk, images):
                _save_png(image, out / sample_name(k))
            counts["written"] += len(chunk)
            bar.update(len(chunk))
    return counts


def run(cfg: DictConfig) -> dict[str, Any]:
    from seeing.data.sources import instantiate_unwrapped
    from seeing.devices import resolve_device
    from seeing.provenance import current

    m = cfg.metric
    out = Path(m.path)
    started = time.perf_counter()
    generator = instantiate_unwrapped(cfg.model.generator)
    identity = _identity(cfg, generator)
    manifest = out / MANIFEST
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("identity") != json.loads(json.dumps(identity)):
            raise ValueError(
                f"{out} already holds samples of another generator or seed (see {manifest}); "
                f"delete the folder or choose metric.path=<another folder>"
            )
    elif out.is_dir() and any(out.glob("*.png")):
        raise ValueError(f"{out} holds PNG files but no {MANIFEST}: not a samples folder this job wrote; "
                         f"choose metric.path=<another folder>")
    # claim the folder before writing, so an interrupted run resumes only with the same identity
    write_json(manifest, {"identity": identity, "complete": False})
    device = resolve_device(cfg.get("device", "auto"))
    counts = write_samples(generator, out, int(m.n), int(m.seed), int(m.batch_size), device,
                           bool(m.get("progress", True)))
    result = {
        "path": str(out.resolve()),
        "identity": identity,
        "resolution": int(generator.resolution),
        "checkpoint_meta": getattr(generator, "checkpoint_meta", {}),
        "provenance": current(),
        **counts,
        "complete": True,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(manifest, result)
    log.info("samples: %d written, %d already there, in %s", counts["written"], counts["existing"], out)

    report = WandbReport(cfg, job_type="samples")
    report.log_metrics({"samples/written": counts["written"], "samples/existing": counts["existing"]})
    report.log_image("samples/grid", sample_grid(out, min(64, int(m.n))))
    report.finish()
    return result
