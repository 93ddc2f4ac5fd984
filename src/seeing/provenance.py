"""What made a result: the record every output folder, exported file and report carries.

:func:`provenance` is the run's identity record (:mod:`seeing.identity`: digest, settings, what
differs from the preset) plus the input files the run read, the seed, the package version and,
when run from a git checkout, the commit. Input files are recorded where they are read
(:func:`record_input`, called by the loaders): path, size, sha256 and, for a file one of this
project's runs wrote, that file's own identity.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Mapping

_INPUTS: dict[str, dict[str, Any]] = {}
_SHA256: dict[tuple, str] = {}


def sha256_of(path: str | Path) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) in this process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def file_identity(path: Path, obj: Any = None) -> str | None:
    """The identity of the run that wrote ``path``: stored in the file (``meta.provenance`` or
    ``provenance``), else in the ``identity.json`` of its folder; None for files from elsewhere."""
    for holder in (obj.get("meta") if isinstance(obj, Mapping) else None, obj):
        if isinstance(holder, Mapping) and isinstance(holder.get("provenance"), Mapping):
            return holder["provenance"].get("identity")
    from seeing.identity import read_identity_file

    return (read_identity_file(Path(path).parent) or {}).get("identity")


def record_input(path: str | Path, role: str, obj: Any = None) -> dict[str, Any]:
    """Note that this run read ``path`` as ``role`` (e.g. "hybrid file", "generator checkpoint")."""
    path = Path(path)
    entry = {"role": role, "path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_of(path),
             "identity": file_identity(path, obj)}
    _INPUTS[entry["path"]] = entry
    return entry


def inputs() -> list[dict[str, Any]]:
    return list(_INPUTS.values())


def reset_inputs() -> None:
    """A new run starts (the entry points call this): nothing read yet."""
    _INPUTS.clear()


def git_commit(start: str | Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the checkout this package runs from, or None outside one."""
    here = Path(start or __file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


_GIT: list[dict[str, Any] | None] = []


def provenance(identity: Any, seed: Any = None) -> dict[str, Any]:
    """The record exported files and reports carry (see the module docstring)."""
    import seeing

    if not _GIT:
        _GIT.append(git_commit())
    return {**identity.record(), "inputs": inputs(), "seed": seed, "seeing_version": seeing.__version__,
            "git": _GIT[0], "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write_identity_file(folder: str | Path, record: Mapping[str, Any]) -> Path:
    from seeing.identity import IDENTITY_FILE
    from seeing.reporting import write_json

    return write_json(Path(folder) / IDENTITY_FILE, dict(record))


def describe(record: Mapping[str, Any]) -> str:
    """One line: the folder and what its settings change from the preset."""
    changed = record.get("changed") or {}
    what = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in changed.items())
    return f"{record.get('folder', '?')} ({what or 'the preset'})"




# ------------------------------------------------------------------------------ the run in progress
_CURRENT: dict[str, Any] = {}


def start_run(identity: Any, seed: Any = None) -> dict[str, Any]:
    """A run of ``identity`` begins: its folder gets identity.json (``status: running``) before
    any work, and :func:`current` gives its provenance to whatever it writes (the inputs read since
    :func:`reset_inputs`, which the entry points call first)."""
    _CURRENT.clear()
    _CURRENT.update(identity=identity, seed=seed)
    record = {**provenance(identity, seed), "status": "running"}
    if is_rank_zero():
        write_identity_file(identity.folder, record)
    return record


def is_rank_zero() -> bool:
    """Process 0 of a distributed run (or the only process): the one that writes records."""
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def current() -> dict[str, Any] | None:
    """The provenance of the run in progress (None outside one)."""
    return provenance(_CURRENT["identity"], _CURRENT.get("seed")) if _CURRENT else None


def for_logs() -> dict[str, Any] | None:
    """The provenance a W&B run's config gets at the end of the run (its settings are already
    there): the identity digest, folder and changes, every input file read, seed, version, commit."""
    record = current()
    if record is None:
        return None
    keep = ("identity", "folder", "changed", "inputs", "seed", "seeing_version", "git")
    return {k: record[k] for k in keep if k in record}


def finish_run(outputs: list[str], metrics: Mapping[str, float], summary: str = "") -> dict[str, Any] | None:
    """The run ended well: identity.json says complete, with its inputs, outputs and numbers."""
    if not _CURRENT:
        return None
    record = {**current(), "status": "complete", "outputs": sorted(outputs), "metrics": dict(metrics),
              "summary": summary}
    if is_rank_zero():
        write_identity_file(_CURRENT["identity"].folder, record)
    _CURRENT.clear()
    return record


def completed_record(identity: Any) -> dict[str, Any] | None:
    """identity.json of ``identity``'s folder when it says that very identity completed there."""
    from seeing.identity import read_identity_file

    record = read_identity_file(identity.folder)
    if record and record.get("identity") == identity.digest and record.get("status") == "complete":
        return record
    return None


def changed_inputs(record: Mapping[str, Any]) -> list[str]:
    """The input files of a finished run that are gone or hold other bytes now: its result is stale."""
    changed = []
    for entry in record.get("inputs") or []:
        path = Path(entry["path"])
        if not path.is_file() or sha256_of(path) != entry.get("sha256"):
            changed.append(f"{entry.get('role', 'input')} {path}")
    return changed
