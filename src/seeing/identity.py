"""What a run is: its identity, and the one folder that holds it.

**Identity.** A run is its entry point (``train`` or ``evaluate``) and every setting that can
change its result: the resolved config, less the keys in :data:`IGNORED` (where files go,
loggers, progress, device counts, ``ckpt_path``, ...). ``identity_digest`` is the sha256 of that
config written as canonical JSON. Paths under ``paths.*`` and the output folder are replaced by
placeholders before resolving, so values derived from them (``stage.run_root``) do not make a
moved ``runs/`` folder another identity.

**Preset.** Each entry point names the few choices its readable folder name is made of
(``output_naming`` in ``conf/train.yaml`` and the metric configs: model, checkpoint, stage,
variant, ...). The *preset* of a run is the config those choices alone compose to.

**Folder.** ``${run_dir:<readable path>}`` (the ``output_dir`` of both entry points) is

1. a folder beside the readable one whose ``identity.json`` holds this identity already, else
2. the readable folder itself (``runs/scenes_progan/layer1``) when this identity is its preset's
   and no other identity lives there, else
3. a sibling named for what the run changed, plus a short digest:
   ``runs/scenes_progan/reconstruct_real_f+steps:500+targets.count:128@1a2b3c4d``.

So a sweep over any setting gives one folder per job, a smoke run never lands in the preset's
folder, and nothing is ever written into another identity's folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
IDENTITY_FORMAT = "seeing.identity/1"

# Keys (dotted prefixes) that cannot change a result: where it is written, how it is shown or
# logged, how many devices share the work (distributed runs equal one-process runs, tested), and
# the recipe (its values reach a run only through the stage/metric keys that read them).
IGNORED = (
    "hydra", "paths", "output_dir", "output_naming", "ckpt_path", "force", "optimized_metric", "job_type",
    "logger", "callbacks", "device", "recipe", "hparams_search",
    "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.strategy",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.enable_checkpointing",
    "trainer.log_every_n_steps", "trainer.default_root_dir",
    "metric.fabric", "metric.checkpoint_every", "metric.progress", "metric.cache", "metric.path",
    "segmenter.device",
)
# what stands in for the folders while the identity is resolved
PLACEHOLDERS = {"paths.run_root": "<run_root>", "paths.cache_dir": "<cache_dir>", "output_dir": "<output_dir>"}
# the few files Hydra writes into a run folder before the run starts: such a folder is still free
_HYDRA_ONLY = {".hydra", "train.log", "evaluate.log"}
SLUG_CHARS = 72


def ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED)


# ------------------------------------------------------------------------------ the identity config
def _plain_leaves(cfg: DictConfig, node: Any, prefix: str, out: dict[str, Any]) -> None:
    """Every leaf under ``node`` resolved (``???`` where unset, the interpolation text where it
    cannot be resolved: such a run stops at its config check before any work)."""
    keys: Iterable[Any] = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        path = f"{prefix}{key}"
        if ignored(path):
            continue
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation():
            if child._is_missing() or child._is_none():
                out[path] = "???" if child._is_missing() else None
            elif len(child) == 0:
                out[path] = {} if isinstance(child, DictConfig) else []
            else:
                _plain_leaves(cfg, child, f"{path}.", out)
            continue
        try:
            value = OmegaConf.select(cfg, path, throw_on_missing=True)
        except Exception:  # noqa: BLE001 - an unset (???) or unresolvable value: kept as written
            out[path] = "???" if child._is_missing() else str(child._value())
            continue
        if isinstance(value, (DictConfig, ListConfig)):  # an interpolation to a whole node
            if len(value):
                _plain_leaves(cfg, value, f"{path}.", out)
            else:
                out[path] = OmegaConf.to_container(value)
        else:
            out[path] = value


def identity_config(cfg: DictConfig) -> dict[str, Any]:
    """The settings that can change the run's result, as ``dotted key -> plain value`` (sorted)."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with _open(copy):
        copy.pop("hydra", None)
        for key, placeholder in PLACEHOLDERS.items():  # set without resolving what was there
            OmegaConf.update(copy, key, placeholder, force_add=True)
    out: dict[str, Any] = {}
    _plain_leaves(copy, copy, "", out)
    return dict(sorted(out.items()))


def identity_digest(entry: str, config: Mapping[str, Any]) -> str:
    text = json.dumps({"entry": entry, "config": config}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def changed_settings(config: Mapping[str, Any], preset: Mapping[str, Any]) -> dict[str, Any]:
    """``key -> value`` of every identity setting that differs from the preset's (``<absent>``
    for keys the preset does not have)."""
    out = {k: v for k, v in config.items() if k not in preset or preset[k] != v}
    out.update({k: "<absent>" for k in preset if k not in config})
    return dict(sorted(out.items()))


class _open:
    """``open_dict`` and read-write at once."""

    def __init__(self, cfg: DictConfig):
        from omegaconf import open_dict, read_write

        self._contexts = [read_write(cfg), open_dict(cfg)]

    def __enter__(self):
        for c in self._contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self._contexts):
            c.__exit__(*exc)


# ------------------------------------------------------------------------------ overrides
def parse_overrides(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def override_key(override: Any) -> str:
    """``stage.steps`` for ``stage.steps=3``, ``real`` for ``+real=folder``, ``logger`` for ``~logger``."""
    return str(override.key_or_group)


def naming_key(key: str, naming: Sequence[str]) -> bool:
    return key in naming


def split_overrides(overrides: Sequence[str], naming: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the overrides the preset keeps: naming choices and ignored keys, the run's own changes)."""
    keep, changes = [], []
    for text, parsed in zip(overrides, parse_overrides(overrides)):
        key = override_key(parsed)
        (keep if naming_key(key, naming) or ignored(key) else changes).append(text)
    return keep, changes


def _short_value(value: str) -> str:
    value = value.strip("'\"")
    if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?|-?\d+e-?\d+", value):  # a float: 4 significant digits (the digest tells apart)
        value = f"{float(value):.4g}"
    if "/" in value:  # a path: its file or folder name (the whole path is in identity.json)
        value = Path(value.rstrip("/")).stem or value
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("_") or "_"


def slug(changes: Sequence[str]) -> str:
    """``+steps:500+targets.count:128`` for ``stage.steps=500 stage.targets.count=128``: what
    the run changed, readable, cut at :data:`SLUG_CHARS` (the digest after it keeps names apart)."""
    parts: dict[str, str] = {}  # a key given twice counts once, with its last value (as Hydra applies it)
    for text, parsed in zip(changes, parse_overrides(changes)):
        key = override_key(parsed).removeprefix("stage.")
        key = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
        parts.pop(key, None)
        if parsed.is_delete():
            parts[key] = f"no-{key}"
        else:
            parts[key] = f"{key}:{_short_value(text.split('=', 1)[1] if '=' in text else '')}"
    out = "".join(f"+{p}" for p in parts.values())
    return out if len(out) <= SLUG_CHARS else out[:SLUG_CHARS].rstrip("+:._-")


# ------------------------------------------------------------------------------ composition
def config_dir() -> str:
    """The primary config folder of this Hydra run (``conf/`` of the checkout by default)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        for source in HydraConfig.get().runtime.config_sources:
            if source.provider == "main" and source.schema == "file":
                return str(source.path)
    except ValueError:
        pass
    return str(Path(__file__).resolve().parents[2] / "conf")


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose ``config_name`` as the entry point would with ``overrides`` (inside a Hydra run or
    out of one)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def hydra_run() -> tuple[str, list[str]] | None:
    """(config name, task overrides) of the Hydra run in progress, or None outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:
        return None
    return str(hc.job.config_name), [str(o) for o in hc.overrides.task]


# ------------------------------------------------------------------------------ the folder
def read_identity_file(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / IDENTITY_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == IDENTITY_FORMAT else None


def folder_is_free(folder: Path) -> bool:
    """No other identity's outputs in ``folder``: it does not exist, or holds only what Hydra
    writes before a run starts."""
    folder = Path(folder)
    if not folder.is_dir():
        return True
    return all(p.name in _HYDRA_ONLY for p in folder.iterdir())


def folders_of(digest: str, parent: Path) -> list[Path]:
    """The folders under ``parent`` whose identity.json holds ``digest``."""
    if not Path(parent).is_dir():
        return []
    return sorted(p.parent for p in Path(parent).glob(f"*/{IDENTITY_FILE}")
                  if (read_identity_file(p.parent) or {}).get("identity") == digest)


def choose_folder(readable: Path, digest: str, is_preset: bool, changes: Sequence[str]) -> Path:
    """The folder of one identity (see the module docstring)."""
    readable = Path(readable)
    existing = folders_of(digest, readable.parent)
    if existing:
        return readable if readable in existing else existing[0]
    if is_preset:
        record = read_identity_file(readable)
        if record is None and folder_is_free(readable):
            return readable
        if record is None:
            log.warning("%s holds outputs with no %s (written by an older seeing, or by hand): left alone; this "
                        "run writes beside it", readable, IDENTITY_FILE)
    return readable.with_name(f"{readable.name}{slug(changes)}@{digest[:8]}")


class RunIdentity:
    """One run's identity: its digest, the settings, what differs from its preset, its folder."""

    def __init__(self, entry: str, readable: Path, config: Mapping[str, Any], preset: Mapping[str, Any] | None,
                 overrides: Sequence[str], changes: Sequence[str]):
        self.entry = entry
        self.readable = Path(readable)
        self.config = dict(config)
        self.digest = identity_digest(entry, config)
        self.preset_digest = identity_digest(entry, preset) if preset is not None else self.digest
        self.is_preset = self.digest == self.preset_digest
        self.changed = changed_settings(config, preset) if preset is not None else {}
        self.overrides = list(overrides)
        self.changes = list(changes)
        self.folder = choose_folder(self.readable, self.digest, self.is_preset, self.changes)

    def record(self) -> dict[str, Any]:
        """What identity.json and every exported file say about the run's settings."""
        return {"format": IDENTITY_FORMAT, "identity": self.digest, "entry": self.entry, "folder": str(self.folder),
                "preset": self.is_preset, "changed": self.changed, "overrides": self.overrides,
                "config": self.config}


_CACHE: dict[tuple, RunIdentity] = {}
_BY_FOLDER: dict[str, RunIdentity] = {}


def run_identity_of(cfg: DictConfig, readable: str | Path, entry: str | None = None,
                    overrides: Sequence[str] | None = None) -> RunIdentity:
    """The identity of the run composed as ``cfg`` (from ``overrides``, by default the Hydra run's)."""
    run = hydra_run()
    if entry is None or overrides is None:
        if run is None:
            raise ValueError("run_identity_of needs entry and overrides outside a Hydra run")
        entry, overrides = entry or run[0], list(overrides if overrides is not None else run[1])
    key = (entry, str(readable), tuple(overrides))
    if key in _CACHE:
        return _CACHE[key]
    naming = list(OmegaConf.select(cfg, "output_naming", default=None) or [])
    keep, changes = split_overrides(overrides, naming)
    config = identity_config(cfg)
    if changes:
        try:
            preset = identity_config(compose(entry, keep))
        except Exception as err:  # noqa: BLE001 - the choices alone do not compose: no preset to be
            log.debug("preset of %s does not compose (%s)", readable, err)
            preset = {}
    else:
        preset = config
    identity = RunIdentity(entry, Path(readable), config, preset, overrides, changes)
    _CACHE[key] = identity
    _BY_FOLDER[str(identity.folder)] = identity
    return identity


def current_identity(cfg: DictConfig) -> RunIdentity | None:
    """The identity behind ``cfg.output_dir`` of the Hydra run in progress (None outside one, or
    for a config whose output_dir was set by hand)."""
    if hydra_run() is None:
        return None
    return _BY_FOLDER.get(str(cfg.output_dir))


def run_dir(readable: str, *, _root_: DictConfig) -> str:
    """The ``${run_dir:...}`` resolver: the folder of this run's identity (the readable path
    itself outside a Hydra run, e.g. a config built by hand)."""
    if hydra_run() is None:
        return str(readable)
    return str(run_identity_of(_root_, readable).folder)
