"""Which reconstruct runs an ablation table is made of.

Every ``stage=reconstruct`` run of a model lives in its own folder under ``<runs_dir>``
(``reconstruct_<kind>_<variant>`` for the preset, ``reconstruct_<kind>_<variant>+<changes>@<digest>``
otherwise; :mod:`seeing.identity`), with an ``identity.json`` saying what it changed from its
variant's preset. Runs of one kind whose changes are the same are one *group*: the rows of one
table must come from one group, since a table that puts 500-step and 3000-step runs, or other
photos, side by side compares settings, not variants.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from seeing.identity import IDENTITY_FILE, read_identity_file

log = logging.getLogger(__name__)

# differences that come with the kind of targets, not with the settings of a group
_KIND_KEYS = ("stage.name", "stage.targets.kind")
_SOURCE_KEYS = ("stage.targets.source", "real")


@dataclass
class ReconstructRun:
    kind: str
    variant: str
    folder: Path
    record: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return settings_label(self.settings)


def settings_of(kind: str, changed: Mapping[str, Any]) -> dict[str, Any]:
    """What a run changed from its variant's preset, less what every run of its kind changes
    (its name and kind; for generated targets, the photos they do not read)."""
    out = {}
    for key, value in changed.items():
        if key.startswith(_KIND_KEYS) or (kind == "generated" and key.startswith(_SOURCE_KEYS)):
            continue
        out[key] = value
    return out


def settings_label(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "the preset"


def settings_override(settings: Mapping[str, Any]) -> str:
    """The ``metric.settings=`` override that picks a group."""
    body = ",".join(f"{k}:{json.dumps(v)}" for k, v in settings.items())
    return f"'metric.settings={{{body}}}'"


def find_runs(runs_dir: Path, kinds: Sequence[str], variants: Sequence[str], result_file: str) -> list[ReconstructRun]:
    """Every finished reconstruct run of ``kinds`` x ``variants`` under ``runs_dir``. Folders
    without an identity record (made by an older seeing) are skipped, counted and logged."""
    runs, unrecorded = [], []
    for kind in kinds:
        for variant in variants:
            name = f"reconstruct_{kind}_{variant}"
            for folder in sorted(Path(runs_dir).glob(f"{name}*")):
                if folder.name != name and not folder.name.startswith((f"{name}+", f"{name}@")):
                    continue
                if not (folder / result_file).is_file():
                    continue
                record = read_identity_file(folder)
                if record is None:
                    unrecorded.append(folder.name)
                    continue
                if record.get("status") != "complete":
                    log.info("%s: not finished (identity.json status %s): left out", folder, record.get("status"))
                    continue
                runs.append(ReconstructRun(kind, variant, folder, record,
                                           settings_of(kind, record.get("changed") or {})))
    if unrecorded:
        log.warning("%d reconstruct folder(s) under %s have no %s (made by an older seeing; their settings are "
                    "unknown) and are left out: %s", len(unrecorded), runs_dir, IDENTITY_FILE, ", ".join(unrecorded))
    return runs


def matches(settings: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """``wanted`` names some settings of a group: the group has each of them with that value."""
    return all(k in settings and _same(settings[k], v) for k, v in wanted.items())


def _same(a: Any, b: Any) -> bool:
    try:
        return a == b or float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def choose_runs(runs: Sequence[ReconstructRun], wanted: Mapping[str, Any] | None = None,
                mix: bool = False) -> list[ReconstructRun]:
    """The runs of one table per kind: the group ``wanted`` names (``metric.settings``), else the
    preset's runs, else the only group there is. Several groups in one kind are refused, naming
    them and the override that picks each, unless ``mix`` (then every row says its settings)."""
    chosen: list[ReconstructRun] = []
    for kind in dict.fromkeys(r.kind for r in runs):
        mine = [r for r in runs if r.kind == kind]
        groups: dict[str, list[ReconstructRun]] = {}
        for r in mine:
            groups.setdefault(json.dumps(r.settings, sort_keys=True, default=str), []).append(r)
        if mix:
            picked = list(groups.values())
        elif wanted:
            picked = [g for g in groups.values() if matches(g[0].settings, wanted)]
        elif "{}" in groups:
            picked = [groups["{}"]]
        else:
            picked = list(groups.values())
        if not picked:
            raise ValueError(f"metric.settings={dict(wanted or {})} matches no {kind} runs; they were made with: "
                             + "; ".join(settings_label(g[0].settings) for g in groups.values()))
        if len(picked) > 1 and not mix:
            listing = "".join(f"\n  - {settings_label(g[0].settings)} (variants {''.join(sorted(r.variant for r in g))}):"
                              f" {settings_override(g[0].settings)}" for g in picked)
            raise ValueError(f"the {kind} reconstruct runs were made with different settings; one table compares "
                             f"runs of one setting. Pick one with metric.settings, or put them together with "
                             f"metric.mix=true:{listing}")
        for group in picked:
            for variant in dict.fromkeys(r.variant for r in group):
                same = [r for r in group if r.variant == variant]
                if len(same) > 1:  # one identity per folder: two folders are two identities of one setting
                    log.info("%s/%s: %d runs of these settings, taking %s", kind, variant, len(same), same[0].folder)
                chosen.append(same[0])
    return chosen


def upstream_files(record: Mapping[str, Any]) -> str:
    """The encoder files a reconstruct run started from, as its provenance lists them."""
    roles = ("hybrid file", "direct encoder", "inversion file")
    files = [f"{Path(i['path']).parent.name}/{Path(i['path']).name}" + (f" ({i['identity'][:8]})" if i.get("identity")
                                                                        else "")
             for i in record.get("inputs") or [] if i.get("role") in roles]
    return "; ".join(files)
