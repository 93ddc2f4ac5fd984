"""What ``train.py`` and ``evaluate.py`` wrap around Hydra.

- :func:`run` calls the entry point's ``@hydra.main`` function. An expected mistake
  (:func:`seeing.errors.mistake_message`: a bad choice, key, number or file) is printed as one
  line, ``Error: ...``, and the process exits with status 2, whether Hydra met it while composing
  the config, while resolving the run's folder, or the run met it before any work. Other errors
  keep their traceback. ``SEEING_DEBUG=1`` (or ``HYDRA_FULL_ERROR=1``) shows the traceback of a
  mistake too.
- :func:`task` is the body of that function: it validates the config
  (:func:`seeing.validation.validate`) and only then imports the pipeline (torch, Lightning), so a
  mistake in the command line is reported in about a second, and ``--help`` prints at once; it runs
  the pipeline, and on a mistake removes the run folder Hydra made for it when it
  holds nothing but Hydra's own files.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from seeing.errors import EXIT_STATUS, StopBeforeWork, mistake_message

# set when this module, not the person, turned HYDRA_FULL_ERROR on (so that Hydra hands errors to
# :func:`run` instead of printing them); child processes inherit both and stay non-debugging
_WE_SET_FULL_ERROR = "SEEING_SET_HYDRA_FULL_ERROR"


def debugging() -> bool:
    """Tracebacks wanted: ``SEEING_DEBUG=1``, or ``HYDRA_FULL_ERROR=1`` set by the person."""
    if os.environ.get("SEEING_DEBUG", "") not in ("", "0"):
        return True
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_WE_SET_FULL_ERROR) != "1"


def run(main: Callable[[], Any]) -> None:
    """Call ``main`` (a ``@hydra.main`` function); a mistake becomes one line and exit status 2."""
    debug = debugging()
    if os.environ.get("HYDRA_FULL_ERROR") != "1":  # Hydra then re-raises instead of printing
        os.environ["HYDRA_FULL_ERROR"] = "1"
        os.environ[_WE_SET_FULL_ERROR] = "1"
    try:
        main()
    except StopBeforeWork as stop:
        if debug:
            raise stop.error from None
        print(f"Error: {stop.code}", file=sys.stderr)
        sys.exit(EXIT_STATUS)
    except Exception as err:  # noqa: BLE001 - a bug is re-raised as it came
        message = None if debug else mistake_message(err)
        if message is None:
            raise
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(EXIT_STATUS)


def task(entry: str, cfg: Any) -> Any:
    """``seeing.pipeline.train(cfg)`` or ``evaluate(cfg)``; see the module docstring."""
    try:
        from seeing.validation import validate

        validate(cfg)  # before importing torch and Lightning (seconds): a mistake is reported at once
        from seeing import pipeline

        return getattr(pipeline, entry)(cfg)
    except Exception as err:
        if mistake_message(err) is None:
            raise
        single = _single_run_folder()
        if single is not None:
            remove_unused_run_folder(single, cfg)
            if not debugging():  # one run: no "Error executing job with overrides" line from Hydra
                raise StopBeforeWork(err) from err
        raise


def _single_run_folder() -> Path | None:
    """The folder Hydra made for this run when it is a single run (None in a multirun, whose
    folders are Hydra's records of the grid)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(hc.runtime.output_dir) if hc.mode == RunMode.RUN else None
    except (ValueError, AttributeError):
        return None


def remove_unused_run_folder(folder: Path, cfg: Any) -> None:
    """A run stopped by a mistake before it claimed its folder leaves none behind: ``folder`` is
    removed when it holds only what Hydra writes at start (``.hydra/``, the log), then its parents
    that are left empty, up to ``paths.run_root``."""
    from seeing.identity import folder_is_free

    if not folder.is_dir() or not folder_is_free(folder):
        return
    shutil.rmtree(folder, ignore_errors=True)
    try:
        root = Path(str(cfg.paths.run_root)).resolve()
    except Exception:  # noqa: BLE001 - an unresolvable root: leave the parents alone
        return
    parent = folder.resolve().parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()  # only an empty folder goes
        except OSError:
            break
        parent = parent.parent
