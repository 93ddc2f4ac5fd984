"""The key layout of the paper's released hybrid encoders, read into this project's modules.

The authors published hybrid encoders for their ProGAN-256 church and bedroom models
(``church_invert_hybrid_cse-43e52428.pth``, ``bedroom_invert_hybrid_cse-b943528e.pth``).
Such a file holds one state dict, either bare or as ``{"state_dict": {"model.<key>": ...}}``
(the training wrapper's prefix), with these keys:

- ``resnet.*``: the image encoder E_f, a ResNet-18 (``conv1``, ``bn1``, ``layer1``..``layer4``)
  whose pooling and classifier are replaced by ``layer5.conv5``, a 1x1 conv to 512 channels
  followed by a leaky ReLU; it predicts the generator's ``layer4`` (512 x 8 x 8 for 256px
  images, the trunk downsamples 32x);
- ``inv4``, ``inv3``, ``inv2``: the inverters of ``layer4``, ``layer3``, ``layer2``;
  ``inv3``'s final 1x1 conv has stride 2 (8x8 -> 4x4) and ``inv2`` has no final 1x1 conv;
- ``inv1``: the inverter of ``layer1``, to a pixel-normalised z.

The strides are not in the state dict; they are fixed by the released architecture. The
channel counts are read from the tensors. The modules are this project's own
(:class:`ImageEncoder`, :class:`LayerInverter`) with ``architecture="ganseeing"``, so a
released file and a file this project trains with that architecture are the same objects.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from seeing.gans.layered import LATENT
from seeing.state_dicts import load_exact

from seeing.models.image_encoder import EncoderSpec, ImageEncoder
from seeing.models.inverters import InverterSpec, LayerInverter

LAYOUT = "ganseeing_hybrid"
DESCRIPTION = ("the paper's released hybrid encoder (church/bedroom_invert_hybrid_cse-*.pth): a state dict with "
               "keys resnet.*, inv4.*, inv3.*, inv2.*, inv1.*, bare or under 'state_dict' with a 'model.' prefix")
IMAGE_SIZE = 256  # the released encoders are for ProGAN-256
TRUNK_STRIDE = 32  # the full ResNet-18 trunk

# (key prefix, inverted layer, the value it predicts, stride of its final 1x1 conv; None: it has none)
RELEASED_INVERTERS = (
    ("inv4", "layer4", "layer3", 1),
    ("inv3", "layer3", "layer2", 2),
    ("inv2", "layer2", "layer1", None),
    ("inv1", "layer1", LATENT, None),  # a conv over the whole 4x4 map, then a 1x1 conv to z
)
# the released trunk's module names -> positions in ImageEncoder.trunk
_TRUNK_POSITIONS = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
_WRAPPER_PREFIX = "model."


def released_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The bare released state dict held by a loaded file, or None when it is not that layout."""
    if not isinstance(obj, Mapping):
        return None
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping) or not state:
        return None
    keys = list(state)
    if not all(isinstance(k, str) for k in keys):
        return None
    if all(k.startswith(_WRAPPER_PREFIX) for k in keys):
        state = {k[len(_WRAPPER_PREFIX):]: v for k, v in state.items()}
    has = {k.split(".", 1)[0] for k in state}
    if not {"resnet", "inv1"} <= has or not all(torch.is_tensor(v) for v in state.values()):
        return None
    return dict(state)


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{source}: a {LAYOUT} file needs {key!r}, which is missing")
    return tuple(state[key].shape)


def released_specs(state: Mapping[str, torch.Tensor], source: str = "released encoder"
                   ) -> tuple[EncoderSpec, dict[str, InverterSpec]]:
    """The specs of the encoder and inverters a released state dict holds (inverters first layer first)."""
    channels = _shape(state, "resnet.layer5.conv5.weight", source)[0]
    size = IMAGE_SIZE // TRUNK_STRIDE
    encoder = EncoderSpec(image_size=IMAGE_SIZE, out_shape=(channels, size, size), target="layer4",
                          stages=4, head_channels=channels, architecture="ganseeing")
    inverters: dict[str, InverterSpec] = {}
    in_shape = encoder.out_shape
    for prefix, layer, target, stride in RELEASED_INVERTERS:
        hidden = _shape(state, f"{prefix}.conv1.weight", source)[0]
        if target == LATENT:
            kernel = _shape(state, f"{prefix}.conv1.weight", source)[2:]
            if kernel != in_shape[1:]:
                raise ValueError(f"{source}: {prefix}.conv1 has a {kernel} kernel, but it must cover the "
                                 f"{in_shape[1:]} map of {layer}")
            out_shape: tuple[int, ...] = (_shape(state, f"{prefix}.conv2.weight", source)[0],)
        elif stride is None:
            out_shape = (hidden, *in_shape[1:])
        else:
            c = _shape(state, f"{prefix}.conv3.weight", source)[0]
            out_shape = (c, in_shape[1] // stride, in_shape[2] // stride)
        inverters[layer] = InverterSpec(
            layer=layer, target=target, in_shape=in_shape, out_shape=out_shape, hidden_channels=hidden,
            normalize_output=target == LATENT, architecture="ganseeing",
            final_conv=target == LATENT or stride is not None)
        in_shape = out_shape
    return encoder, dict(reversed(inverters.items()))


def _encoder_key(key: str) -> str:
    """``resnet.layer2.0.conv1.weight`` -> ``trunk.5.0.conv1.weight``; unknown keys are kept as they
    are, so that a strict load names them."""
    name, _, rest = key.removeprefix("resnet.").partition(".")
    if name in _TRUNK_POSITIONS:
        return f"trunk.{_TRUNK_POSITIONS[name]}.{rest}"
    if name == "layer5" and rest.startswith("conv5."):
        return "head.0." + rest.removeprefix("conv5.")
    return key


def _file_encoder_key(key: str) -> str:
    """The inverse of :func:`_encoder_key`: ``trunk.5.0.conv1.weight`` -> ``resnet.layer2.0.conv1.weight``
    (how the released file spells it, for errors)."""
    positions = {str(v): k for k, v in _TRUNK_POSITIONS.items()}
    if key.startswith("trunk."):
        index, _, rest = key.removeprefix("trunk.").partition(".")
        if index in positions:
            return f"resnet.{positions[index]}.{rest}"
    if key.startswith("head.0."):
        return "resnet.layer5.conv5." + key.removeprefix("head.0.")
    return key


def released_modules(state: Mapping[str, torch.Tensor], source: str = "released encoder"
                     ) -> tuple[ImageEncoder, dict[str, LayerInverter]]:
    """The image encoder and the inverters (first layer first) holding a released state dict's tensors."""
    encoder_spec, inverter_specs = released_specs(state, source)
    groups: dict[str, dict[str, torch.Tensor]] = {"resnet": {}, **{p: {} for p, *_ in RELEASED_INVERTERS}}
    unknown = []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in groups:
            unknown.append(key)
            continue
        value = value.float() if value.is_floating_point() else value
        groups[prefix][_encoder_key(key) if prefix == "resnet" else f"net.{rest}"] = value
    if unknown:
        raise ValueError(f"{source}: unexpected keys for a {LAYOUT} file: {', '.join(unknown[:6])}"
                         + (f", ... ({len(unknown)} in all)" if len(unknown) > 6 else ""))
    with torch.device("meta"):  # load_exact assigns the file's tensors: nothing is initialised twice
        encoder = ImageEncoder(encoder_spec)
        inverters = {layer: LayerInverter(spec) for layer, spec in inverter_specs.items()}
    load_exact(encoder, groups["resnet"], f"{source}: cannot load its resnet.* (image encoder)", optional=(),
               spell=_file_encoder_key, expected=DESCRIPTION)
    by_layer = {layer: prefix for prefix, layer, *_ in RELEASED_INVERTERS}
    for layer, module in inverters.items():
        prefix = by_layer[layer]
        load_exact(module, groups[prefix], f"{source}: cannot load its {prefix}.* (inverter of {layer})",
                   optional=(), spell=lambda k, p=prefix: f"{p}.{k.removeprefix('net.')}", expected=DESCRIPTION)
    return encoder, inverters
