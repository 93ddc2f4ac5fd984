"""What the Hugging Face segmenters share: reading a ``save_pretrained`` folder, and the image
processor's preprocessing applied in torch.

A folder holds ``config.json`` (architecture and ``id2label``), the weights (``model.safetensors``
or ``pytorch_model.bin``, possibly sharded) and ``preprocessor_config.json`` (resize, rescale,
normalisation). Everything is read with ``local_files_only=True`` and ``trust_remote_code=False``:
nothing is downloaded and no code from the folder runs.

The preprocessing is the image processor's, applied in torch to the segmenter's [-1, 1] tensors
(no PIL, no copy to numpy, on the segmenter's device): the tensor becomes the 8-bit image the
processor would read from a file (``round((x + 1) * 127.5)``), it is resized as the processor
resizes (its output size rule, computed by transformers' helper, and its interpolation, with
torchvision and antialiasing, in 8 bits as the processor does for image files), then rescaled and
normalised in float. Resizing in 8 bits is deliberate:
torchvision's 8-bit kernels round differently from a float resize (up to one level on a quarter
of the pixels, more where bicubic overshoots), and with them the class map is transformers' own
on the same 8-bit images.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from .base import Segmenter

HF_EXTRA = "pip install -e '.[hf]'  (or: pip install 'transformers>=5.0')"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def import_transformers(kind: str):
    """The ``transformers`` module, or an error naming the optional extra that installs it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"segmenter={kind} needs Hugging Face transformers, an optional extra of seeing: "
                          f"{HF_EXTRA}") from e
    return transformers


def torch_image_processor(transformers: Any, name: str) -> Any:
    """The torch (torchvision-backed) image processor class ``name``: transformers 5.0 calls it
    ``<name>Fast`` (``<name>`` is the PIL one there); later releases dropped the suffix and warn on it."""
    cls = getattr(transformers, name)
    if any(base.__name__ == "TorchvisionBackend" for base in cls.__mro__):
        return cls
    return getattr(transformers, name + "Fast")


def pretrained_folder(path: str | Path | None, kind: str, model_type: str, example: str) -> Path:
    """``path`` as a folder holding a complete ``save_pretrained`` of a ``model_type`` model, or an error
    naming what is missing and how to get such a folder on a connected machine."""
    get = (f"on a machine with internet, `hf download {example} --local-dir DIR` (huggingface_hub's CLI) "
           f"writes one; nothing is downloaded here")
    if path in (None, "", "???"):
        raise ValueError(f"segmenter={kind} needs segmenter.path: a folder written by transformers' save_pretrained "
                         f"(config.json, model.safetensors, preprocessor_config.json); {get}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"segmenter={kind}: folder {folder} does not exist; {get}")
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"segmenter={kind}: {folder / name} is missing (the folder needs config.json, "
                                    f"the weights and preprocessor_config.json); {get}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"segmenter={kind}: no weights in {folder} (expected one of {', '.join(WEIGHT_FILES)}); "
                                f"{get}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"segmenter={kind}: {folder / 'config.json'} is not valid JSON ({e})") from e
    found = config.get("model_type") if isinstance(config, dict) else None
    if found != model_type:
        raise ValueError(f"segmenter={kind}: {folder / 'config.json'} describes a {found!r} model, not {model_type!r}; "
                         f"point segmenter.path at a {model_type} folder")
    return folder


def class_names_of(config: Any, folder: Path) -> list[str]:
    """The class names of ``config.id2label`` in output order (ids 0..n-1, surrounding spaces removed:
    ADE-150 checkpoints spell one class ``"bed "``)."""
    id2label = {int(k): str(v).strip() for k, v in (config.id2label or {}).items()}
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise ValueError(f"{folder / 'config.json'}: id2label must number the classes 0..n-1, got ids {sorted(id2label)[:10]}")
    return [id2label[i] for i in range(len(id2label))]


def from_pretrained(cls: Any, folder: Path, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` reading only the folder, never running code from it."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per file read says nothing a user can act on
    return cls.from_pretrained(folder, local_files_only=True, trust_remote_code=False, **kwargs)


class Preprocessing:
    """A transformers image processor's resize, rescale and normalisation, applied in torch to
    N x 3 x H x W batches in [-1, 1] (the processor itself stays the authority on sizes)."""

    def __init__(self, processor: Any, folder: Path | None = None):
        self.processor = processor
        self.where = where = folder / "preprocessor_config.json" if folder is not None else "the image processor"
        # a centre crop or a fixed padded size would change which pixels the segment map lines up with
        if getattr(processor, "do_center_crop", None) or getattr(processor, "pad_size", None) is not None:
            raise ValueError(f"{where}: do_center_crop / pad_size are not supported "
                             f"(the segment map must cover the input image); set do_center_crop to false and "
                             f"remove pad_size")
        self.resize = bool(processor.do_resize)
        self.rescale_factor = float(processor.rescale_factor) if processor.do_rescale else 1.0
        self.normalize = bool(processor.do_normalize)
        self.mean = tuple(float(v) for v in _channels(processor.image_mean, where, "image_mean"))
        self.std = tuple(float(v) for v in _channels(processor.image_std, where, "image_std"))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # the 8-bit image the processor reads
        if self.resize:
            x = self._resize(x)
        x = x.to(torch.float32) * self.rescale_factor
        if self.normalize:
            mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The processor's resize rule: a fixed ``height`` x ``width``, or the shorter side to
        ``shortest_edge`` (the longer one at most ``longest_edge``), rounded up to ``size_divisor``
        (Mask2Former's) — computed with transformers' own helper."""
        from transformers.image_transforms import get_size_with_aspect_ratio

        size = dict(self.processor.size)
        if size.get("height") and size.get("width"):
            out = (int(size["height"]), int(size["width"]))
        elif size.get("shortest_edge"):
            out = get_size_with_aspect_ratio((height, width), int(size["shortest_edge"]), size.get("longest_edge"))
        else:
            raise ValueError(f"{self.where}: size {size} is not supported (give height and width, or shortest_edge)")
        divisor = int(getattr(self.processor, "size_divisor", None) or 0)
        if divisor > 0:
            out = tuple(int(math.ceil(v / divisor) * divisor) for v in out)
        return int(out[0]), int(out[1])

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvF
        from transformers.image_utils import pil_torch_interpolation_mapping

        size = self.output_size(*x.shape[-2:])
        if size == tuple(x.shape[-2:]):
            return x
        # the processor's interpolation (its PIL resample code), antialiased, as transformers' torchvision backend
        return tvF.resize(x, list(size), interpolation=pil_torch_interpolation_mapping[self.processor.resample],
                          antialias=True)

    def describe(self) -> dict[str, Any]:
        size = {k: v for k, v in dict(self.processor.size).items() if v is not None} if self.resize else None
        return {"resize": size, "size_divisor": getattr(self.processor, "size_divisor", None),
                "rescale_factor": self.rescale_factor, "mean": self.mean if self.normalize else None,
                "std": self.std if self.normalize else None}


def _channels(values: Any, where: Any, key: str) -> Sequence[float]:
    values = [values] * 3 if isinstance(values, (int, float)) else list(values)
    if len(values) != 3:
        raise ValueError(f"{where}: {key} must have 3 values (RGB), got {values}")
    return values


class HFSegmenter(Segmenter):
    """A transformers segmentation model behind the :class:`Segmenter` interface; subclasses turn
    the model's outputs into per-pixel class scores at the input resolution."""

    def __init__(self, model: torch.nn.Module, preprocessing: Preprocessing, class_names: Sequence[str],
                 folder: Path | None = None):
        super().__init__(class_names)
        self.model = model
        self.preprocessing = preprocessing
        self.folder = folder
        self.requires_grad_(False)
        self.eval()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, folder={self.folder}, preprocessing={self.preprocessing.describe()}"
