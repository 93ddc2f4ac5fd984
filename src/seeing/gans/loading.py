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
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from seeing.reporting import load_torch_file

from . import genforce_pggan, stylegan, stylegan2, wgangp
from .layered import LayeredGenerator
from .materialize import as_float32
from .progan import LAYOUT as PROGAN_LAYOUT, ProGANGenerator

# wrapper keys of checkpoint dicts, most preferred first (genforce keeps the EMA weights in
# 'generator_smooth', the raw ones in 'generator')
CHECKPOINT_KEYS = ("generator_smooth", "generator", "state_dict")


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
               ("truncation_psi", "truncation_layers", "clamp_output")),
    )
}

MODELS: dict[str, tuple[str, ...]] = {}
for _layout in LAYOUTS.values():
    MODELS.setdefault(_layout.model, ())
    MODELS[_layout.model] += (_layout.name,)


def _known_layouts() -> str:
    return "; ".join(f"{l.name} (model={l.model}: {l.description}, e.g. {', '.join(l.public_files)})"
                     for l in LAYOUTS.values())


def _allowed_layouts(layout: str) -> tuple[str, ...]:
    if layout == "auto":
        return tuple(LAYOUTS)
    if layout in LAYOUTS:
        return (layout,)
    if layout in MODELS:
        return MODELS[layout]
    raise ValueError(f"unknown layout {layout!r}: use 'auto', a model name {sorted(MODELS)} "
                     f"or a layout name {sorted(LAYOUTS)}")


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
    expected = "; ".join(f"{', '.join(LAYOUTS[n].public_files)} ({LAYOUTS[n].description}, layout {n})"
                         for n in allowed)
    return FileNotFoundError(
        f"generator checkpoint not found: {path}. Expected a local copy of one of: {expected}. "
        "Weights are never downloaded; put the file there or point model.checkpoint at it.")


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any], layout: str = "auto"
                    ) -> tuple[dict[str, torch.Tensor], str | None, dict]:
    """``(state_dict, stored_layout, meta)`` from a path, a checkpoint dict or a state dict.

    Checkpoint dicts are unwrapped from ``generator_smooth`` / ``generator`` / ``state_dict``;
    the project's own format ``{"layout", "state_dict", "meta"}`` also gives its layout and meta.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise _missing_file_error(path, _allowed_layouts(layout))
        source = load_torch_file(path, "generator checkpoint",
                                 "Re-copy the file (an interrupted download or copy leaves it truncated), or point "
                                 "model.checkpoint at the right generator checkpoint.")
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a checkpoint path, checkpoint dict or state dict, got {type(source).__name__}")
    stored_layout, meta = None, {}
    if isinstance(source.get("layout"), str) and isinstance(source.get("state_dict"), Mapping):
        stored_layout, meta = source["layout"], dict(source.get("meta") or {})
        source = source["state_dict"]
    else:
        for key in CHECKPOINT_KEYS:
            if isinstance(source.get(key), Mapping):
                source = source[key]
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
    path = Path(source).expanduser() if isinstance(source, (str, os.PathLike)) else None
    state_dict, stored_layout, meta = read_checkpoint(source, layout)
    try:
        name = stored_layout if stored_layout is not None else detect_layout(state_dict)
    except ValueError as err:
        raise _in_file(path, err) from err
    if name not in LAYOUTS:
        raise _in_file(path, ValueError(f"checkpoint declares unknown layout {name!r}. Known layouts: "
                                        f"{_known_layouts()}"))
    if name not in allowed:
        raise _in_file(path, ValueError(f"checkpoint has layout {name} (model={LAYOUTS[name].model}) but "
                                        f"layout={layout!r} was asked for, which allows {list(allowed)}"))
    spec = LAYOUTS[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(f"layout {name} takes no option(s) {unknown}; it accepts {list(spec.options)}")
    try:
        generator = spec.build(as_float32(state_dict), **options)
    except ValueError as err:  # a key missing or mis-shaped: named as the file spells it
        raise _in_file(path, err, f"expected a complete {spec.description} checkpoint (layout {name}, as "
                                  f"{', '.join(spec.public_files)})") from err
    generator.eval().requires_grad_(requires_grad)
    generator.checkpoint_meta = meta
    return generator


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
