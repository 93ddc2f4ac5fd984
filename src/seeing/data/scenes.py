"""The embedded scenes world: procedurally drawn street scenes with exact label maps.

Each scene is a pure function of ``(seed, index, resolution)``. A scene is first
laid out as a list of painted primitives (polygons and ellipses), far to near;
the primitives are then rasterised once into an *object-id* map, from which both
the label map and the colours are looked up, so the label map is exact by
construction. Texture (grass, brick, asphalt noise, sky gradient, shading) is
added per pixel afterwards and never changes a label.

``drop`` removes chosen classes from a chosen fraction of images: the layout is
drawn from the same random stream either way, and the dropped objects are simply
not painted, so what they would have covered shows the background behind them.
That plants a known mode drop for tests and demos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

CLASS_NAMES: tuple[str, ...] = (
    "sky", "mountain", "building", "road", "grass", "tree",
    "person", "car", "signboard", "window", "door", "fence",
)
CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}
NUM_CLASSES = len(CLASS_NAMES)

# A palette for showing label maps (not used for drawing scenes).
LABEL_COLORS = np.array([
    [135, 190, 235], [110, 100, 130], [170, 90, 70], [80, 80, 85], [70, 160, 60], [20, 100, 30],
    [230, 40, 160], [230, 200, 20], [250, 120, 0], [120, 220, 255], [120, 60, 20], [200, 200, 200],
], dtype=np.uint8)


@dataclass
class Primitive:
    """One painted shape. ``owner`` is the object class whose removal also removes this part
    (a window belongs to its building); ``shape`` is ("poly", points) or ("ellipse", box)."""

    cls: int
    owner: int
    color: tuple[float, float, float]
    shape: tuple
    shade: float = 0.0  # vertical brightness gradient across the shape's box


@dataclass
class Layout:
    horizon: float
    sky_top: tuple[float, float, float]
    sky_bottom: tuple[float, float, float]
    primitives: list[Primitive] = field(default_factory=list)


def _jitter(rng, color, amount=0.12):
    c = np.asarray(color, dtype=np.float64) * (1 + rng.uniform(-amount, amount, 3))
    return tuple(np.clip(c, 0, 1))


def _rect(x0, y0, x1, y1):
    return ("poly", [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def layout_scene(rng: np.random.Generator) -> Layout:
    """Draw a scene's layout in unit coordinates (x right, y down, both in [0, 1])."""
    C = CLASS_INDEX
    horizon = rng.uniform(0.38, 0.62)
    mood = rng.integers(3)  # clear, dusk, overcast
    sky_top, sky_bottom = [
        ((0.25, 0.45, 0.85), (0.65, 0.8, 0.95)),
        ((0.35, 0.3, 0.6), (0.95, 0.6, 0.35)),
        ((0.55, 0.57, 0.62), (0.8, 0.8, 0.82)),
    ][mood]
    lay = Layout(horizon, _jitter(rng, sky_top), _jitter(rng, sky_bottom))
    prims = lay.primitives

    if rng.random() < 0.6:  # mountain ridge behind everything
        xs = np.linspace(-0.05, 1.05, rng.integers(4, 9))
        peak = rng.uniform(0.08, 0.25)
        ys = horizon - rng.uniform(0.2, 1.0, xs.size) * peak
        pts = [(x, y) for x, y in zip(xs, ys)] + [(1.05, horizon + 0.01), (-0.05, horizon + 0.01)]
        prims.append(Primitive(C["mountain"], C["mountain"], _jitter(rng, (0.42, 0.4, 0.5), 0.2), ("poly", pts), 0.3))

    ground = _jitter(rng, (0.3, 0.6, 0.25), 0.2)
    prims.append(Primitive(C["grass"], C["grass"], ground, _rect(-0.1, horizon, 1.1, 1.1), 0.3))

    # road: a perspective trapezoid from the bottom edge to a vanishing point on the horizon
    road_center = rng.uniform(0.3, 0.7)
    road_bottom = rng.uniform(0.45, 1.0)
    road_top = rng.uniform(0.03, 0.12)
    vx = road_center + rng.uniform(-0.15, 0.15)
    road_pts = [(vx - road_top / 2, horizon), (vx + road_top / 2, horizon),
                (road_center + road_bottom / 2, 1.0), (road_center - road_bottom / 2, 1.0)]
    prims.append(Primitive(C["road"], C["road"], _jitter(rng, (0.35, 0.35, 0.37), 0.15), ("poly", road_pts), -0.2))

    def road_x_range(y):
        t = (y - horizon) / max(1e-6, 1.0 - horizon)
        half = (road_top + t * (road_bottom - road_top)) / 2
        cx = vx + t * (road_center - vx)
        return cx - half, cx + half

    # things standing on the ground, sorted far (small y) to near; each item draws itself
    items: list[tuple[float, callable]] = []

    for _ in range(rng.integers(0, 5)):  # buildings along the horizon
        w, h = rng.uniform(0.1, 0.3), rng.uniform(0.12, 0.45)
        x0 = rng.uniform(-0.1, 1.0 - w * 0.5)
        base = horizon + rng.uniform(0.0, 0.04)
        items.append((base - 0.5, lambda x0=x0, w=w, h=h, base=base: _building(rng, prims, x0, w, h, base)))

    if rng.random() < 0.35:  # a fence across the ground
        y = rng.uniform(horizon + 0.05, 0.9)
        items.append((y, lambda y=y: _fence(rng, prims, y, horizon)))

    for _ in range(rng.integers(0, 5)):  # trees
        y = rng.uniform(horizon + 0.01, 1.0)
        x = rng.uniform(0.0, 1.0)
        lo, hi = road_x_range(y)
        if lo - 0.03 < x < hi + 0.03:
            x = lo - 0.05 if rng.random() < 0.5 else hi + 0.05
        items.append((y, lambda x=x, y=y: _tree(rng, prims, x, y, horizon)))

    for _ in range(rng.integers(0, 4)):  # cars on the road
        y = rng.uniform(horizon + 0.04, 0.98)
        lo, hi = road_x_range(y)
        x = rng.uniform(lo, hi)
        items.append((y, lambda x=x, y=y: _car(rng, prims, x, y, horizon)))

    for _ in range(rng.integers(0, 4)):  # people anywhere on the ground
        y = rng.uniform(horizon + 0.03, 1.0)
        x = rng.uniform(0.02, 0.98)
        items.append((y, lambda x=x, y=y: _person(rng, prims, x, y, horizon)))

    for _ in range(rng.integers(0, 3)):  # signboards beside the road
        y = rng.uniform(horizon + 0.05, 0.95)
        lo, hi = road_x_range(y)
        x = lo - 0.04 if rng.random() < 0.5 else hi + 0.04
        items.append((y, lambda x=x, y=y: _signboard(rng, prims, x, y, horizon)))

    for _, draw in sorted(items, key=lambda it: it[0]):
        draw()
    return lay


def _depth_scale(y, horizon):
    """Apparent size of an object whose foot is at ``y``: zero at the horizon, 1 at the bottom."""
    return max(0.05, (y - horizon) / max(1e-6, 1 - horizon))


def _building(rng, prims, x0, w, h, base):
    C = CLASS_INDEX
    color = _jitter(rng, [(0.7, 0.45, 0.35), (0.75, 0.72, 0.65), (0.5, 0.5, 0.55), (0.85, 0.8, 0.6)][rng.integers(4)], 0.15)
    top = base - h
    prims.append(Primitive(C["building"], C["building"], color, _rect(x0, top, x0 + w, base), 0.25))
    if rng.random() < 0.3:  # pitched roof
        prims.append(Primitive(C["building"], C["building"], _jitter(rng, (0.45, 0.25, 0.2)),
                               ("poly", [(x0 - 0.01, top), (x0 + w + 0.01, top), (x0 + w / 2, top - h * 0.25)])))
    if rng.random() < 0.85:  # window grid
        cols, rows = rng.integers(2, 5), rng.integers(2, 6)
        wcolor = _jitter(rng, [(0.55, 0.75, 0.9), (0.2, 0.25, 0.35), (0.95, 0.85, 0.5)][rng.integers(3)], 0.1)
        ww, wh = w / cols * rng.uniform(0.4, 0.65), h / rows * rng.uniform(0.35, 0.6)
        for i in range(cols):
            for j in range(rows - 1):
                cx = x0 + (i + 0.5) * w / cols
                cy = top + (j + 0.5) * h / rows
                prims.append(Primitive(C["window"], C["building"], wcolor,
                                       _rect(cx - ww / 2, cy - wh / 2, cx + ww / 2, cy + wh / 2)))
    if rng.random() < 0.7:  # door on the ground floor
        dw, dh = w * rng.uniform(0.15, 0.3), h * rng.uniform(0.15, 0.3)
        cx = x0 + w * rng.uniform(0.25, 0.75)
        prims.append(Primitive(C["door"], C["building"], _jitter(rng, (0.4, 0.22, 0.1), 0.25),
                               _rect(cx - dw / 2, base - dh, cx + dw / 2, base)))


def _tree(rng, prims, x, y, horizon):
    C = CLASS_INDEX
    s = _depth_scale(y, horizon) * rng.uniform(0.6, 1.2)
    trunk_w, trunk_h = 0.03 * s, 0.12 * s
    prims.append(Primitive(C["tree"], C["tree"], _jitter(rng, (0.35, 0.22, 0.1)),
                           _rect(x - trunk_w / 2, y - trunk_h, x + trunk_w / 2, y)))
    green = _jitter(rng, [(0.1, 0.4, 0.12), (0.2, 0.5, 0.15), (0.05, 0.3, 0.15)][rng.integers(3)], 0.2)
    if rng.random() < 0.5:  # broadleaf crown
        r = 0.1 * s * rng.uniform(0.8, 1.3)
        cy = y - trunk_h - r * 0.8
        prims.append(Primitive(C["tree"], C["tree"], green, ("ellipse", (x - r, cy - r, x + r, cy + r * 1.1)), 0.3))
    else:  # conifer
        hw, hh = 0.08 * s, 0.3 * s
        prims.append(Primitive(C["tree"], C["tree"], green,
                               ("poly", [(x - hw, y - trunk_h), (x + hw, y - trunk_h), (x, y - trunk_h - hh)]), 0.3))


def _car(rng, prims, x, y, horizon):
    C = CLASS_INDEX
    s = _depth_scale(y, horizon) * rng.uniform(0.8, 1.1)
    w, h = 0.22 * s, 0.07 * s
    color = _jitter(rng, [(0.8, 0.1, 0.1), (0.1, 0.2, 0.7), (0.9, 0.9, 0.9), (0.1, 0.1, 0.1), (0.9, 0.7, 0.1)][rng.integers(5)], 0.1)
    body_top = y - h * 1.3
    prims.append(Primitive(C["car"], C["car"], color, _rect(x - w / 2, body_top, x + w / 2, y - h * 0.3), 0.4))
    prims.append(Primitive(C["car"], C["car"], _jitter(rng, (0.6, 0.75, 0.85), 0.1),
                           ("poly", [(x - w * 0.3, body_top), (x + w * 0.3, body_top),
                                     (x + w * 0.2, body_top - h * 0.8), (x - w * 0.2, body_top - h * 0.8)])))
    r = h * 0.4
    for wx in (x - w * 0.3, x + w * 0.3):
        prims.append(Primitive(C["car"], C["car"], (0.05, 0.05, 0.05), ("ellipse", (wx - r, y - 2 * r, wx + r, y))))


def _person(rng, prims, x, y, horizon):
    C = CLASS_INDEX
    s = _depth_scale(y, horizon) * rng.uniform(0.8, 1.2)
    h, w = 0.22 * s, 0.05 * s
    shirt = _jitter(rng, [(0.8, 0.2, 0.2), (0.2, 0.3, 0.8), (0.9, 0.9, 0.2), (0.2, 0.7, 0.3), (0.9, 0.5, 0.1)][rng.integers(5)], 0.15)
    pants = _jitter(rng, (0.15, 0.15, 0.3), 0.3)
    skin = _jitter(rng, [(0.95, 0.8, 0.65), (0.6, 0.4, 0.3), (0.8, 0.6, 0.45)][rng.integers(3)], 0.08)
    prims.append(Primitive(C["person"], C["person"], pants, _rect(x - w / 2, y - h * 0.45, x + w / 2, y)))
    prims.append(Primitive(C["person"], C["person"], shirt, _rect(x - w * 0.6, y - h * 0.8, x + w * 0.6, y - h * 0.42)))
    r = h * 0.1
    prims.append(Primitive(C["person"], C["person"], skin, ("ellipse", (x - r, y - h, x + r, y - h + 2 * r))))


def _signboard(rng, prims, x, y, horizon):
    C = CLASS_INDEX
    s = _depth_scale(y, horizon) * rng.uniform(0.8, 1.2)
    pole_h, bw, bh = 0.2 * s, 0.12 * s, 0.07 * s
    prims.append(Primitive(C["signboard"], C["signboard"], (0.5, 0.5, 0.5),
                           _rect(x - 0.006 * s, y - pole_h, x + 0.006 * s, y)))
    color = _jitter(rng, [(0.1, 0.5, 0.2), (0.1, 0.3, 0.8), (0.95, 0.8, 0.1), (0.9, 0.9, 0.9)][rng.integers(4)], 0.1)
    prims.append(Primitive(C["signboard"], C["signboard"], color,
                           _rect(x - bw / 2, y - pole_h - bh, x + bw / 2, y - pole_h)))


def _fence(rng, prims, y, horizon):
    C = CLASS_INDEX
    s = _depth_scale(y, horizon)
    h = 0.1 * s
    color = _jitter(rng, [(0.85, 0.85, 0.8), (0.55, 0.35, 0.2)][rng.integers(2)], 0.1)
    x0, x1 = rng.uniform(-0.1, 0.4), rng.uniform(0.6, 1.1)
    prims.append(Primitive(C["fence"], C["fence"], color, _rect(x0, y - h * 0.75, x1, y - h * 0.6)))
    prims.append(Primitive(C["fence"], C["fence"], color, _rect(x0, y - h * 0.35, x1, y - h * 0.2)))
    step = max(0.02, 0.06 * s)
    for px in np.arange(x0, x1, step):
        prims.append(Primitive(C["fence"], C["fence"], color, _rect(px, y - h, px + step * 0.35, y)))


# ----------------------------------------------------------------------------- rendering

def render_layout(lay: Layout, resolution: int, rng: np.random.Generator,
                  skip_owners: frozenset[int] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a layout: returns (RGB uint8 HxWx3, labels int64 HxW)."""
    R = resolution
    ids = Image.new("I", (R, R), 0)  # 0 = sky
    draw = ImageDraw.Draw(ids)
    visible = [p for p in lay.primitives if p.owner not in skip_owners]
    for k, p in enumerate(visible, start=1):
        kind, geom = p.shape
        if kind == "poly":
            draw.polygon([(x * R, y * R) for x, y in geom], fill=k)
        else:
            x0, y0, x1, y1 = geom
            draw.ellipse((x0 * R, y0 * R, x1 * R, y1 * R), fill=k)
    id_map = np.asarray(ids, dtype=np.int64)

    cls_lut = np.array([CLASS_INDEX["sky"]] + [p.cls for p in visible], dtype=np.int64)
    labels = cls_lut[id_map]

    # colours: sky gradient, then per-primitive colour with a vertical shade
    yy = (np.arange(R, dtype=np.float64)[:, None] + 0.5) / R * np.ones((1, R))
    t = np.clip(yy / max(lay.horizon, 1e-3), 0, 1)[..., None]
    rgb = (1 - t) * np.asarray(lay.sky_top) + t * np.asarray(lay.sky_bottom)
    for k, p in enumerate(visible, start=1):
        mask = id_map == k
        if not mask.any():
            continue
        rows = np.nonzero(mask.any(axis=1))[0]
        rel = (yy[mask] - rows[0] / R) / max((rows[-1] - rows[0] + 1) / R, 1e-6)
        rgb[mask] = np.asarray(p.color)[None, :] * (1 + p.shade * (0.5 - rel))[:, None]

    # texture by class: it makes segmentation a learning problem without touching labels
    noise = rng.normal(0, 1, (R, R))
    amp = np.array([0.01, 0.04, 0.05, 0.05, 0.09, 0.1, 0.03, 0.03, 0.02, 0.03, 0.04, 0.03])[labels]
    rgb = rgb * (1 + amp[..., None] * noise[..., None])
    b = labels == CLASS_INDEX["building"]
    if b.any():  # brick courses
        rgb[b] *= (1 - 0.06 * ((np.arange(R)[:, None] // max(1, R // 32)) % 2))[..., None].repeat(R, 1)[b]
    img = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    return img, labels


def render_scene(seed: int, index: int, resolution: int = 64, drop: Sequence[str] = (),
                 drop_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of world ``seed``: (RGB uint8 HxWx3, labels int64 HxW)."""
    skip = frozenset(_class_ids(drop)) if drop and _drops(seed, index, drop_fraction) else frozenset()
    lay = layout_scene(np.random.default_rng([seed, index, 0]))
    return render_layout(lay, resolution, np.random.default_rng([seed, index, 1]), skip)


def _drops(seed: int, index: int, fraction: float) -> bool:
    # a stream of its own, so whether an image drops does not change its layout
    return bool(np.random.default_rng([seed, index, 2]).random() < fraction)


def _class_ids(names: Sequence[str]) -> list[int]:
    unknown = [n for n in names if n not in CLASS_INDEX]
    if unknown:
        raise ValueError(f"unknown scene classes {unknown}; classes are {list(CLASS_NAMES)}")
    if "sky" in names:
        raise ValueError("'sky' is the background every other class is drawn over; it cannot be dropped")
    return [CLASS_INDEX[n] for n in names]


def to_tensor_image(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ScenesDataset(Dataset):
    """``length`` scenes of world ``seed``; item = (image 3xHxW in [-1, 1], labels HxW int64)."""

    class_names = CLASS_NAMES
    num_classes = NUM_CLASSES

    def __init__(self, length: int = 10000, resolution: int = 64, seed: int = 0, drop: Sequence[str] = (),
                 drop_fraction: float = 1.0, offset: int = 0):
        if length <= 0:
            raise ValueError("ScenesDataset needs length > 0")
        if not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
        _class_ids(drop)
        self.length, self.resolution, self.seed = int(length), int(resolution), int(seed)
        self.drop, self.drop_fraction, self.offset = tuple(drop), float(drop_fraction), int(offset)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        img, labels = render_scene(self.seed, self.offset + i, self.resolution, self.drop, self.drop_fraction)
        return to_tensor_image(img), torch.from_numpy(labels)


def colorize_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Label map (HxW) -> RGB uint8 picture using :data:`LABEL_COLORS`."""
    labels = labels.cpu().numpy() if torch.is_tensor(labels) else labels
    return LABEL_COLORS[np.asarray(labels) % len(LABEL_COLORS)]


def export_image_folder(dataset: ScenesDataset, path: str | Path, with_labels: bool = True) -> Path:
    """Write ``images/NNNNNN.png`` (and ``labels/NNNNNN.png``, class index as the grey value)."""
    from seeing.progress import progress

    root = Path(path)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if with_labels:
        (root / "labels").mkdir(parents=True, exist_ok=True)
    with progress(len(dataset), f"exporting scenes to {root}") as bar:
        for i in range(len(dataset)):
            img, labels = render_scene(dataset.seed, dataset.offset + i, dataset.resolution, dataset.drop,
                                       dataset.drop_fraction)
            Image.fromarray(img).save(root / "images" / f"{i:06d}.png")
            if with_labels:
                Image.fromarray(labels.astype(np.uint8), mode="L").save(root / "labels" / f"{i:06d}.png")
            bar.update()
    return root
