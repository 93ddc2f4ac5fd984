"""Image sources for tallies: where the real and the generated images of an FSD come from.

A source yields batches of images (``B x 3 x R x R`` float32 in [-1, 1]) for a sample
``[offset, offset + n)`` of its images at a requested resolution, plus ground-truth
label maps when it knows them (the scenes world does). Sources are built from the
``real=`` / ``fake=`` config groups:

- :class:`ScenesSource`: the embedded scenes world, optionally with classes dropped;
- :class:`ImageFolderSource`: every image file under a folder (recursive);
- :class:`LSUNSource`: an LSUN lmdb database in torchvision's layout (values are
  encoded images);
- :class:`GeneratorSource`: samples of a :class:`~seeing.gans.layered.LayeredGenerator`.

Files that cannot be read or decoded are skipped, counted (``source.skipped``) and
logged, never fatal: one bad JPEG must not end a tally of 10,000 images. A source
that holds no images at all, a missing folder or an unreadable database is an error, found by
:meth:`ImageSource.check` before any tally. Images of every PIL mode are read at their own
scale (16-bit greyscale divided by 257, not clipped to white; see :func:`to_rgb`).
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from seeing.errors import UsageError
from seeing.state_dicts import fingerprint

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


@dataclass
class Batch:
    images: torch.Tensor  # B x 3 x R x R in [-1, 1]
    labels: torch.Tensor | None = None  # B x R x R ground truth, when the source knows it
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason) dropped from this batch


class EmptySourceError(UsageError):
    """A source that has no images to give."""


class ImageSource:
    """Base: a named, seeded sequence of images. Subclasses implement :meth:`_batches`."""

    kind = "source"
    has_labels = False

    def __init__(self, name: str | None = None, seed: int = 0, offset: int = 0, num_workers: int = 0):
        self.name = name or self.kind
        self.seed, self.offset, self.num_workers = int(seed), int(offset), int(num_workers)
        self.skipped: list[tuple[str, str]] = []

    def identity(self) -> dict[str, Any]:
        """What the images depend on; part of the tally cache key."""
        return {"kind": self.kind, "seed": self.seed, "offset": self.offset}

    def describe(self) -> str:
        return self.name

    def check(self) -> None:
        """Open the source and check that it can give images, before any tally: a missing folder or
        database, an empty one or an unreadable one is an error naming the path and the fix.
        Cheap: listings and file headers, no image decoded."""

    def batches(
        self, n: int, batch_size: int, resolution: int, extra_offset: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[Batch]:
        """Images ``[offset + extra_offset, ... + n)`` of this source in batches. ``extra_offset``
        draws a sample disjoint from the default one (the real-vs-real baseline)."""
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
        for batch in self._batches(n, batch_size, resolution, self.offset + extra_offset, torch.device(device)):
            for item, reason in batch.skipped:
                log.warning("%s: skipped %s (%s)", self.name, item, reason)
            self.skipped.extend(batch.skipped)
            yield batch

    def _batches(self, n, batch_size, resolution, start, device) -> Iterator[Batch]:
        raise NotImplementedError


def _resize_square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Square images (generator samples, scenes) at ``resolution``, bilinear with antialiasing."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images, [resolution, resolution], antialias=True)


def instantiate_unwrapped(cfg: Any) -> Any:
    """``hydra.utils.instantiate``, but a missing file surfaces as the loader's own
    FileNotFoundError (which names the expected file) rather than wrapped by Hydra."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(cfg)
    except InstantiationException as e:
        if isinstance(e.__cause__, FileNotFoundError):
            raise e.__cause__ from None
        raise


# ---------------------------------------------------------------------------- scenes world


class ScenesSource(ImageSource):
    """The scenes world ``seed``, images ``offset ...``; ``drop`` removes classes from a
    ``drop_fraction`` of images. Provides exact label maps (the "oracle" segmentation)."""

    kind = "scenes"
    has_labels = True

    def __init__(
        self,
        name: str | None = None,
        seed: int = 0,
        offset: int = 0,
        drop: Sequence[str] = (),
        drop_fraction: float = 1.0,
        num_workers: int = 0,
    ):
        super().__init__(name, seed, offset, num_workers)
        from seeing.data.scenes import ScenesDataset

        self.drop, self.drop_fraction = tuple(drop), float(drop_fraction)
        ScenesDataset(1, drop=self.drop, drop_fraction=self.drop_fraction)  # validates class names early

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "drop": list(self.drop), "drop_fraction": self.drop_fraction}

    def describe(self) -> str:
        if not self.drop:
            return self.name
        return f"{self.name} (drop {', '.join(self.drop)} from {self.drop_fraction:.0%} of images)"

    def _batches(self, n, batch_size, resolution, start, device):
        from seeing.data.scenes import ScenesDataset

        ds = ScenesDataset(n, resolution, self.seed, self.drop, self.drop_fraction, offset=start)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=self.num_workers)
        for images, labels in loader:
            yield Batch(images.to(device), labels.to(device))


# ---------------------------------------------------------------------------- decoded files


@functools.lru_cache(maxsize=8)
def image_transform(resolution: int):
    """What every image file goes through, as the paper's FSD does it (torchvision): the shorter side
    resized to ``resolution`` (bilinear), a centre crop to a square, values scaled to [-1, 1]."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize(resolution, interpolation=v2.InterpolationMode.BILINEAR,
                                                 antialias=True),
                       v2.CenterCrop(resolution), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])


# 16-bit greyscale as PIL opens it (PNG, TIFF): 0..65535, so 65535 / 257 = 255
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image of ``img`` at its own scale. ``convert("RGB")`` clips 16- and 32-bit
    values to 255, so a 16-bit greyscale photo would come out white: those are divided by 257
    (65535 -> 255); 32-bit integer images (``I``) are read as 16-bit when their values fit, float
    images (``F``) as 0..1 or 0..255 by their range. An image whose scale cannot be told raises,
    and the source skips it with that reason (counted and logged)."""
    if img.mode in ("RGB",):
        return img
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{img.mode} image with values {values.min()}..{values.max()}: not 8- or 16-bit")
        return Image.fromarray(np.round(values / 257).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
            raise ValueError(f"float image with values {low:g}..{high:g}: neither 0..1 nor 0..255")
        scale = 255.0 if high <= 1.0 else 1.0
        return Image.fromarray(np.round(values * scale).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")  # 8-bit modes: L, P, RGBA, CMYK, YCbCr, 1, LA, ...


def _to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """3 x R x R in [-1, 1] (see :func:`image_transform`)."""
    return image_transform(int(resolution))(to_rgb(img))


def _decode(data: bytes | str | Path, resolution: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        img.load()  # decode now, so truncated files fail here and not later
        return _to_tensor(img, resolution)


class _DecodeDataset(Dataset):
    """Items are decoded lazily; a failure returns the reason instead of raising."""

    def __init__(self, items: Sequence[Any], resolution: int, read):
        self.items, self.resolution, self.read = list(items), resolution, read

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        try:
            return self.read(item, self.resolution), str(item)
        except Exception as e:  # any unreadable or undecodable file is skipped, never fatal
            return None, f"{item}\t{type(e).__name__}: {e}"


def _collate_decoded(samples):
    good = [img for img, _ in samples if img is not None]
    skipped = [tuple(info.split("\t", 1)) for img, info in samples if img is None]
    return (torch.stack(good) if good else None), skipped


def _decoded_batches(items, batch_size, resolution, read, device, num_workers):
    loader = DataLoader(
        _DecodeDataset(items, resolution, read),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_decoded,
    )
    for images, skipped in loader:
        if images is None:
            images = torch.empty(0, 3, resolution, resolution)
        yield Batch(images.to(device), None, skipped)


def _select(count: int, n: int, start: int, seed: int | None) -> np.ndarray:
    """Positions ``[start, start + n)`` of a seeded permutation of ``count`` items (or in order)."""
    order = np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)
    chosen = order[start : start + n]
    if len(chosen) < n:
        log.warning("asked for %d images from position %d but the source holds %d: using %d", n, start, count,
                    len(chosen))
    return chosen


# folders that loggers and launchers write into run folders: never images of a source
NOT_IMAGE_FOLDERS = frozenset({"wandb", "csv", "lightning_logs", "checkpoints", "__pycache__"})


class ImageFolderSource(ImageSource):
    """Image files found recursively under ``path``. With ``shuffle`` the sample is a seeded
    random subset; otherwise files are taken in sorted order. Hidden folders (``.hydra``,
    ``.submitit``) and the folders loggers write (:data:`NOT_IMAGE_FOLDERS`) are not searched:
    their PNGs (a W&B grid, say) are not samples; how many were passed over is logged."""

    kind = "folder"

    def __init__(
        self,
        path: str,
        name: str | None = None,
        seed: int = 0,
        offset: int = 0,
        shuffle: bool = True,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        num_workers: int = 0,
    ):
        super().__init__(name, seed, offset, num_workers)
        self.path = Path(os.path.expanduser(str(path)))
        self.shuffle = bool(shuffle)
        self.extensions = tuple(e.lower() for e in extensions)
        self._listing: list[str] | None = None  # relative paths, from the last scan

    def _scan(self) -> list[tuple[str, int, int, int]]:
        """``(relative path, size, mtime_ns, ctime_ns)`` of every image file under the folder, in
        the order of sorted Paths: one os.scandir walk and one stat per file, no file contents read,
        plain strings throughout (10^5 files in well under a second). Like ``Path.rglob`` it does
        not descend into symlinked folders."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"image folder {self.path} does not exist or is not a directory")
        found, folders, passed = [], [""], []
        while folders:
            rel = folders.pop()
            with os.scandir(os.path.join(self.path, rel)) as entries:
                for entry in entries:
                    name = rel + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name.startswith(".") or entry.name in NOT_IMAGE_FOLDERS:
                            passed.append(name)
                        else:
                            folders.append(name + os.sep)
                    elif self._is_image_name(entry.name) and entry.is_file():
                        st = entry.stat()
                        found.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        if passed and self._listing is None:
            log.info("image folder %s: not searched: %s (hidden, logger or checkpoint folders)", self.path,
                     ", ".join(sorted(passed)))
        if not found:
            raise EmptySourceError(f"no image files ({', '.join(self.extensions)}) under {self.path}"
                                   + (f" outside {', '.join(sorted(passed))}" if passed else ""))
        # component-wise, as Paths sort: NUL sorts before every character a name can hold
        found.sort(key=lambda f: f[0].replace(os.sep, "\0"))
        self._listing = [f[0] for f in found]
        return found

    def _is_image_name(self, name: str) -> bool:
        """``Path(name).suffix.lower() in extensions``, without building a Path."""
        dot = name.rfind(".")
        return 0 < dot < len(name) - 1 and name[dot:].lower() in self.extensions

    def files(self) -> list[Path]:
        return [self.path / name for name in self._names()]

    def _names(self) -> list[str]:
        """Paths relative to the folder of the images the next tally reads (from the last scan)."""
        if self._listing is None:
            self._scan()
        return self._listing

    def identity(self) -> dict[str, Any]:
        """Keyed by every file's name (relative to the folder), size, mtime and ctime: replacing a
        file (even by an older one, ``cp -p``), renaming, adding or removing one changes it. ctime
        cannot be set back by copying tools, so it also catches a swap of two same-sized files
        with equal mtimes; a chmod/chown of the files changes it too (a harmless re-tally).
        Rescanned on every call; the listing scanned is the one the next tally reads."""
        lines = "".join(f"{name}\0{size}\0{mtime}\0{ctime}\n" for name, size, mtime, ctime in self._scan())
        return {**super().identity(), "path": str(self.path.resolve()), "shuffle": self.shuffle,
                "files": len(self._listing), "listing_sha256": hashlib.sha256(lines.encode()).hexdigest()}

    def describe(self) -> str:
        return f"{self.name} ({self.path})"

    def check(self) -> None:
        self._scan()  # a missing or empty folder raises, naming it

    def _batches(self, n, batch_size, resolution, start, device):
        names = self._names()
        chosen = [self.path / names[i] for i in _select(len(names), n, start, self.seed if self.shuffle else None)]
        yield from _decoded_batches(chosen, batch_size, resolution, _decode, device, self.num_workers)


class _LSUNReader:
    """Reads values of an lmdb environment by key; opens the environment lazily (once per worker)."""

    def __init__(self, path: Path):
        self.path, self.env = path, None

    def __call__(self, key: bytes, resolution: int) -> torch.Tensor:
        if self.env is None:
            self.env = _open_lmdb(self.path)
        with self.env.begin(write=False) as txn:
            data = txn.get(key)
        if data is None:
            raise KeyError(f"key {key!r} vanished from {self.path}")
        return _decode(bytes(data), resolution)

    def __getstate__(self):
        return {"path": self.path, "env": None}


LSUN_LAYOUT = ("an LSUN category database as the LSUN release ships it (e.g. church_outdoor_train_lmdb/): a folder "
               "holding data.mdb (and lock.mdb), an lmdb environment whose values are encoded images")


def _lmdb_error(path: Path, err: Exception) -> UsageError:
    return UsageError(f"{path} is not a readable lmdb database ({type(err).__name__}: {err}); expected {LSUN_LAYOUT}")


def _open_lmdb(path: Path):
    import lmdb

    try:
        return lmdb.open(str(path), max_readers=64, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as err:  # a damaged or foreign file: lmdb names neither it nor the layout
        raise _lmdb_error(path, err) from err


class LSUNSource(ImageSource):
    """An LSUN category database (e.g. ``church_outdoor_train_lmdb``): the layout torchvision's
    ``LSUN`` reads, an lmdb environment whose values are encoded images (webp/jpeg)."""

    kind = "lsun"

    def __init__(
        self,
        path: str,
        name: str | None = None,
        seed: int = 0,
        offset: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ):
        super().__init__(name, seed, offset, num_workers)
        self.path = Path(os.path.expanduser(str(path)))
        self.shuffle = bool(shuffle)
        self._keys: list[bytes] | None = None

    def keys(self) -> list[bytes]:
        import lmdb

        if self._keys is None:
            if not (self.path / "data.mdb").is_file():
                raise FileNotFoundError(f"no LSUN lmdb database at {self.path} (expected {self.path / 'data.mdb'}; "
                                        f"{LSUN_LAYOUT})")
            env = _open_lmdb(self.path)
            try:
                with env.begin(write=False) as txn:
                    self._keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
            except lmdb.Error as err:
                raise _lmdb_error(self.path, err) from err
            finally:
                env.close()
            if not self._keys:
                raise EmptySourceError(f"LSUN database {self.path} holds no images")
        return self._keys

    def identity(self) -> dict[str, Any]:
        """Keyed by the database file's size, mtime and ctime, and lmdb's own entry count and last
        transaction id (every committed write raises it): cheap, without reading any values."""
        data = self.path / "data.mdb"
        if not data.is_file():
            raise FileNotFoundError(f"no LSUN lmdb database at {self.path} (expected {data})")
        st = data.stat()
        env = _open_lmdb(self.path)
        try:
            entries, last_txn = env.stat()["entries"], env.info()["last_txnid"]
        except __import__("lmdb").Error as err:
            raise _lmdb_error(self.path, err) from err
        finally:
            env.close()
        return {**super().identity(), "path": str(self.path.resolve()), "shuffle": self.shuffle,
                "entries": int(entries), "last_txnid": int(last_txn), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}

    def describe(self) -> str:
        return f"{self.name} ({self.path})"

    def check(self) -> None:
        self.keys()  # a missing, unreadable or empty database raises, naming it

    def _batches(self, n, batch_size, resolution, start, device):
        keys = self.keys()
        chosen = [keys[i] for i in _select(len(keys), n, start, self.seed if self.shuffle else None)]
        yield from _decoded_batches(chosen, batch_size, resolution, _LSUNReader(self.path), device, self.num_workers)


# ---------------------------------------------------------------------------- generator samples


class GeneratorSource(ImageSource):
    """Samples of a generator: latents ``sample_z(offset + n, seed)[offset:]`` through ``generator(z)``.

    ``generator`` is a config with a ``_target_`` building a LayeredGenerator (e.g.
    ``${model.generator}``), or the module itself. Its identity (the tally cache key) holds a
    fingerprint of the weights, not just the config: ``checkpoint: null`` means "the shipped
    file", and a newer package may ship different weights under the same config.
    """

    kind = "generator"

    def __init__(self, generator: Any, name: str | None = None, seed: int = 0, offset: int = 0, num_workers: int = 0):
        super().__init__(name, seed, offset, num_workers)
        self.generator_cfg = generator
        self._generator = None

    def identity(self) -> dict[str, Any]:
        cfg = self.generator_cfg
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        return {**super().identity(), "generator": cfg if isinstance(cfg, dict) else type(cfg).__name__,
                "weights_sha256": fingerprint(self.generator())}

    def check(self) -> None:
        self.generator()  # a missing or damaged checkpoint raises, naming it

    def generator(self):
        if self._generator is None:
            if isinstance(self.generator_cfg, torch.nn.Module):
                self._generator = self.generator_cfg
            else:
                self._generator = instantiate_unwrapped(self.generator_cfg)
            self._generator.eval()
        return self._generator

    @torch.no_grad()
    def _batches(self, n, batch_size, resolution, start, device):
        gen = self.generator().to(device)
        z_all = gen.sample_z(start + n, self.seed)[start:]
        for i in range(0, n, batch_size):
            images = gen(z_all[i : i + batch_size].to(device)).clamp(-1, 1)
            yield Batch(_resize_square(images.float(), resolution))


# ---------------------------------------------------------------------------- tensors in memory


class TensorSource(ImageSource):
    """Images already in memory (``N x 3 x H x W`` in [-1, 1], optional ``N x H x W`` labels):
    tally a tensor from Python, or time the tally machinery without any decoding."""

    kind = "tensor"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, name: str | None = None):
        super().__init__(name)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be N x 3 x H x W, got {tuple(images.shape)}")
        if len(images) == 0:
            raise EmptySourceError("TensorSource got no images")
        self.images, self.labels = images, labels
        self.has_labels = labels is not None

    def identity(self) -> dict[str, Any]:
        # content hash: two different tensors must never share cached tallies
        digest = hashlib.sha256(self.images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        return {**super().identity(), "sha256": digest}

    def _batches(self, n, batch_size, resolution, start, device):
        stop = min(start + n, len(self.images))
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            labels = self.labels[i:j].to(device) if self.labels is not None else None
            if labels is not None and labels.shape[-1] != resolution:
                raise ValueError(f"labels are {labels.shape[-1]} px, the tally asked for {resolution}")
            yield Batch(_resize_square(self.images[i:j].to(device), resolution), labels)
