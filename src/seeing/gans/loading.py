"""Load any supported pretrained generator as a :class:`LayeredGenerator`.

``load_generator(source)`` takes a checkpoint path, a checkpoint dict or a bare state dict,
recognises the layout from the key names, reads every size (z size, widths, resolution)
from the tensor shapes and returns the generator in eval mode with frozen weights. Weights
are never downloaded: a missing file is an error that names the public file to fetch.

Known layouts (model config name in brackets):

* ``ganseeing_proggan`` [progan]: ProGAN as converted for GAN Dissection / "Seeing what a
  GAN cannot generate" (``proggan_churchoutdoor-7e701dd5.pth``, ...); also the format
  :func:`save_generator` writes for the project's own ProGANs.
* ``genforce_pggan`` [progan]: genforce model zoo ProGAN (``pggan_churchoutdoor256.pth``),
  loaded onto the same :class:`ProGANGenerator` with the same layer names.
* ``ganseeing_wgangp`` [wgangp]: the ProGAN paper's WGAN-GP ablation (``wgangp-*.pth``).
* ``genforce_stylegan`` [stylegan], ``genforce_stylegan2`` [stylegan2]: genforce model zoo
  StyleGAN / StyleGAN2; for these "z" of inversion is w+ (see :mod:`.stylegan_common`).

NVlabs snapshot pickles (stylegan2-ada-pytorch, stylegan3: ``network-snapshot-*.pkl``) are not
state dicts: :func:`read_checkpoint` recognises one by its first bytes, reads its ``G_ema``
network as data (:mod:`.nvlabs_pickle`, nothing in the file is run) and picks the architecture
in :data:`NVLABS_ARCHITECTURES` whose signature tensor the network holds; that entry builds the
generator from the record (its ``_init_kwargs``, attributes and tensors).
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from seeing.reporting import load_torch_file

from . import genforce_pggan, nvlabs_pickle, nvlabs_stylegan2, rosinality, stylegan, stylegan2, stylegan3, wgangp
from .layered import LayeredGenerator
from .materialize import as_float32
from .progan import LAYOUT as PROGAN_LAYOUT, ProGANGenerator

# wrapper keys of checkpoint dicts, most preferred first (genforce keeps the EMA weights in
# 'generator_smooth', the raw ones in 'generator'; rosinality the EMA ones in 'g_ema')
CHECKPOINT_KEYS = ("generator_smooth", "generator", "g_ema", "state_dict")


@dataclass(frozen=True)
class Layout:
    name: str
    model: str  # the ``model=`` config (family) it belongs to
    description: str
    key_pattern: re.Pattern  # every key of such a state dict matches
    signature: str  # a key that state dicts of this layout always have
    public_files: tuple[str, ...]
    build: Callable[..., LayeredGenerator]
    options: tuple[str, ...] = ()  # keyword options ``build`` accepts
    inversion_layers: tuple[str, ...] = ()  # the preset of ``model.inversion_layers`` (style-based layouts)


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(PROGAN_LAYOUT, "progan", "ProGAN converted for GAN Dissection",
               re.compile(r"(layer\d+|output_\d+x\d+)\.(conv\.weight|wscale\.b)"), "layer1.conv.weight",
               ("proggan_churchoutdoor-7e701dd5.pth", "proggan_bedroom-d8a89ff1.pth"),
               ProGANGenerator.from_layout_state_dict),
        Layout(genforce_pggan.LAYOUT, "progan", "genforce model zoo ProGAN", genforce_pggan.KEY_PATTERN,
               "layer0.weight", ("pggan_churchoutdoor256.pth", "pggan_bedroom256.pth"),
               genforce_pggan.from_state_dict),
        Layout(wgangp.LAYOUT, "wgangp", "ProGAN-paper WGAN-GP ablation generator", wgangp.KEY_PATTERN,
               "features.0.conv.weight", ("wgangp-beaa509a.pth",), wgangp.from_state_dict),
        Layout(stylegan.LAYOUT, "stylegan", "genforce model zoo StyleGAN", stylegan.KEY_PATTERN,
               "synthesis.layer0.const", ("stylegan_bedroom256.pth", "stylegan_church256.pth"),
               stylegan.from_state_dict,
               ("truncation_psi", "truncation_layers", "fused_scale_min_res", "clamp_output")),
        Layout(stylegan2.LAYOUT, "stylegan2", "genforce model zoo StyleGAN2", stylegan2.KEY_PATTERN,
               "synthesis.early_layer.const", ("stylegan2_church256.pth",), stylegan2.from_state_dict,
               ("truncation_psi", "truncation_layers", "clamp_output"), ("layer0", "layer1", "layer2")),
        Layout(rosinality.LAYOUT, "stylegan2", "rosinality/stylegan2-pytorch checkpoint", rosinality.KEY_PATTERN,
               rosinality.SIGNATURE, ("stylegan2-ffhq-config-f.pt", "550000.pt"), rosinality.from_state_dict,
               ("truncation_psi", "truncation_layers", "clamp_output"), rosinality.INVERSION_LAYERS),
    )
}



@dataclass(frozen=True)
class NVlabsArchitecture:
    """A generator architecture NVlabs snapshot pickles hold, told apart by a tensor of ``G_ema``."""

    name: str  # the layout name generators built from it report
    model: str  # the ``model=`` config (family) it belongs to
    description: str
    signature: str  # a key of G_ema's state only this architecture has
    public_files: tuple[str, ...]
    build: Callable[..., LayeredGenerator]  # (G_ema record, **options)
    options: tuple[str, ...] = ()  # keyword options ``build`` accepts
    inversion_layers: tuple[str, ...] = ()  # the preset of ``model.inversion_layers``


NVLABS_ARCHITECTURES: dict[str, NVlabsArchitecture] = {
    "stylegan2": NVlabsArchitecture(
        nvlabs_stylegan2.LAYOUT, "stylegan2", "NVlabs stylegan2-ada-pytorch snapshot", nvlabs_stylegan2.SIGNATURE,
        ("network-snapshot-*.pkl", "ffhq.pkl", "metfaces.pkl", "cifar10.pkl"), nvlabs_stylegan2.from_record,
        ("truncation_psi", "truncation_layers", "class_index", "clamp_output"), nvlabs_stylegan2.INVERSION_LAYERS),
    "stylegan3": NVlabsArchitecture(
        stylegan3.LAYOUT, "stylegan3", "NVlabs stylegan3 snapshot (configs T and R)", stylegan3.SIGNATURE,
        ("stylegan3-t-ffhqu-256x256.pkl", "stylegan3-r-afhqv2-512x512.pkl", "network-snapshot-*.pkl"),
        stylegan3.from_record, stylegan3.OPTIONS, ("input", "L0", "L1")),
}

MODELS: dict[str, tuple[str, ...]] = {}
for _layout in [*LAYOUTS.values(), *NVLABS_ARCHITECTURES.values()]:
    MODELS.setdefault(_layout.model, ())
    MODELS[_layout.model] += (_layout.name,)
NVLABS_LAYOUTS = {a.name: a for a in NVLABS_ARCHITECTURES.values()}


def _known_layouts() -> str:
    return "; ".join(f"{l.name} (model={l.model}: {l.description}, e.g. {', '.join(l.public_files)})"
                     for l in [*LAYOUTS.values(), *NVLABS_ARCHITECTURES.values()])


def _allowed_layouts(layout: str) -> tuple[str, ...]:
    if layout == "auto":
        return (*LAYOUTS, *NVLABS_LAYOUTS)
    if layout in LAYOUTS or layout in NVLABS_LAYOUTS:
        return (layout,)
    if layout in MODELS:
        return MODELS[layout]
    raise ValueError(f"unknown layout {layout!r}: use 'auto', a model name {sorted(MODELS)} "
                     f"or a layout name {sorted([*LAYOUTS, *NVLABS_LAYOUTS])}")


def _describe(name: str) -> tuple[str, str, tuple[str, ...]]:
    spec = LAYOUTS.get(name) or NVLABS_LAYOUTS[name]
    return spec.model, spec.description, spec.public_files


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """The name of the layout whose key set ``state_dict`` has.

    Raises ValueError listing the known layouts and the keys the closest one does not expect.
    """
    keys = list(state_dict.keys())
    fits = [l.name for l in LAYOUTS.values()
            if l.signature in state_dict and all(isinstance(k, str) and l.key_pattern.fullmatch(k) for k in keys)]
    if len(fits) == 1:
        return fits[0]
    if not keys:
        raise ValueError(f"empty state dict: no generator layout to recognise. Known layouts: {_known_layouts()}")

    def matched(layout: Layout) -> int:
        return sum(1 for k in keys if isinstance(k, str) and layout.key_pattern.fullmatch(k))

    closest = max(LAYOUTS.values(), key=matched)
    unexpected = [k for k in keys if not (isinstance(k, str) and closest.key_pattern.fullmatch(k))]
    detail = f"keys it does not expect: {unexpected[:30]}" + (" ..." if len(unexpected) > 30 else "")
    if not unexpected:
        detail = f"it lacks its key {closest.signature!r}"
    raise ValueError(f"unrecognised generator layout ({len(keys)} keys). Known layouts: {_known_layouts()}. "
                     f"Closest is {closest.name}; {detail}")


def _in_file(path: Path | None, err: Exception, expected: str = "") -> ValueError:
    """``err`` with the checkpoint file it is about (and the layout it should have) in front."""
    where = f"model.checkpoint={path}" if path is not None else "generator state dict"
    return ValueError(f"{where}: {err}" + (f"; {expected}" if expected else ""))


def _missing_file_error(path: Path, allowed: tuple[str, ...]) -> FileNotFoundError:
    expected = "; ".join(f"{', '.join(_describe(n)[2])} ({_describe(n)[1]}, layout {n})" for n in allowed)
    return FileNotFoundError(
        f"generator checkpoint not found: {path}. Expected a local copy of one of: {expected}. "
        "Weights are never downloaded; put the file there or point model.checkpoint at it.")


def _nvlabs_file(source: Any, layout: str) -> Path | None:
    """The path of ``source`` when it names an NVlabs pickle (a missing file is an error here)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise _missing_file_error(path, _allowed_layouts(layout))
    return path if nvlabs_pickle.looks_like_nvlabs_pickle(path) else None


def read_nvlabs_generator(path: str | os.PathLike) -> tuple[nvlabs_pickle.PersistentRecord, NVlabsArchitecture]:
    """``G_ema`` of an NVlabs snapshot pickle (read as data) and the architecture it has.

    The file is recorded in the run's provenance. A network of no known architecture (a fork,
    another project's pickle) is an error naming its class and what it holds.
    """
    from seeing.provenance import record_input

    path = Path(path)
    record = nvlabs_pickle.read_snapshot_generator(path)
    record_input(path, "generator checkpoint")
    keys = [k for k, _ in record.tensors()]
    fits = [a for a in NVLABS_ARCHITECTURES.values() if a.signature in keys]
    if len(fits) != 1:
        known = "; ".join(f"{a.name} (model={a.model}: {a.description}, holds {a.signature!r})"
                          for a in NVLABS_ARCHITECTURES.values())
        raise ValueError(f"{path}: its G_ema is a {record.class_name} of no known NVlabs architecture "
                         f"({len(keys)} tensors, e.g. {keys[:8]}). Known: {known}")
    return record, fits[0]


def _is_plain_pickle(path: Path) -> bool:
    """A pickle (protocol 2+) that is not a zip: not torch.save's format since PyTorch 1.6."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _pickle_globals(path: Path, limit: int = 8) -> list[str]:
    """The first ``limit`` distinct Python globals a pickle names, read off its opcodes (nothing
    is unpickled), to say what a refused file is."""
    import io
    import pickletools

    with open(path, "rb") as f:
        head = io.BytesIO(f.read(1 << 22))
    found: dict[str, None] = {}
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(head):
            if op.name == "GLOBAL":
                found[str(arg).replace(" ", ".")] = None
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found[f"{strings[-2]}.{strings[-1]}"] = None
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            if len(found) >= limit or op.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - a damaged tail: report what was read
        pass
    return list(found)


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any], layout: str = "auto"
                    ) -> tuple[dict[str, torch.Tensor], str | None, dict]:
    """``(state_dict, stored_layout, meta)`` from a path, a checkpoint dict or a state dict.

    Checkpoint dicts are unwrapped from ``generator_smooth`` / ``generator`` / ``state_dict``;
    the project's own format ``{"layout", "state_dict", "meta"}`` also gives its layout and meta.
    An NVlabs snapshot pickle gives its ``G_ema`` tensors (upstream's names), the layout of its
    architecture and ``meta`` ``{"format": "nvlabs", "class_name", "init_kwargs"}``.
    """
    nvlabs = _nvlabs_file(source, layout)
    if nvlabs is not None:
        record, architecture = read_nvlabs_generator(nvlabs)
        return (dict(record.tensors()), architecture.name,
                {"format": "nvlabs", "class_name": record.class_name, "init_kwargs": record.init_kwargs})
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        # rosinality checkpoints keep their training options as an argparse.Namespace: plain data,
        # rebuilt without running anything, so the weights-only reader may accept it
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                source = load_torch_file(path, "generator checkpoint",
                                         "Re-copy the file (an interrupted download or copy leaves it truncated), or "
                                         "point model.checkpoint at the right generator checkpoint.")
            except ValueError as err:
                refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err.__cause__ or ""))
                if refused:
                    raise ValueError(f"{path} asks for the Python global {refused[1]}, which a generator "
                                     "checkpoint read as data (weights only) may not hold; seeing never runs code "
                                     "from a checkpoint: point model.checkpoint at a generator checkpoint") from err
                if _is_plain_pickle(path):
                    raise ValueError(f"{path} is a Python pickle that is neither a PyTorch checkpoint readable as "
                                     f"data nor an NVlabs snapshot (it never names {nvlabs_pickle.PERSISTENCE}); it "
                                     f"asks for {', '.join(_pickle_globals(path)) or 'no Python globals'}. seeing never runs code from "
                                     "a checkpoint: point model.checkpoint at a generator checkpoint") from err
                raise
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a checkpoint path, checkpoint dict or state dict, got {type(source).__name__}")
    stored_layout, meta = None, {}
    if isinstance(source.get("layout"), str) and isinstance(source.get("state_dict"), Mapping):
        stored_layout, meta = source["layout"], dict(source.get("meta") or {})
        source = source["state_dict"]
    else:
        for key in CHECKPOINT_KEYS:
            if isinstance(source.get(key), Mapping):
                outer, source = source, source[key]
                if key == "g_ema" and isinstance(outer.get("latent_avg"), torch.Tensor):
                    # rosinality keeps the mean w beside the generator: part of its state here
                    source = {**source, "latent_avg": outer["latent_avg"]}
                break
    not_tensors = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"not a state dict: entries {not_tensors[:20]} are not tensors (checkpoint dicts "
                         f"must hold the generator under one of {list(CHECKPOINT_KEYS)})")
    return dict(source), stored_layout, meta


def load_generator(source: str | os.PathLike | Mapping[str, Any], layout: str = "auto",
                   requires_grad: bool = False, **options: Any) -> LayeredGenerator:
    """A pretrained generator as a :class:`LayeredGenerator`, in eval mode.

    Args:
        source: checkpoint path (``torch.load(..., weights_only=True)``), checkpoint dict or
            state dict.
        layout: ``"auto"`` (recognised from the keys), a model name (``progan``, ``wgangp``,
            ``stylegan``, ``stylegan2``: any of its layouts) or a layout name.
        requires_grad: leave the weights trainable (frozen by default: inversion only needs
            gradients with respect to latents and features).
        options: layout-specific options, e.g. ``truncation_psi`` / ``truncation_layers`` for
            StyleGAN and StyleGAN2.
    """
    allowed = _allowed_layouts(layout)
    nvlabs = _nvlabs_file(source, layout)
    if nvlabs is not None:
        record, architecture = read_nvlabs_generator(nvlabs)
        _check_allowed(architecture.name, layout, allowed, nvlabs)
        try:
            generator = architecture.build(record, **_options_for(architecture.name, architecture.options, options))
        except ValueError as err:  # name the file: a fork's extra or missing tensors, a class count
            raise ValueError(f"{nvlabs}: {err}") from err
        meta = {"format": "nvlabs", "class_name": record.class_name, "init_kwargs": record.init_kwargs}
    else:
        path = Path(source).expanduser() if isinstance(source, (str, os.PathLike)) else None
        state_dict, stored_layout, meta = read_checkpoint(source, layout)
        try:
            name = stored_layout if stored_layout is not None else detect_layout(state_dict)
        except ValueError as err:
            raise _in_file(path, err) from err
        if name not in LAYOUTS:
            raise _in_file(path, ValueError(f"checkpoint declares unknown layout {name!r}. Known layouts: "
                                            f"{_known_layouts()}"))
        _check_allowed(name, layout, allowed, source)
        spec = LAYOUTS[name]
        try:
            generator = spec.build(as_float32(state_dict), **_options_for(name, spec.options, options))
        except ValueError as err:  # a key missing or mis-shaped: named as the file spells it
            raise _in_file(path, err, f"expected a complete {spec.description} checkpoint (layout {name}, as "
                                      f"{', '.join(spec.public_files)})") from err
    generator.eval().requires_grad_(requires_grad)
    generator.checkpoint_meta = meta
    return generator


def _check_allowed(name: str, layout: str, allowed: tuple[str, ...], source: Any = None) -> None:
    if name not in allowed:
        what = f"{os.fspath(source)} has" if isinstance(source, (str, os.PathLike)) else "checkpoint has"
        raise ValueError(f"{what} layout {name} (model={_describe(name)[0]}) but layout={layout!r} "
                         f"was asked for, which allows {list(allowed)}: choose model={_describe(name)[0]}")


def _options_for(name: str, accepted: tuple[str, ...], options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a layout takes. One a model config passes unset (None) that this layout does
    not know is left out (``class_index`` of an unconditional format); one set is an error."""
    unknown = sorted(k for k, v in options.items() if k not in accepted and v is not None)
    if unknown:
        raise TypeError(f"layout {name} takes no option(s) {unknown}; it accepts {list(accepted)}")
    return {k: v for k, v in options.items() if k in accepted}


def save_generator(generator: LayeredGenerator, path: str | os.PathLike, meta: Mapping[str, Any] | None = None
                   ) -> Path:
    """Write ``{"layout", "state_dict", "meta"}`` atomically; :func:`load_generator` reads it back.

    The state dict is in the generator's public layout (GAN Dissection keys for
    :class:`ProGANGenerator`), so other ProGAN tools read it too. ``meta`` must hold plain
    Python values (it is read back with ``weights_only=True``).
    """
    from omegaconf import DictConfig, OmegaConf

    from ..reporting import torch_save_atomic

    layout = getattr(generator, "layout", None)
    if layout not in LAYOUTS or not hasattr(generator, "layout_state_dict"):
        raise TypeError(f"save_generator supports generators with a public layout state dict "
                        f"(ProGANGenerator, WGANGPGenerator), not {type(generator).__name__}")
    if isinstance(meta, DictConfig):
        meta = OmegaConf.to_container(meta, resolve=True)
    state_dict = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in generator.layout_state_dict().items()}
    return torch_save_atomic({"layout": layout, "state_dict": state_dict, "meta": _plain(dict(meta or {}), "meta")},
                             Path(path))


def _plain(value: Any, where: str) -> Any:
    """``value`` as types a weights-only load reads back (paths become strings, tuples lists)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        return value.item()
    raise TypeError(f"{where} is a {type(value).__name__}; generator files hold plain values only")


# ------------------------------------------------------------------ inversion presets
_PRESETS: dict[tuple, list[str]] = {}


def inversion_preset(checkpoint: str | os.PathLike | None, model: str) -> list[str]:
    """The layers layer-wise inversion treats as early for this checkpoint's format: the
    default of ``model.inversion_layers`` for a model config whose formats name their layers
    differently (``model=stylegan2``: genforce ``layer0..2``, NVlabs ``b4.conv1, b8.conv0,
    b8.conv1``, rosinality ``conv1, convs.0, convs.1``).

    The format is recognised as :func:`load_generator` recognises it (cached per file). A file
    that is missing or unreadable gives the model's first preset: loading it reports the
    problem, before any work.
    """
    presets = [spec.inversion_layers for spec in [*LAYOUTS.values(), *NVLABS_ARCHITECTURES.values()]
               if spec.model == model and spec.inversion_layers]
    if not presets:
        raise ValueError(f"model={model} has no per-format inversion preset: set model.inversion_layers")
    path = Path(str(checkpoint)).expanduser() if checkpoint not in (None, "") else None
    if path is None or not path.is_file():
        return list(presets[0])
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, model)
    if key not in _PRESETS:
        _PRESETS[key] = list(_format_of(path, model) or presets[0])
    return list(_PRESETS[key])


def _format_of(path: Path, model: str) -> tuple[str, ...] | None:
    try:
        if nvlabs_pickle.looks_like_nvlabs_pickle(path):
            record = nvlabs_pickle.read_snapshot_generator(path)
            keys = {k for k, _ in record.tensors()}
            fits = [a for a in NVLABS_ARCHITECTURES.values() if a.signature in keys and a.model == model]
            return fits[0].inversion_layers if len(fits) == 1 else None
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # a zip checkpoint is mapped, not read: only its keys are needed here
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        state_dict, stored, _ = read_checkpoint(obj)
        name = stored or detect_layout(state_dict)
    except Exception:  # noqa: BLE001 - the loader gives the real error when the run builds the generator
        return None
    spec = LAYOUTS.get(name)
    return spec.inversion_layers if spec is not None and spec.model == model else None
