"""StyleGAN2 in its native formats: NVlabs stylegan2-ada-pytorch snapshot pickles and
rosinality/stylegan2-pytorch checkpoints, against goldens computed by each upstream's own code
(tests/fixtures/stylegan_native/README.md), through load_generator and model=stylegan2."""
from __future__ import annotations

import collections
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from seeing.gans import LayeredGenerator, load_generator
from seeing.gans.loading import inversion_preset, read_checkpoint
from seeing.gans.nvlabs_pickle import EasyDict, PersistentRecord, read_nvlabs_pickle
from seeing.gans.rosinality import LATENT_AVG_SAMPLES, LATENT_AVG_SEED
from seeing.gans.stylegan_common import StyledState

NATIVE = Path(__file__).resolve().parent / "fixtures" / "stylegan_native"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TOL = 1e-4
# NVlabs snapshots: file stem -> load_generator options
NVLABS = {"sg2ada_uncond_64": {}, "sg2ada_cond_16": {"class_index": 3}, "sg2ada_orig_fp16_16": {},
          "sg2ada_resnet_16": {}}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def golden(stem: str) -> dict:
    return torch.load(NATIVE / f"{stem}_golden.pt", weights_only=True)


# ------------------------------------------------------------------ NVlabs goldens
@pytest.mark.parametrize("stem", sorted(NVLABS))
@torch.no_grad()
def test_nvlabs_snapshot_reproduces_every_golden_tensor(stem):
    ref, options = golden(stem), NVLABS[stem]
    path = NATIVE / f"{stem}.pkl"
    g = load_generator(path, clamp_output=False, **options)
    blocks = [int(k.split(".")[1][1:]) for k in ref["intermediates_psi1"] if k.endswith(".x")]
    expected_names = ["mapping", "b4.conv1"] + [f"b{r}.conv{i}" for r in blocks[1:] for i in (0, 1)] + ["output"]
    assert g.layer_names == expected_names
    assert g.num_ws == ref["meta"]["num_ws"] and g.checkpoint_meta["format"] == "nvlabs"
    assert max_diff(g.mapping.w_avg, ref["w_avg"]) == 0  # the stored w_avg, not an estimate

    # w+ exactly as upstream's ws, and G(z) = G.synthesis(ws, noise_mode='const')
    ws = g.run(ref["z"], stop="mapping")
    assert isinstance(ws, StyledState) and max_diff(ws.ws, ref["ws_psi1"]) < TOL
    assert max_diff(g(ref["z"]), ref["img_psi1"]) < TOL
    assert max_diff(g.render_latent(ref["ws_psi1"]), ref["img_psi1"]) < TOL
    # a different w per row: catches a wrong row-to-layer assignment
    assert max_diff(g.render_latent(ref["ws_mixed"]), ref["img_mixed"]) < TOL
    assert max_diff(ref["img_mixed"], ref["img_psi1"]) > 100 * TOL

    # truncation: upstream's truncation_psi with truncation_cutoff=None (every row), and a cutoff
    truncated = load_generator(path, clamp_output=False, truncation_psi=0.7, **options)
    assert max_diff(truncated.run(ref["z"], stop="mapping").ws, ref["ws_psi0p7"]) < TOL
    assert max_diff(truncated(ref["z"]), ref["img_psi0p7"]) < TOL
    assert max_diff(ref["img_psi0p7"], ref["img_psi1"]) > 100 * TOL
    if "ws_psi0p7_cutoff3" in ref:
        cut = load_generator(path, clamp_output=False, truncation_psi=0.7, truncation_layers=3, **options)
        assert max_diff(cut.run(ref["z"], stop="mapping").ws, ref["ws_psi0p7_cutoff3"]) < TOL
        assert max_diff(cut(ref["z"]), ref["img_psi0p7_cutoff3"]) < TOL

    # every block's x and img (the state after its conv1 layer), every conv and torgb output
    # (upstream's SynthesisLayer and ToRGBLayer: the modules under the chain's layers)
    outputs, hooks = {}, []
    for r in blocks:
        for part, module in [("conv0", getattr(g.layer(f"b{r}.conv0"), "conv", None) if r > 4 else None),
                             ("conv1", g.layer(f"b{r}.conv1").conv), ("torgb", g.layer(f"b{r}.conv1").torgb)]:
            if module is not None:
                hooks.append(module.register_forward_hook(
                    lambda m, i, o, key=f"synthesis.b{r}.{part}": outputs.__setitem__(key, o)))
    feats = g.features(ref["z"][:1], g.layer_names[1:-1])
    for h in hooks:
        h.remove()
    for key, expected in ref["intermediates_psi1"].items():
        _, block, part = key.split(".")
        got = {"x": lambda: feats[f"{block}.conv1"].x, "img": lambda: feats[f"{block}.conv1"].image}.get(
            part, lambda: outputs[key])()
        assert max_diff(got, expected) < TOL, key
    assert set(outputs) <= set(ref["intermediates_psi1"])  # no module upstream lacks
    # the default generator clamps to [-1, 1]; these untrained nets go far outside it
    assert float(ref["img_psi1"].abs().max()) > 2
    assert max_diff(load_generator(path, **options)(ref["z"]), ref["img_psi1"].clamp(-1, 1)) < TOL


def test_nvlabs_snapshot_reads_as_a_state_dict_with_its_layout():
    from seeing.provenance import inputs, reset_inputs

    reset_inputs()
    state_dict, layout, meta = read_checkpoint(NATIVE / "sg2ada_uncond_64.pkl")
    (read,) = inputs()  # the run's provenance lists the file
    assert read["path"] == str((NATIVE / "sg2ada_uncond_64.pkl").resolve()) and len(read["sha256"]) == 64
    assert layout == "nvlabs_stylegan2" and meta["class_name"] == "Generator"
    assert meta["init_kwargs"]["synthesis_kwargs"]["conv_clamp"] == 256
    assert "synthesis.b64.torgb.weight" in state_dict and "mapping.w_avg" in state_dict


def test_conditional_snapshot_needs_a_class_and_an_unconditional_one_refuses_it():
    with pytest.raises(ValueError, match=r"sg2ada_cond_16\.pkl.*conditional with 5 classes.*class_index=0\.\.4"):
        load_generator(NATIVE / "sg2ada_cond_16.pkl")
    with pytest.raises(ValueError, match="has 5 classes"):
        load_generator(NATIVE / "sg2ada_cond_16.pkl", class_index=5)
    with pytest.raises(ValueError, match="unconditional"):
        load_generator(NATIVE / "sg2ada_uncond_64.pkl", class_index=0)
    with torch.no_grad():  # the class changes the image
        z = torch.randn(2, 16)
        a = load_generator(NATIVE / "sg2ada_cond_16.pkl", class_index=0)(z)
        b = load_generator(NATIVE / "sg2ada_cond_16.pkl", class_index=3)(z)
    assert max_diff(a, b) > 1e-3


# ------------------------------------------------------------------ rosinality goldens
@torch.no_grad()
def test_rosinality_checkpoint_reproduces_every_golden_tensor():
    ref = golden("rosinality_64")
    path = NATIVE / "rosinality_64.pt"
    g = load_generator(path, clamp_output=False)
    assert g.layer_names == ["mapping", "conv1"] + [f"convs.{j}" for j in range(8)] + ["output"]
    assert g.num_ws == ref["meta"]["n_latent"] and not g.latent_avg_estimated
    assert max_diff(g.mapping.w_avg, ref["latent_avg"]) == 0  # the checkpoint's latent_avg
    # channel counts come from the tensors (the fixture's table is upstream's divided by 16)
    assert g.layer("convs.7").conv.weight.shape[1:3] == (32, 32)

    ws = g.run(ref["z"], stop="mapping").ws
    assert max_diff(ws[:, 0], ref["w_psi1"]) < TOL and max_diff(ws, ref["ws_psi1"]) < TOL
    assert max_diff(g(ref["z"]), ref["img_psi1"]) < TOL
    assert max_diff(g.render_latent(ref["ws_psi1"]), ref["img_from_w_psi1"]) < TOL
    assert max_diff(g.render_latent(ref["ws_mixed"]), ref["img_mixed"]) < TOL
    truncated = load_generator(path, clamp_output=False, truncation_psi=0.7)
    assert max_diff(truncated.run(ref["z"], stop="mapping").ws, ref["ws_psi0p7"]) < TOL
    assert max_diff(truncated(ref["z"]), ref["img_psi0p7"]) < TOL
    assert max_diff(g.render_latent(ref["ws_psi0p7"]), ref["img_from_w_psi0p7"]) < TOL

    feats = g.features(ref["z"][:1], g.layer_names[1:-1])
    for key, expected in ref["intermediates_psi1"].items():
        if key.startswith("to_rgb"):  # upstream's to-RGB outputs are the running skip image
            owner = "conv1" if key == "to_rgb1" else f"convs.{2 * int(key.split('.')[1]) + 1}"
            got = feats[owner].image
        else:
            got = feats[key].x
        assert max_diff(got, expected) < TOL, key


@torch.no_grad()
def test_rosinality_without_latent_avg_uses_the_documented_seeded_estimate(tmp_path):
    ck = torch.load(NATIVE / "rosinality_64.pt", weights_only=False)  # (the test's own fixture)
    del ck["latent_avg"]
    path = tmp_path / "no_latent_avg.pt"
    torch.save({"g_ema": ck["g_ema"]}, path)
    g = load_generator(path)
    assert g.latent_avg_estimated
    z = g.sample_z(LATENT_AVG_SAMPLES, seed=LATENT_AVG_SEED)
    assert max_diff(g.mapping.w_avg, g.mapping.map_z(z).mean(0)) < 1e-5
    # an estimate of what upstream's mean_latent(4096) estimates
    stored = golden("rosinality_64")["latent_avg"]
    assert float((g.mapping.w_avg - stored).norm() / stored.norm()) < 0.05


class Payload:
    """Stands for anything a checkpoint could ask to construct."""


def test_rosinality_checkpoints_are_read_weights_only(tmp_path):
    ck = torch.load(NATIVE / "rosinality_64.pt", weights_only=False)
    path = tmp_path / "with_code.pt"
    torch.save({"g_ema": ck["g_ema"], "args": ck["args"], "hook": Payload()}, path)
    with pytest.raises(ValueError, match=r"with_code\.pt asks for the Python global test_stylegan2_native\.Payload"):
        load_generator(path)
    torch.save({"g_ema": ck["g_ema"], "args": ck["args"]}, path)  # argparse.Namespace alone is data
    assert load_generator(path).layer_names[1] == "conv1"


# ------------------------------------------------------------------ model=stylegan2
def _compose_model(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import seeing.config  # noqa: F401 - the resolvers

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=None, overrides=["+model=stylegan2", *overrides])


@pytest.mark.parametrize("file, extra, preset", [
    ("sg2ada_uncond_64.pkl", [], ["b4.conv1", "b8.conv0", "b8.conv1"]),
    ("sg2ada_cond_16.pkl", ["model.class_index=3"], ["b4.conv1", "b8.conv0", "b8.conv1"]),
    ("rosinality_64.pt", [], ["conv1", "convs.0", "convs.1"]),
])
@torch.no_grad()
def test_model_config_recognises_the_format_and_picks_its_inversion_preset(file, extra, preset):
    from hydra.utils import instantiate

    path = NATIVE / file
    cfg = _compose_model([f"model.checkpoint={path}", "model.truncation_psi=0.7", *extra])
    g = instantiate(cfg.model.generator)
    assert isinstance(g, LayeredGenerator)
    ref = golden(path.stem)
    assert max_diff(g(ref["z"]), ref["img_psi0p7"].clamp(-1, 1)) < TOL
    layers = list(cfg.model.inversion_layers)
    assert layers == preset
    start = g.layer_names.index(layers[0])
    assert g.layer_names[start - 1] == "mapping" and g.layer_names[start:start + len(layers)] == layers


def test_inversion_preset_of_a_missing_file_is_the_models_first():
    assert inversion_preset("/nowhere/x.pkl", "stylegan2") == ["layer0", "layer1", "layer2"]


def test_model_config_class_index_reaches_only_formats_that_take_it():
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = _compose_model([f"model.checkpoint={NATIVE / 'rosinality_64.pt'}", "model.class_index=2"])
    with pytest.raises(InstantiationException, match="rosinality_stylegan2 takes no option.*class_index"):
        instantiate(cfg.model.generator)


# ------------------------------------------------------------------ files that are not snapshots
def _write_nvlabs_pickle(obj, path: Path, monkeypatch) -> None:
    """Pickle ``obj`` (records as read by the project's reader) in NVlabs' persistence format."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: pickling only looks it up
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)

    class Persistent:
        def __init__(self, record: PersistentRecord):
            self.record = record

        def __reduce__(self):
            meta = {"type": "class", "version": 6, "module_src": "", "class_name": self.record.class_name,
                    "state": plain(self.record.state)}
            return _reconstruct_persistent_obj, (meta,)

    def plain(value):
        if isinstance(value, PersistentRecord):
            return Persistent(value)
        if isinstance(value, EasyDict):
            value = dict(value)
        if isinstance(value, dict):
            return type(value)((k, plain(v)) for k, v in value.items())
        return value

    with open(path, "wb") as f:
        pickle.dump(plain(obj), f)


def test_a_fork_with_unknown_tensors_is_refused_naming_them(tmp_path, monkeypatch):
    snapshot = read_nvlabs_pickle(NATIVE / "sg2ada_uncond_64.pkl")
    snapshot["G_ema"].child("synthesis.b8").state["_buffers"]["style_gate"] = torch.zeros(3)
    path = tmp_path / "fork.pkl"
    _write_nvlabs_pickle(snapshot, path, monkeypatch)
    with pytest.raises(ValueError, match=r"fork\.pkl.*unexpected keys: synthesis\.b8\.style_gate"):
        load_generator(path)


def test_an_nvlabs_pickle_of_an_unknown_architecture_says_what_it_holds(tmp_path, monkeypatch):
    snapshot = read_nvlabs_pickle(NATIVE / "sg2ada_uncond_64.pkl")
    blocks = snapshot["G_ema"].child("synthesis").state["_modules"]
    blocks["head"] = blocks.pop("b4")  # no synthesis.b4.const: a fork's renamed first block
    path = tmp_path / "other.pkl"
    _write_nvlabs_pickle(snapshot, path, monkeypatch)
    with pytest.raises(ValueError, match=r"other\.pkl: its G_ema is a Generator of no known NVlabs "
                                         r"architecture.*synthesis\.b4\.const"):
        load_generator(path)
    _write_nvlabs_pickle({"D": snapshot["D"]}, path, monkeypatch)
    with pytest.raises(ValueError, match=r"not an NVlabs snapshot with a G_ema network: it holds \['D'\]"):
        load_generator(path)


def test_a_pickle_that_is_not_a_snapshot_names_what_it_asks_for(tmp_path):
    path = tmp_path / "other.pkl"
    with open(path, "wb") as f:
        pickle.dump({"counts": collections.Counter("abc")}, f)
    with pytest.raises(ValueError, match=r"other\.pkl is a Python pickle that is neither.*collections\.Counter"):
        load_generator(path)


# ------------------------------------------------------------------ the stages on each format
@pytest.fixture(scope="module")
def scenes_segmenter_and_photos(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from seeing.data.scenes import CLASS_NAMES
    from seeing.segmenters.scenes import SceneSegmenterNet, make_weights_file

    root = tmp_path_factory.mktemp("native_stages")
    torch.manual_seed(0)
    torch.save(make_weights_file(SceneSegmenterNet(len(CLASS_NAMES), (4, 8)), CLASS_NAMES), root / "segmenter.pt")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    return root / "segmenter.pt", root / "photos"


@pytest.mark.parametrize("file", ["sg2ada_uncond_64.pkl", "rosinality_64.pt"])
def test_reconstruction_ablation_and_fsd_run_on_each_format(compose, tmp_path, scenes_segmenter_and_photos, file):
    import csv
    import json

    from conftest import QUICK_TRAIN

    from seeing.models.hybrid import new_hybrid_encoder
    from seeing.pipeline import evaluate, train
    from seeing.reporting import torch_save_atomic
    from seeing.stages.reconstruct import load_result

    segmenter, photos = scenes_segmenter_and_photos
    path = NATIVE / file
    model = ["model=stylegan2", f"model.checkpoint={path}"]
    layers = list(compose("train", [*model, "stage=layer1"]).model.inversion_layers)
    hybrid = torch_save_atomic(new_hybrid_encoder(load_generator(path), layers).to_file_dict(), tmp_path / "hybrid.pt")
    recon = ["stage=reconstruct", "stage.steps=2", "stage.targets.count=2", "stage.batch_size=2",
             "stage.targets.kind=generated", "stage.loss.perceptual=none", f"stage.hybrid_file={hybrid}", *QUICK_TRAIN]
    results = {}
    for v in "df":
        cfg = compose("train", [*model, *recon, f"variant={v}"])
        train(cfg)
        results[v] = load_result(Path(cfg.output_dir) / "reconstruction.pt")
    # f corrects the outputs of every inversion layer but the last, named as upstream names them
    assert results["f"]["positions"] == layers[:-1]
    assert torch.isfinite(results["f"]["loss_curves"]).all()
    assert results["f"]["init_latents"].shape[1:] == (10, 64)  # w+: num_ws x w_dim
    assert not torch.equal(results["f"]["final"], results["f"]["initial"])

    rows = evaluate(compose("evaluate", ["metric=ablation", f"segmenter.path={segmenter}", *model]))
    assert {r["variant"] for r in rows} == {"d", "f"}
    (table,) = list((tmp_path / "runs" / "eval" / "ablation").rglob("ablation.csv"))
    with open(table) as f:
        header = next(csv.reader(f))
    assert {f"corr_{name}" for name in layers} <= set(header)

    cfg = compose("evaluate", ["metric=fsd", "real=folder", f"real.path={photos}", "fake=generator", *model,
                               f"segmenter.path={segmenter}", "metric.n=4", "metric.batch_size=2",
                               "metric.progress=false", "device=cpu"])
    evaluate(cfg)
    report = json.loads((Path(cfg.output_dir) / "fsd.json").read_text())
    assert report["n"] == 4 and report["fsd"] >= 0


def test_inversion_layers_that_are_not_layers_of_the_file_stop_the_stage(compose):
    from hydra.utils import instantiate

    cfg = compose("train", ["model=stylegan2", f"model.checkpoint={NATIVE / 'sg2ada_uncond_64.pkl'}",
                            "stage=layer1", "model.inversion_layers=[layer0,layer1,layer2]"])
    with pytest.raises(Exception, match=r"unknown layer 'layer0'; layers are \[.*'b4\.conv1', 'b8\.conv0'"):
        instantiate(cfg.stage)
