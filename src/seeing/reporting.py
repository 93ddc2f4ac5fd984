"""Files people look at (JSON, CSV, PNG) and their W&B mirror, written atomically.

Every report in the project goes through these helpers, so a killed run never
leaves a half-written table or cache behind, and every table and figure that
lands on disk is also logged to W&B (offline unless configured otherwise).
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig


_UMASK_LOCK = threading.Lock()
# a full disk or quota: what to do differs from a permissions problem
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux:
    /proc/self/status); elsewhere set and restored under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    killed run never leaves half a file. The file gets the mode a plain ``open`` would give it
    (0o666 less the umask; mkstemp's own 0o600 would hide shared caches from the group). Any
    OSError names ``path``; a full disk (ENOSPC, EDQUOT) also says what to do."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            hint = (" (no space left: free space on that disk, or point paths.cache_dir / the output "
                    "directory at another one)" if e.errno in _NO_SPACE else "")
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}{hint}") from e
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    write_bytes_atomic(Path(path), (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())
    return Path(path)


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    write_bytes_atomic(Path(path), buf.getvalue().encode())
    return Path(path)


def write_markdown_table(path: str | Path, rows: Sequence[Mapping[str, Any]], floatfmt: str = ".4f") -> Path:
    def fmt(v: Any) -> str:  # None (not measured) is a blank cell
        return "" if v is None else format(v, floatfmt) if isinstance(v, float) else str(v)

    cols = list(rows[0].keys()) if rows else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    write_bytes_atomic(Path(path), ("\n".join(lines) + "\n").encode())
    return Path(path)


def torch_save_atomic(obj: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(Path(path), buf.getvalue())
    return Path(path)


def load_torch_file(path: str | Path, what: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU. Whatever goes wrong reading the file
    (truncated copy, a text file, a pickle that is not weights-only) is one ValueError naming
    the path, saying it is not a readable PyTorch checkpoint, and ``fix`` (what to do)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}. {fix}")
    try:
        with warnings.catch_warnings():
            # torch notes a pickle protocol above 2 before it reads (or refuses) the file; what is
            # wrong with such a file is the error below, the note is noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises OSError, KeyError, RuntimeError, UnpicklingError...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = reason.split(". ")[0][:160]  # torch's own advice runs on for lines
        raise ValueError(f"{path} ({path.stat().st_size} bytes) is not a readable PyTorch checkpoint: the {what} "
                         f"is truncated, damaged or of another kind ({type(err).__name__}: {reason}). "
                         f"{fix}") from err
    from seeing.provenance import record_input

    record_input(path, what, obj)  # the run's provenance lists every file it read
    return obj


def load_format_file(path: str | Path, fmt: str, what: str, fix: str | None = None) -> dict[str, Any]:
    """Read one of the project's own ``{"format": fmt, ...}`` torch files (weights only), with
    errors that say which file was expected, what was found instead, and ``fix``: what to do
    (re-run the command that writes it, or point the option at the right file)."""
    path = Path(path)
    fix = fix or f"Re-copy it, or point at the right {what} file."
    obj = load_torch_file(path, what, fix)
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else None
        raise ValueError(f"{path} is not a {fmt} file (format={found!r}). {fix}")
    return obj


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W in [-1, 1] -> N x H x W x 3 uint8 (the one conversion for PNGs and figures)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())
    return Path(path)


def _jsonable(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.tolist()
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")


class WandbReport:
    """A W&B run for an evaluation job (training jobs use seeing.loggers.WandbLogger, Lightning's).

    Opened only when the composed ``logger`` group has a ``wandb`` entry; offline by
    default. All methods are no-ops when W&B is off, so callers never branch.
    """

    def __init__(self, cfg: DictConfig | None, job_type: str):
        self.run = None
        wcfg = (cfg.get("logger") or {}).get("wandb") if cfg is not None else None
        if not wcfg:
            return
        import wandb

        from seeing.config import resolved, run_identity

        self._wandb = wandb
        identity = run_identity(cfg)
        self.run = wandb.init(
            project=wcfg.get("project", "seeing"),
            name=identity["name"],
            group=identity["group"],
            dir=str(wcfg.get("save_dir", ".")),
            mode="offline" if wcfg.get("offline", True) else "online",
            job_type=job_type,
            config=resolved(cfg),
            reinit="finish_previous",
        )

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        if self.run is not None:
            self.run.log(dict(metrics))

    def log_image(self, key: str, image: str | Path | np.ndarray) -> None:
        """A PNG file, or an H x W x 3 uint8 array."""
        if self.run is not None:
            self.run.log({key: self._wandb.Image(image if isinstance(image, np.ndarray) else str(image))})

    def log_image_table(self, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """A table whose array cells (H x W x 3 uint8) are shown as images."""
        if self.run is not None and rows:
            cols = list(rows[0].keys())
            cell = lambda v: self._wandb.Image(v) if isinstance(v, np.ndarray) else v  # noqa: E731
            self.run.log({key: self._wandb.Table(columns=cols, data=[[cell(r[c]) for c in cols] for r in rows])})

    def log_table(self, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.run is not None and rows:
            cols = list(rows[0].keys())
            self.run.log({key: self._wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})

    def finish(self) -> None:
        if self.run is not None:
            from seeing.provenance import for_logs

            record = for_logs()
            if record is not None:  # the inputs are known only now that the report has read them
                self.run.config.update({"provenance": record}, allow_val_change=True)
            self.run.finish()
            self.run = None
