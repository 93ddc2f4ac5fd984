"""Label spaces: ADE20K-150, UPP-336, the shipped mapping between them and the shared-class projection."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import FIXTURES
from seeing.segmenters.label_spaces import (
    ADE_FILE, ClassSelection, ade20k_150, ade20k_150_names, class_list_sha256, class_selection, label_space,
    shared_classes, to_shared, upp_336)

UPP_OBJECTS = [row["name"] for row in csv.DictReader(open(FIXTURES / "segmenters" / "upp_object_labels.csv"))]


def test_shipped_lists_are_the_published_ones():
    assert [c.name for c in upp_336()] == UPP_OBJECTS  # the UPP release's labels.json object list
    names = ade20k_150_names()
    assert len(names) == 150 == len(set(names))
    assert names[:5] == ["wall", "building", "sky", "floor", "tree"] and names[-1] == "flag"
    assert ade20k_150()[8] == ("windowpane", "window") and ade20k_150()[13] == ("earth", "ground")
    assert json.loads(ADE_FILE.read_text())["classes"][96][0] == "escalator"


def test_mapping_counts_and_rules():
    mapped = [c for c in upp_336() if c.ade]
    by_name = [c for c in mapped if c.basis == "name"]
    by_synonym = [c for c in mapped if c.basis == "synonym"]
    assert (len(mapped), len(by_name), len(by_synonym)) == (155, 142, 13)
    assert all(c.name == c.ade for c in by_name)
    assert all(c.note for c in by_synonym)  # every synonym says why
    assert {c.name: c.ade for c in by_synonym}["window"] == "windowpane"
    assert {c.name: c.ade for c in by_synonym}["ground"] == "earth"
    ade = set(ade20k_150_names())
    assert all(c.ade in ade for c in mapped)
    assert set(ade) - {c.ade for c in mapped} == {"escalator"}
    assert len(shared_classes()) == 149 and "escalator" not in shared_classes()
    # a synonym in another sense is left out, with the reason
    rejected = {c.name: c.note for c in upp_336() if c.name in ("can", "machine", "wheel", "coach", "chest")}
    assert all(note.startswith("not mapped:") for note in rejected.values()) and len(rejected) == 5


def test_label_space_is_recognised_from_the_class_list():
    assert label_space(UPP_OBJECTS).id == "upp-336"
    full_names = [", ".join(names) for names in ade20k_150()]  # some checkpoints write "windowpane, window"
    assert label_space(full_names).id == "ade20k-150"
    assert label_space(["sky", "road"]).id == "custom"
    space = label_space(UPP_OBJECTS)
    assert space.num_classes == 336 and space.class_list_sha256 == class_list_sha256(UPP_OBJECTS)
    assert class_list_sha256(UPP_OBJECTS) != class_list_sha256(UPP_OBJECTS[::-1])


def test_upp_and_ade_tallies_project_onto_the_same_shared_classes():
    rng = np.random.default_rng(0)
    upp = rng.dirichlet(np.ones(336), size=5)
    shared_upp, names = to_shared(upp, UPP_OBJECTS)
    ade = rng.dirichlet(np.ones(150), size=5)
    shared_ade, names_ade = to_shared(ade, ade20k_150_names())
    assert names == names_ade == list(shared_classes()) and shared_upp.shape == shared_ade.shape == (5, 149)
    col = names.index
    # many-to-one summed: UPP pot + flowerpot -> ADE pot; step stays step, stair -> stairs
    assert shared_upp[:, col("pot")] == pytest.approx(upp[:, UPP_OBJECTS.index("pot")] + upp[:, UPP_OBJECTS.index("flowerpot")])
    assert shared_upp[:, col("windowpane")] == pytest.approx(upp[:, UPP_OBJECTS.index("window")])
    assert shared_upp[:, col("stairs")] == pytest.approx(upp[:, UPP_OBJECTS.index("stair")])
    # unmapped UPP classes ("-", dog, ...) are dropped: the shares stay fractions of all pixels
    unmapped = [i for i, c in enumerate(upp_336()) if not c.ade]
    assert shared_upp.sum(1) == pytest.approx(1 - upp[:, unmapped].sum(1))
    # ADE: a column selection, escalator's column dropped
    assert shared_ade[:, col("wall")] == pytest.approx(ade[:, 0])
    assert shared_ade.sum(1) == pytest.approx(1 - ade[:, ade20k_150_names().index("escalator")])


def test_class_selection_setting_and_errors():
    assert class_selection("all", ["a", "b"]).names == ["a", "b"]
    rows = np.array([[0.25, 0.75]])
    assert class_selection("all", ["a", "b"])(rows) is rows
    selection = class_selection("shared", UPP_OBJECTS)
    assert isinstance(selection, ClassSelection) and len(selection.names) == 149
    seen = []
    selection.feeding(seen.append)(np.eye(336)[:2])
    assert seen[0].shape == (2, 149)
    with pytest.raises(ValueError, match="metric.classes=shared compares the UPP .* and ADE20K-150 .*metric.classes=all"):
        class_selection("shared", ["sky", "road", "person"])
    with pytest.raises(ValueError, match=r"metric.classes='most': choose one of \['all', 'shared'\]"):
        class_selection("most", UPP_OBJECTS)
    with pytest.raises(ValueError, match="do not belong to a label space of 336"):
        to_shared(np.zeros((2, 150)), UPP_OBJECTS)
