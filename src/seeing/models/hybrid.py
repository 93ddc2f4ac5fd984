"""The hybrid encoder E = e_1 o ... o e_n o E_f, its file format, and where stage outputs live.

API (used by reconstruction and evaluation code)::

    from seeing.models.hybrid import HybridEncoder, load_hybrid_encoder

    encoder = load_hybrid_encoder("runs/scenes_progan/hybrid/hybrid.pt", generator)  # eval mode, float32
    z = encoder(images)              # images (B, 3, S, S) in [-1, 1] -> latents (B, *generator.latent_shape)
    est = encoder.invert(images)     # {"layer4": r4_hat, "layer3": ..., "layer1": ..., "z": z_hat}
    x_rec = encoder.generate(generator, z)   # G(E(x)): the image regenerated from the latent
    encoder.layers                   # ["layer1", ..., "layer4"]: the generator layers inverted one by one
    encoder.target                   # "layer4": the layer E_f predicts (r_n)
    encoder.latent_name              # "z"; "mapping" for style-based models (the latent is w+)
    encoder.meta                     # dict: model name, held-out scores, the command that made it

``generator.run(est["layer4"], start="layer4")`` regenerates an image from the
estimated r_n. For ProGAN-like models ``encoder.generate(generator, z)`` is
``generator(z)``; for style-based ones the latent is w+ ``(B, num_ws, w_dim)``, ``est``
also holds it under "mapping", and ``generate`` renders it from after the mapping.
Estimates of styled layers are their feature maps (see :mod:`seeing.gans.values`).

Files (``torch.load(path, weights_only=True)`` reads them; float tensors may be
stored in half precision and are loaded as float32)::

    {"format": "seeing.inversion/v1",
     "kind": "hybrid" | "inverter" | "encoder",
     "layers": [...],                                    # hybrid: inversion layers, first to last
     "inverters": {layer: {"spec": {...}, "state_dict": {...}}},   # hybrid and inverter files
     "encoder": {"spec": {...}, "state_dict": {...}},               # hybrid and encoder files
     "meta": {...}}

:func:`load_hybrid_encoder` also reads the paper's released ProGAN-256 hybrid encoders
(:mod:`seeing.models.ganseeing_layout`).

Stage outputs are found by :mod:`seeing.stage_files` (``runs/scenes_progan/layer3/layer3.pt``).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from seeing.state_dicts import fingerprint, load_exact
from seeing.gans.layered import LATENT, LayeredGenerator, module_key
from seeing.reporting import load_format_file, torch_save_atomic

from seeing.models import ganseeing_layout
from seeing.models.image_encoder import EncoderSpec, ImageEncoder, encoder_spec
from seeing.models.inverters import InverterSpec, LayerInverter, check_chain, inverter_spec, probe_shapes

FORMAT = "seeing.inversion/v1"
log = logging.getLogger(__name__)
# the hybrid encoder of the embedded scenes GAN (model=scenes_progan), shipped with the package
EMBEDDED_HYBRID = Path(__file__).resolve().parents[1] / "assets" / "scenes_progan_hybrid.pt"


def generator_fingerprint(generator: nn.Module) -> str:
    """The generator's weights in 16 hex digits (:func:`seeing.state_dicts.fingerprint`): inverters
    are only valid for the weights they were trained on, and shapes alone cannot tell two trainings
    of one architecture apart."""
    return fingerprint(generator)[:16]


def latent_value(generator: LayeredGenerator, latent_name: str, t: torch.Tensor):
    """What ``generator.run(..., start=latent_name)`` consumes for the latent tensor ``t``: the
    generator says (see :meth:`LayeredGenerator.latent_value`)."""
    if latent_name == LATENT:
        return t
    if latent_name != generator.latent_name:
        raise ValueError(f"the latent of this generator is {generator.latent_name!r}, not {latent_name!r}: "
                         f"inversion chains start at the layer after it")
    return generator.latent_value(t)


def generate_from_latent(generator: LayeredGenerator, latent_name: str, t: torch.Tensor,
                         stop: str | None = None):
    """Run the generator from a latent tensor (z, or w+ after ``mapping``) up to ``stop``."""
    return generator.run(latent_value(generator, latent_name, t), start=latent_name, stop=stop)

class HybridEncoder(nn.Module):
    """Image -> r_n (E_f) -> r_{n-1} (e_n) -> ... -> z (e_1)."""

    def __init__(self, image_encoder: ImageEncoder, inverters: Mapping[str, LayerInverter],
                 meta: Mapping[str, Any] | None = None):
        super().__init__()
        # inverters keyed by the layer whose output they invert, first layer first
        self.layers = list(inverters.keys())
        self.target = image_encoder.spec.target
        if not self.layers or self.layers[-1] != self.target:
            raise ValueError(f"the image encoder predicts {self.target!r} but the last inverted layer is "
                             f"{self.layers[-1] if self.layers else None!r}")
        # the first inverter predicts the latent ("z", or w+ after "mapping"); the others chain
        for i, name in enumerate(self.layers[1:], start=1):
            expected = self.layers[i - 1]
            if inverters[name].spec.target != expected:
                raise ValueError(f"inverter of {name} predicts {inverters[name].spec.target!r}, "
                                 f"expected {expected!r}")
        self.image_encoder = image_encoder
        # held under module keys (containers refuse the dots of names such as NVlabs' b8.conv0)
        self.inverters = nn.ModuleDict({module_key(n): m for n, m in inverters.items()})
        self.latent_name = inverters[self.layers[0]].spec.target
        self.meta = dict(meta or {})

    def invert(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Estimates of every inverted layer's output and of the latent ("z")."""
        r = self.image_encoder(image)
        out = {self.target: r}
        for name in reversed(self.layers):
            inverter = self.inverters[module_key(name)]
            r = inverter(r)
            out[inverter.spec.target] = r
        out[LATENT] = r
        return out

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.invert(image)[LATENT]

    def generate(self, generator: LayeredGenerator, z: torch.Tensor, stop: str | None = None):
        """G(z) for a latent this encoder produced (the image, or layer ``stop``'s output)."""
        return generate_from_latent(generator, self.latent_name, z, stop)

    def to_file_dict(self, half: bool = False) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "hybrid",
            "layers": list(self.layers),
            "inverters": {n: module_record(self.inverters[module_key(n)], half) for n in self.layers},
            "encoder": module_record(self.image_encoder, half),
            "meta": dict(self.meta),
        }


# ------------------------------------------------------------------ records
def module_record(module: LayerInverter | ImageEncoder, half: bool = False) -> dict[str, Any]:
    """``{"spec", "state_dict"}`` for a module; ``half`` stores float weights as float16."""
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu().clone())
             for k, v in module.state_dict().items()}
    return {"spec": module.spec.to_dict(), "state_dict": state}


def _float32_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def module_from_record(record: Any, kind: str, source: str = "", where: str = ""):
    """A :class:`LayerInverter` (``kind="inverter"``) or :class:`ImageEncoder` (``"encoder"``) from
    its ``{"spec", "state_dict"}`` record. ``source`` / ``where``: the file and the record's place in
    it (``inverters.layer2``), so that an incomplete record or a missing or mis-shaped tensor is
    named as the file spells it (``inverters.layer2.state_dict``: ``net.conv1.weight``)."""
    spec_class, module_class = (InverterSpec, LayerInverter) if kind == "inverter" else (EncoderSpec, ImageEncoder)
    at = f"{source}: {where}" if source else (where or kind)
    expected = f"the {kind} record of a {FORMAT} file: {{'spec': ..., 'state_dict': ...}}"
    if not isinstance(record, Mapping) or not isinstance(record.get("spec"), Mapping) or not isinstance(
            record.get("state_dict"), Mapping):
        found = sorted(map(str, record))[:6] if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(f"{at}: not a {kind} record (found {found}); expected {expected}")
    try:
        module = module_class(spec_class.from_dict(record["spec"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{at}.spec cannot build the {kind} ({type(err).__name__}: {err}); expected {expected}") from err
    load_exact(module, _float32_state(record["state_dict"]), f"{at}.state_dict", expected=expected)
    return module


def inverter_from_record(record: Mapping[str, Any], source: str = "", where: str = "") -> LayerInverter:
    return module_from_record(record, "inverter", source, where)


def read_layer_inverter(path: str | Path, layer: str) -> tuple[LayerInverter, dict[str, Any]]:
    """The inverter of ``layer`` from an inverter file, and the file's meta."""
    obj = read_inversion_file(path, "inverter")
    if layer not in (obj.get("inverters") or {}):
        raise ValueError(f"{path} inverts {list(obj.get('inverters') or [])}, not {layer!r}")
    return (inverter_from_record(obj["inverters"][layer], str(path), f"inverters.{layer}"),
            dict(obj.get("meta") or {}))


def encoder_from_record(record: Mapping[str, Any], source: str = "", where: str = "encoder") -> ImageEncoder:
    return module_from_record(record, "encoder", source, where)


def save_inversion_file(path: str | Path, kind: str, *, inverters: Mapping[str, nn.Module] | None = None,
                        encoder: nn.Module | None = None, meta: Mapping[str, Any] | None = None,
                        half: bool = False) -> Path:
    """Write an inverter, encoder or hybrid file atomically (see the module docstring)."""
    obj: dict[str, Any] = {"format": FORMAT, "kind": kind, "meta": dict(meta or {})}
    if inverters:
        obj["layers"] = list(inverters.keys())
        obj["inverters"] = {n: module_record(m, half) for n, m in inverters.items()}
    if encoder is not None:
        obj["encoder"] = module_record(encoder, half)
    return torch_save_atomic(obj, path)


def read_inversion_file(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    stage = {"inverter": "layerN", "encoder": "encoder", "hybrid": "hybrid"}.get(kind or "", "<stage>")
    obj = load_format_file(path, FORMAT, f"{kind or 'inversion'} file",
                           f"Re-copy it, re-run `python train.py model=<model> stage={stage}` to write it again, "
                           "or point the option that names it at the right file.")
    if kind is not None and obj.get("kind") != kind:
        raise ValueError(f"{path} holds a {obj.get('kind')!r}, expected a {kind!r}")
    return obj


# ------------------------------------------------------------------ checks
def check_against_generator(generator: LayeredGenerator, inverters: Mapping[str, LayerInverter] = (),
                            encoder: ImageEncoder | None = None, source: str = "") -> None:
    """Raise when a stored module was trained for a generator with other shapes or layer names."""
    inverters = dict(inverters)
    for name, inv in inverters.items():
        expected = inverter_spec(generator, name, inv.spec.hidden_channels)
        if (expected.target, expected.in_shape, expected.out_shape) != (
                inv.spec.target, inv.spec.in_shape, inv.spec.out_shape):
            raise ValueError(f"{source}: inverter of {name} maps {inv.spec.in_shape} -> {inv.spec.out_shape} "
                             f"({inv.spec.target}), but this generator needs {expected.in_shape} -> "
                             f"{expected.out_shape} ({expected.target}): it was trained for another model")
    if encoder is not None:
        shape = probe_shapes(generator, [encoder.spec.target])[encoder.spec.target]
        if tuple(shape) != tuple(encoder.spec.out_shape) or generator.resolution != encoder.spec.image_size:
            raise ValueError(f"{source}: the image encoder maps {encoder.spec.image_size}px images to "
                             f"{encoder.spec.out_shape} but this generator makes {generator.resolution}px images "
                             f"and {encoder.spec.target} is {shape}: it was trained for another model")


def _hybrid_layouts() -> str:
    return (f"accepted layouts: this project's {FORMAT} file of kind 'hybrid' (written by `python train.py "
            f"model=<model> stage=hybrid`), or {ganseeing_layout.DESCRIPTION}")


def _read_hybrid_file(path: Path) -> dict[str, Any]:
    """The file's object (weights only), or an error naming the file and the accepted layouts."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises OSError, RuntimeError, UnpicklingError...
        raise ValueError(f"{path} is not a readable hybrid encoder file ({type(err).__name__}: {err}); "
                         f"{_hybrid_layouts()}") from err
    from seeing.provenance import record_input

    record_input(path, "hybrid file", obj)  # the run's provenance lists every file it read
    if ganseeing_layout.released_state_dict(obj) is not None:
        return obj
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = (f"format={obj.get('format')!r}, keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict)
                 else type(obj).__name__)
        raise ValueError(f"{path} is not a hybrid encoder in a known layout (found {found}); {_hybrid_layouts()}")
    if obj.get("kind") != "hybrid":
        raise ValueError(f"{path} holds a {obj.get('kind')!r}, expected a 'hybrid'")
    return obj


def load_hybrid_encoder(path: str | Path | None, generator: LayeredGenerator | None = None,
                        map_location: str | torch.device = "cpu") -> HybridEncoder:
    """A :class:`HybridEncoder` from a hybrid file, in eval mode; checked against ``generator`` if given.

    ``path=None`` loads the shipped encoder of the embedded scenes GAN (:data:`EMBEDDED_HYBRID`).
    Besides this project's files, the paper's released hybrid encoders for ProGAN-256 load too
    (see :mod:`seeing.models.ganseeing_layout`); their meta says ``{"layout": "ganseeing_hybrid"}``.
    """
    path = Path(path) if path else EMBEDDED_HYBRID
    if not path.is_file():
        raise FileNotFoundError(f"no hybrid encoder file at {path}: `python train.py model=<model> stage=hybrid` "
                                f"writes <run_root>/<model>/hybrid/hybrid.pt (after stages layer1..layerN, encoder)")
    obj = _read_hybrid_file(path)
    released = ganseeing_layout.released_state_dict(obj)
    if released is not None:
        encoder, inverters = ganseeing_layout.released_modules(released, source=str(path))
        meta = {"layout": ganseeing_layout.LAYOUT, "file": path.name}
    else:
        for key in ("layers", "inverters", "encoder"):
            if key not in obj:
                raise ValueError(f"{path}: a hybrid file needs {key!r}, which is missing; {_hybrid_layouts()}")
        inverters = {n: inverter_from_record((obj["inverters"] or {}).get(n), str(path), f"inverters.{n}")
                     for n in obj["layers"]}
        encoder = encoder_from_record(obj["encoder"], str(path))
        meta = dict(obj.get("meta") or {})
    if generator is not None:
        check_chain(generator, list(inverters))
        check_against_generator(generator, inverters, encoder, source=str(path))
        trained_for = meta.get("generator_fingerprint")  # released files record none
        if trained_for and trained_for != generator_fingerprint(generator):
            msg = (f"{path} was trained for other generator weights (fingerprint {trained_for}, this "
                   f"generator {generator_fingerprint(generator)}): its estimates will be off; retrain with "
                   f"`python train.py model=<model> stage=hybrid` (after layer1..layerN and encoder)")
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
    model = HybridEncoder(encoder, inverters, meta=meta)
    return model.to(map_location).eval()


def new_hybrid_encoder(generator: LayeredGenerator, layers: Sequence[str], encoder_stages: int | str = "auto",
                       hidden_channels: int | None = None) -> HybridEncoder:
    """A randomly initialised hybrid encoder for ``generator`` (used by tests and from-scratch runs)."""
    check_chain(generator, layers)
    inverters = {n: LayerInverter(inverter_spec(generator, n, hidden_channels)) for n in layers}
    shape = probe_shapes(generator, [layers[-1]])[layers[-1]]
    encoder = ImageEncoder(encoder_spec(generator.resolution, shape, layers[-1], encoder_stages))
    return HybridEncoder(encoder, inverters)


# ------------------------------------------------------------------ from stage files
def assemble_hybrid_encoder(generator: LayeredGenerator, layers: Sequence[str], run_root: str | Path,
                            model_name: str, stage_files: Mapping[str, str | Path] | None = None,
                            model_args: str = "") -> HybridEncoder:
    """E from the per-stage files: ``layer1 ... layer<n>`` inverters and the ``encoder``.

    ``stage_files`` maps stage names to explicit files; the rest are found by convention
    (:func:`seeing.stage_files.find_stage_file`; ``model_args`` completes the commands its errors name).
    """
    from seeing.stage_files import find_stage_file

    layers = list(layers)
    check_chain(generator, layers)
    stage_files = dict(stage_files or {})

    def find(stage: str) -> Path:
        return find_stage_file(stage, run_root, model_name, model_args or f"model={model_name}",
                               explicit=stage_files.get(stage), option=f"+stage.stage_files.{stage}", shipped=False)

    inverters: dict[str, LayerInverter] = {}
    for i, name in enumerate(layers, start=1):
        inverters[name], _ = read_layer_inverter(find(f"layer{i}"), name)
    path = find("encoder")
    encoder = encoder_from_record(read_inversion_file(path, "encoder").get("encoder"), str(path))
    if encoder.spec.target != layers[-1]:
        raise ValueError(f"{path} predicts {encoder.spec.target!r}, but the hybrid needs {layers[-1]!r}")
    check_against_generator(generator, inverters, encoder, source=f"stages under {run_root}/{model_name}")
    return HybridEncoder(encoder, inverters, meta={"model": model_name})
