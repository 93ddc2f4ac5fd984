"""Label spaces: which classes a segmenter's output indices name, and the classes two label spaces share.

A label space is identified by its class list: its sha256 and count go into every FSD report and
tally cache key, so tallies of different label spaces are never mixed. Two label spaces are known
by name, from data files shipped next to this module:

- ``ade20k-150``: the 150 classes of ADE20K SceneParsing (``ade20k_150.json``), what ADE
  checkpoints of SegFormer and Mask2Former predict;
- ``upp-336``: the 336 object classes of the paper's unified perceptual parsing segmenter
  (``upp_to_ade20k_150.csv``, whose rows also map each UPP class to its ADE-150 class, if any).

The mapping was built from the names alone: a UPP class maps to the ADE class of the same name
(142 classes), or to the ADE class one of whose listed names (ADE's WordNet synonyms) or obvious
spellings it is (13 more: window -> windowpane, ground -> earth, ...); where UPP already has the ADE
class under its own name and the synonym is another sense (can, machine, wheel, coach, chest) it
is left unmapped, with the reason in the file. Several UPP classes may map to one ADE class
(pot and flowerpot -> pot): their pixel shares are summed. 149 of the 150 ADE classes have a UPP
counterpart; escalator has none.

:func:`to_shared` turns N x C tallies of either label space into N x 149 tallies over those shared
classes, named and ordered as in ADE-150, so FSD and its per-class table from UPP and from an ADE
model can be read side by side (``metric.classes=shared``). The shares stay fractions of all
pixels: pixels of unmapped classes are dropped, not spread over the others.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ADE_FILE = HERE / "ade20k_150.json"
UPP_FILE = HERE / "upp_to_ade20k_150.csv"
ADE20K_150, UPP_336, CUSTOM = "ade20k-150", "upp-336", "custom"
CLASS_SETTINGS = ("all", "shared")


def class_list_sha256(names: Sequence[str]) -> str:
    """sha256 of the class list (names in output order, as JSON)."""
    return hashlib.sha256(json.dumps([str(n) for n in names]).encode()).hexdigest()


def class_key(name: str) -> str:
    """A class name as the label-space lists spell it: the first of comma-separated names, trimmed,
    lower case (checkpoints write "bed " or "windowpane, window" for ADE classes)."""
    return str(name).split(",")[0].strip().lower()


@lru_cache(maxsize=1)
def ade20k_150() -> tuple[tuple[str, ...], ...]:
    """The ADE-150 classes in output order, each as (name, other names...)."""
    return tuple(tuple(names) for names in json.loads(ADE_FILE.read_text())["classes"])


def ade20k_150_names() -> list[str]:
    return [names[0] for names in ade20k_150()]


@dataclass(frozen=True)
class UppClass:
    name: str
    ade: str | None  # the ADE-150 class it maps to, None when it has none
    basis: str  # "name", "synonym" or "" (unmapped)
    note: str


@lru_cache(maxsize=1)
def upp_336() -> tuple[UppClass, ...]:
    """The UPP object classes in output order with their ADE-150 class."""
    with UPP_FILE.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if [int(r["upp_id"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{UPP_FILE}: upp_id must run 0..n-1")
    return tuple(UppClass(r["upp_name"], r["ade_name"] or None, r["basis"], r["note"]) for r in rows)


@dataclass(frozen=True)
class LabelSpace:
    id: str  # "ade20k-150", "upp-336" or "custom"
    num_classes: int
    class_list_sha256: str

    def as_dict(self) -> dict[str, object]:
        return {"label_space": self.id, "num_classes": self.num_classes, "class_list_sha256": self.class_list_sha256}


def label_space(class_names: Sequence[str]) -> LabelSpace:
    """The label space a class list is: a known one when its names, in order, are that space's."""
    keys = [class_key(n) for n in class_names]
    known = {ADE20K_150: ade20k_150_names(), UPP_336: [c.name for c in upp_336()]}
    space = next((sid for sid, names in known.items() if keys == names), CUSTOM)
    return LabelSpace(space, len(class_names), class_list_sha256(list(class_names)))


@lru_cache(maxsize=1)
def shared_classes() -> tuple[str, ...]:
    """The ADE-150 classes UPP also has (149), in ADE order."""
    mapped = {c.ade for c in upp_336() if c.ade}
    return tuple(n for n in ade20k_150_names() if n in mapped)


def shared_projection(class_names: Sequence[str]) -> np.ndarray:
    """The C x S 0/1 matrix that sums the columns of a tally over ``class_names`` (UPP-336 or ADE-150)
    into the S shared classes; an error for any other label space."""
    space = label_space(class_names)
    shared = {name: j for j, name in enumerate(shared_classes())}
    matrix = np.zeros((len(class_names), len(shared)))
    if space.id == ADE20K_150:
        for i, name in enumerate(ade20k_150_names()):
            if name in shared:
                matrix[i, shared[name]] = 1.0
    elif space.id == UPP_336:
        for i, c in enumerate(upp_336()):
            if c.ade:
                matrix[i, shared[c.ade]] = 1.0
    else:
        raise ValueError(f"metric.classes=shared compares the UPP (336 classes) and ADE20K-150 label spaces; this "
                         f"segmenter's {len(class_names)} classes ({', '.join(map(str, class_names[:5]))}, ...) are "
                         f"neither: use metric.classes=all")
    return matrix


def to_shared(tallies: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """N x C tallies over ``class_names`` -> (N x S tallies over the shared classes, their names)."""
    tallies = np.asarray(tallies)
    if tallies.ndim != 2 or tallies.shape[1] != len(class_names):
        raise ValueError(f"tallies of shape {tallies.shape} do not belong to a label space of {len(class_names)} classes")
    return tallies @ shared_projection(class_names), list(shared_classes())


@dataclass
class ClassSelection:
    """The classes FSD is computed over (``metric.classes``) and how a tally over the segmenter's
    classes becomes one over them."""

    setting: str
    names: list[str]
    matrix: np.ndarray | None  # None: the segmenter's own classes, unchanged

    def __call__(self, tallies: np.ndarray) -> np.ndarray:
        return tallies if self.matrix is None else np.asarray(tallies) @ self.matrix

    def feeding(self, on_rows: Callable[[np.ndarray], None]) -> Callable[[np.ndarray], None]:
        """``on_rows`` receiving each batch of tallies over the selected classes."""
        return on_rows if self.matrix is None else (lambda rows: on_rows(self(rows)))


def class_selection(setting: str, class_names: Sequence[str]) -> ClassSelection:
    """``metric.classes``: ``all`` (the segmenter's classes) or ``shared`` (UPP and ADE-150's common classes)."""
    if setting == "all":
        return ClassSelection("all", list(class_names), None)
    if setting == "shared":
        return ClassSelection("shared", list(shared_classes()), shared_projection(class_names))
    raise ValueError(f"metric.classes={setting!r}: choose one of {list(CLASS_SETTINGS)}")
