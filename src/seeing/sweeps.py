"""What a hyperparameter search leaves behind: every trial's folder and objective, and the best one.

Hydra's Optuna sweeper records the best parameters (``optimization_results.yaml`` in the sweep
folder); the best *folder* is what a user opens next, so :class:`BestTrial` (a Hydra callback of the
``hparams_search`` presets) writes each finished trial to ``trials.jsonl`` in the sweep folder and
prints the best trial's folder when the search ends.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def _ledger(config: DictConfig) -> Path:
    return Path(config.hydra.sweep.dir) / "trials.jsonl"


class BestTrial(Callback):
    """Record (folder, objective, overrides) per trial; print the best (lowest) trial's folder."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        value = getattr(job_return, "_return_value", None)
        if not isinstance(value, (int, float)):
            return  # a failed trial, or a run without optimized_metric: nothing to rank
        entry = {"folder": str(config.output_dir), "objective": float(value),
                 "metric": config.get("optimized_metric"), "overrides": list(config.hydra.overrides.task)}
        ledger = _ledger(config)
        ledger.parent.mkdir(parents=True, exist_ok=True)
        with open(ledger, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        ledger = _ledger(config)
        if not ledger.is_file():
            print("[search] no trial returned an objective (set optimized_metric to a metric the stage logs)")
            return
        trials = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
        finite = [t for t in trials if math.isfinite(t["objective"])]
        if not finite:
            print(f"[search] {len(trials)} trials, none with a finite objective; see {ledger}")
            return
        best = min(finite, key=lambda t: t["objective"])
        print(f"[search] best of {len(trials)} trials: {best['metric']} = {best['objective']:.6g} "
              f"({' '.join(best['overrides'])})\n[search] its folder: {best['folder']}\n[search] every trial: {ledger}")
