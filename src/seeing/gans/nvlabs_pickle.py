"""Read NVlabs network pickles (stylegan2-ada-pytorch, stylegan3) as data, never as code.

NVlabs snapshots pickle every network through ``torch_utils.persistence``: each module is a
call ``_reconstruct_persistent_obj(meta)`` whose ``meta`` carries the full source text of the
module that defines it, and the upstream loader *executes* that text. A checkpoint is data, so
this reader resolves only an allow-list of globals and turns that call into an inert
:class:`PersistentRecord` (class name, a digest of the embedded source, the module's state).
Anything else a file asks for is refused with an error naming the file and the global.

Tensor storages are nested legacy ``torch.save`` blobs; they are read with
``torch.load(weights_only=True)``. numpy arrays (some layer constants of StyleGAN3) are
rebuilt by numpy's own reconstructors, under both ``numpy.core`` (pickles made with numpy < 2,
such as the published ones) and ``numpy._core``.
"""
from __future__ import annotations

import collections
import hashlib
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

SNAPSHOT_KEYS = ("G", "D", "G_ema", "augment_pipe", "training_set_kwargs")
PERSISTENCE = "torch_utils.persistence"


class RefusedPickle(pickle.UnpicklingError):
    """The file asks for something a StyleGAN snapshot never holds; nothing of it was run."""


class EasyDict(dict):
    """dnnlib's attribute dict, as plain data (the keyword arguments the networks were built with)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class PersistentRecord:
    """One pickled NVlabs module, kept as data: what upstream would rebuild by running its source."""

    class_name: str
    source_sha256: str  # digest of the embedded module source (never executed)
    state: dict = field(repr=False)

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def children(self) -> dict[str, "PersistentRecord | Any"]:
        return dict(self.state.get("_modules") or {})

    def child(self, dotted: str) -> "PersistentRecord":
        record: Any = self
        for name in dotted.split("."):
            record = record.children[name]
        return record

    def attribute(self, name: str, default: Any = None) -> Any:
        """A plain (non-tensor) attribute the module set on itself, e.g. a StyleGAN3 layer's ``bandwidth``."""
        return self.state.get(name, default)

    def tensors(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter and buffer of this module and its children, named as ``state_dict`` names them."""
        for group in ("_parameters", "_buffers"):
            for name, value in (self.state.get(group) or {}).items():
                if value is not None:
                    yield prefix + name, value
        for name, child in self.children.items():
            if isinstance(child, PersistentRecord):
                yield from child.tensors(f"{prefix}{name}.")
            elif child is not None:
                raise TypeError(f"module {prefix}{name} is a {type(child).__name__}, not a pickled network module")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())


def _persistent_object(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta:
        raise RefusedPickle(f"a persistent object of an unknown kind ({type(meta).__name__}, "
                                     f"type={meta.get('type') if isinstance(meta, dict) else None!r})")
    source = meta.get("module_src") or ""
    return PersistentRecord(class_name=str(meta["class_name"]),
                            source_sha256=hashlib.sha256(source.encode()).hexdigest(),
                            state=dict(meta.get("state") or {}))


def _storage_from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _parameter(data: torch.Tensor, requires_grad: bool, backward_hooks: Any, *_: Any) -> torch.Tensor:
    # a plain tensor: the generator built from these records makes its own parameters
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray as _multiarray  # numpy >= 2 (the project's pin)

    allowed: dict[tuple[str, str], Any] = {
        (PERSISTENCE, "_reconstruct_persistent_obj"): _persistent_object,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _multiarray._reconstruct
        allowed[(module, "scalar")] = _multiarray.scalar
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"refusing to load {self._path}: it asks for the Python global {module}.{name}, which an NVlabs "
                "StyleGAN snapshot does not hold (seeing reads checkpoints as data and never runs code from them)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle(f"refusing to load {self._path}: it uses persistent ids ({pid!r}), which an "
                                     "NVlabs snapshot does not")


def looks_like_nvlabs_pickle(path: str | Path) -> bool:
    """A plain pickle (not a torch.save zip) that names NVlabs' persistence module near its start."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return head[:1] == b"\x80" and PERSISTENCE.encode() in head


def read_nvlabs_pickle(path: str | Path) -> Any:
    """The unpickled object, with every network an inert :class:`PersistentRecord`."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except RefusedPickle:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as err:
            raise ValueError(f"{path} ({path.stat().st_size} bytes) is not a readable NVlabs pickle: truncated or "
                             f"damaged ({type(err).__name__}: {err}). Re-copy the file.") from err


def read_snapshot_generator(path: str | Path) -> PersistentRecord:
    """``G_ema`` of an NVlabs training snapshot (the EMA weights every upstream tool samples from).

    Network pickles published without a training loop's other entries are accepted as long as
    they hold ``G_ema``; a pickle of anything else is refused, saying what it holds.
    """
    path = Path(path)
    obj = read_nvlabs_pickle(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is a pickle of a {type(obj).__name__}, not an NVlabs snapshot (a dict with "
                         f"{list(SNAPSHOT_KEYS)})")
    generator = obj.get("G_ema")
    if not isinstance(generator, PersistentRecord):
        raise ValueError(f"{path} is not an NVlabs snapshot with a G_ema network: it holds {sorted(map(str, obj))} "
                         f"(expected {list(SNAPSHOT_KEYS)})")
    return generator
