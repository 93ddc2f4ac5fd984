"""NVlabs network pickles are read as data: allow-listed globals, inert persistent records, no code run."""
from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from seeing.gans.nvlabs_pickle import (PersistentRecord, looks_like_nvlabs_pickle, read_nvlabs_pickle,
                                       read_snapshot_generator)

NATIVE = Path(__file__).parent / "fixtures" / "stylegan_native"


@pytest.mark.parametrize("name", ["sg2ada_uncond_64.pkl", "sg3_t_64.pkl"])
def test_snapshots_read_as_records_without_importing_their_code(name):
    path = NATIVE / name
    assert looks_like_nvlabs_pickle(path)
    snapshot = read_nvlabs_pickle(path)
    assert set(snapshot) == {"G", "D", "G_ema", "augment_pipe", "training_set_kwargs"}
    generator = read_snapshot_generator(path)
    assert isinstance(generator, PersistentRecord) and generator.class_name == "Generator"
    assert generator.init_kwargs["z_dim"] == 64 and generator.init_kwargs["img_resolution"] == 64
    tensors = generator.state_dict()
    assert "mapping.w_avg" in tensors and all(isinstance(t, torch.Tensor) for t in tensors.values())
    # the EMA generator's values, not the raw G's
    raw = snapshot["G"].state_dict()
    assert not torch.equal(tensors["mapping.w_avg"], raw["mapping.w_avg"])
    assert not any(m == "torch_utils" or m.startswith(("torch_utils.", "dnnlib")) for m in sys.modules)


def test_a_stylegan3_layer_keeps_its_numpy_constants():
    synthesis = read_snapshot_generator(NATIVE / "sg3_t_64.pkl").child("synthesis")
    size = synthesis.child("input").attribute("size")
    assert isinstance(size, np.ndarray) and size.shape == (2,)
    assert "synthesis.input.freqs" in read_snapshot_generator(NATIVE / "sg3_t_64.pkl").state_dict()


def _pickle_with_fake_persistence(tmp_path: Path, module_src: str) -> Path:
    """A pickle laid out as NVlabs writes it, made with a stand-in persistence module that is
    removed again before the file is read (as on a user's machine, which has no torch_utils)."""
    fake = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called by the reader
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Net:
        def __reduce__(self):
            meta = {"type": "class", "version": 6, "module_src": module_src, "class_name": "Generator",
                    "state": {"_parameters": {"w": torch.ones(2)}, "_buffers": {}, "_modules": {}}}
            return _reconstruct_persistent_obj, (meta,)

    package = types.ModuleType("torch_utils")
    package.persistence = fake
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": fake})
    try:
        blob = pickle.dumps({"G_ema": Net()}, protocol=4)
    finally:
        del sys.modules["torch_utils.persistence"], sys.modules["torch_utils"]
    path = tmp_path / "network.pkl"
    path.write_bytes(blob)
    return path


def test_the_embedded_source_is_never_executed(tmp_path):
    marker = tmp_path / "ran.txt"
    path = _pickle_with_fake_persistence(tmp_path, f"open({str(marker)!r}, 'w').write('ran')\n")
    generator = read_snapshot_generator(path)
    assert not marker.exists()
    assert torch.equal(generator.state_dict()["w"], torch.ones(2)) and len(generator.source_sha256) == 64


def test_any_other_global_is_refused_naming_file_and_global(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return os.system, ("echo pwned",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Evil()}, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pkl.*global (posix|os)\.system"):
        read_nvlabs_pickle(path)


def test_numpy_arrays_load_under_the_old_and_new_module_names(tmp_path):
    blob = pickle.dumps(np.arange(3.0), protocol=3)  # protocol 3 names globals as plain text lines
    assert b"numpy._core.multiarray\n" in blob
    for module in (b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"):
        path = tmp_path / "array.pkl"
        path.write_bytes(blob.replace(b"numpy._core.multiarray\n", module))
        np.testing.assert_array_equal(read_nvlabs_pickle(path), np.arange(3.0))


def test_a_pickle_that_is_not_a_snapshot_says_what_it_holds(tmp_path):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    with pytest.raises(ValueError, match=r"other\.pkl is not an NVlabs snapshot with a G_ema network: it holds "
                                         r"\['weights'\]"):
        read_snapshot_generator(path)
    truncated = tmp_path / "cut.pkl"
    truncated.write_bytes((NATIVE / "sg3_t_64.pkl").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.pkl \(5000 bytes\) is not a readable NVlabs pickle"):
        read_nvlabs_pickle(truncated)
