"""Exported engines (siimcovid.bundle.engines): `export formats=onnx,openvino` writes every fold of every member as ONNX
and OpenVINO IR, listed in the manifest; `predict backend=` runs them. The gates against PyTorch fp32 on the same
inputs: network outputs within 1e-4 (fp32 engines) or 1e-2 (OpenVINO bf16), the tiny bundle's detector boxes matched at
IoU >= 0.95 and its test score within 0.002 (fp32) or 0.01 (bf16); torch stays byte for byte the run's own. And the
engine files are as hostile as any: checksummed, all folds or none, no external data, no custom operators."""

# ruff: noqa: F811  (bundle, runs, yolo_checkpoint: fixtures of test_bundle.py, imported, then test arguments)
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_bundle import export, runs, yolo_checkpoint  # noqa: F401  (fixtures)
from test_bundle_safety import relist
from test_precision import BOX, matched

from siimcovid.bundle import MANIFEST, engines, open_bundle
from siimcovid.cli import call
from siimcovid.utils import SiimError

pytestmark = pytest.mark.skipif(not (engines.available("onnx") and engines.available("openvino")),
                                reason="the engines extra is not installed: pip install -e '.[engines]'")  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture
def engine_bundle(runs, tmp_path) -> Path:
    return export(runs, pipeline="x", out=str(tmp_path / "b"), formats=["openvino", "onnx"])


def torch_and_nets(member, fold: int, precision: str = "fp32"):
    """(the torch network predict's PyTorch path runs, its input shape, {engine: Net}) of one fold of a member."""
    from siimcovid import weights as weights_of

    path = member.weights[fold]
    files = {e: engines.engine_paths(path.parent, fold, e) for e in engines.ENGINES}
    nets = {e: engines.Net(e, files[e], member.engine_digests, "fp32", "test") for e in engines.ENGINES}
    if precision != "fp32":
        nets = {"openvino": engines.Net("openvino", files["openvino"], member.engine_digests, precision, "test")}
    if member.kind == "classify":
        model = weights_of.classifier(member.model, path, "test", CPU)
        return (lambda x: {k: v for k, v in model(x).items() if k != "mask" and v is not None}), (1, 64), nets
    model = weights_of.detector(member.model, path, "test").model.fuse(verbose=False).eval()
    return (lambda x: {"boxes": model._predict_once(x)[0]}), (3, 64), nets


def test_export_writes_every_fold_of_every_member_as_each_engine_listed_in_the_manifest(engine_bundle, runs, tmp_path):
    listed = yaml.safe_load((engine_bundle / MANIFEST).read_text())["files"]
    opened = open_bundle(engine_bundle)
    for member in opened.detectors + opened.classifiers:
        assert set(member.engines) == {"onnx", "openvino"}
        for engine, folds in member.engines.items():
            assert set(folds) == set(member.weights)
            for k in folds:
                for path in engines.engine_paths(folds[k].parent, k, engine):
                    assert path.relative_to(engine_bundle).as_posix() in listed
    plain = open_bundle(export(runs, pipeline="x", out=str(tmp_path / "plain")))
    assert all(not m.engines for m in plain.detectors + plain.classifiers)  # formats=[] (the default): none


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_each_engine_computes_the_torch_network_within_its_tolerance(engine_bundle, precision, tolerance):
    """Both members' folds, at the trained size and at the other shapes predict feeds them (a short last batch, an
    Ultralytics TTA scale, a lung crop): classifier probabilities within `tolerance`, detector boxes within it
    relative to the image side."""
    opened = open_bundle(engine_bundle)
    for member in opened.detectors + opened.classifiers:
        for fold in member.weights:
            reference, (channels, side), nets = torch_and_nets(member, fold, precision)
            for shape in [(4, channels, side, side), (1, channels, side, side), (2, channels, 96, 64)]:
                x = torch.rand(*shape, generator=torch.Generator().manual_seed(fold))
                with torch.inference_mode():
                    want = {k: v.numpy() for k, v in reference(x).items()}
                for engine, net in nets.items():
                    got = net(x.numpy())
                    assert set(got) == set(want), (member.name, engine)
                    for key in want:
                        a, b = want[key], got[key]
                        assert a.shape == b.shape
                        if key == "boxes":  # pixels: within tolerance x the side; class scores within tolerance
                            assert np.abs(a[:, :4] - b[:, :4]).max() <= tolerance * max(shape[2:]), (engine, key)
                            assert np.abs(a[:, 4:] - b[:, 4:]).max() <= tolerance, (engine, key)
                        else:
                            p, q = torch.softmax(torch.from_numpy(a), -1), torch.softmax(torch.from_numpy(b), -1)
                            if key == "none":
                                p, q = torch.sigmoid(torch.from_numpy(a)), torch.sigmoid(torch.from_numpy(b))
                            assert (p - q).abs().max() <= tolerance, (member.name, engine, key)


def test_engine_files_are_all_folds_or_none_each_fold_whole(engine_bundle):
    det = engine_bundle / "detect" / "x"
    (det / "fold1.onnx").unlink()
    data = yaml.safe_load((engine_bundle / MANIFEST).read_text())
    del data["files"]["detect/x/fold1.onnx"]
    (engine_bundle / MANIFEST).write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SiimError, match=r"detect/x/ has onnx files for folds \[0\] but weights for folds \[0, 1\]"):
        open_bundle(engine_bundle)
    (det / "fold0.onnx").unlink()
    del data["files"]["detect/x/fold0.onnx"]
    (det / "fold0.bin").unlink()
    del data["files"]["detect/x/fold0.bin"]
    (engine_bundle / MANIFEST).write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SiimError, match="detect/x/fold0.xml has no fold0.bin"):
        open_bundle(engine_bundle)


def onnx_model(external: Path | None = None, domain: str = ""):
    """A one-node ONNX model (images -> Relu -> boxes); external: its weight kept in that file; domain: its node's."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((1,), np.float32), "w")
    if external is not None:
        external.write_bytes(np.ones((1,), np.float32).tobytes())
        weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1])
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value=str(external))
    node = helper.make_node("Add", ["images", "w"], ["boxes"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1])], [weight])  # fmt: skip
    opsets = [helper.make_opsetid("", engines.OPSET)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return onnx.helper.make_model(graph, opset_imports=opsets).SerializeToString()


def test_an_onnx_engine_that_reads_other_files_or_runs_custom_operators_is_refused(engine_bundle, tmp_path):
    """An attacker's ONNX file, listed with recomputed checksums: external data naming a file of this machine, or an
    operator of a custom domain, is refused before onnxruntime sees it; the plain one of the same kind runs."""
    secret = tmp_path / "secret.bin"
    engines.check_onnx(onnx_model(), "plain")
    for body, message in ((onnx_model(external=secret), "external data"), (onnx_model(domain="evil.ops"), "evil.ops")):
        with pytest.raises(SiimError, match=message):
            engines.check_onnx(body, "hostile")
        (engine_bundle / "classify" / "x" / "fold0.onnx").write_bytes(body)
        relist(engine_bundle, "classify/x/fold0.onnx")
        member = open_bundle(engine_bundle).classifiers[0]
        files = engines.engine_paths(member.weights[0].parent, 0, "onnx")
        with pytest.raises(SiimError, match=message):
            engines.Net("onnx", files, member.engine_digests, "fp32", "classify/x")
    with pytest.raises(SiimError, match="not an ONNX model"):
        engines.check_onnx(b"\x08\x07garbage", "garbage")
    with pytest.raises(SiimError, match="external data"):  # hidden in a node attribute's sparse tensor
        engines.check_onnx(sparse_constant(secret), "hostile")


def sparse_constant(external: Path) -> bytes:
    """A Constant node whose sparse_value's values are external data (the file `external`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    external.write_bytes(np.ones((1,), np.float32).tobytes())
    values = TensorProto(name="v", data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
    values.external_data.add(key="location", value=external.name)
    sparse = onnx.SparseTensorProto(values=values, indices=numpy_helper.from_array(np.zeros((1,), np.int64)), dims=[4])
    node = helper.make_node("Constant", [], ["boxes"], sparse_value=sparse)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", engines.OPSET)]).SerializeToString()


def test_an_openvino_engine_that_is_not_an_ir_is_refused_before_openvino_reads_it(engine_bundle, tmp_path):
    """OpenVINO's read_model guesses the format from the bytes: an ONNX model (with external data naming a file of this
    machine) written as fold0.xml, listed with recomputed checksums, would be read as ONNX, unchecked."""
    secret = tmp_path / "secret.bin"
    for body in (
        onnx_model(external=secret),
        b'<!DOCTYPE net [<!ENTITY a "aaaa">]><net>&a;</net>',
        b"<?xml version='1.0'?><graph/>",
    ):
        (engine_bundle / "detect" / "x" / "fold0.xml").write_bytes(body)
        relist(engine_bundle, "detect/x/fold0.xml")
        member = open_bundle(engine_bundle).detectors[0]
        with pytest.raises(SiimError, match="not an OpenVINO IR"):
            engines.Net("openvino", engines.engine_paths(member.weights[0].parent, 0, "openvino"), member.engine_digests,
                        "fp32", "detect/x")  # fmt: skip


def test_the_engine_runs_inside_ultralytics_predict_as_the_torch_network_does(engine_bundle):
    """weights.detector's YOLO with its network replaced by the engine (detector_on), through Ultralytics' own predict
    (its AutoBackend copies and fuses the model): the engine is called, and the boxes are torch's."""
    from siimcovid import weights as weights_of

    member = open_bundle(engine_bundle).detectors[0]
    path = member.weights[0]
    net = engines.Net("openvino", engines.engine_paths(path.parent, 0, "openvino"), member.engine_digests, "fp32", "x")
    calls = []

    def counted(x):
        calls.append(x.shape)
        return net(x)

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    args = dict(imgsz=64, conf=0.0001, iou=0.5, max_det=50, device="cpu", verbose=False)
    want = weights_of.detector(member.model, path, "x").predict(image, **args)[0].boxes
    got = engines.detector_on(weights_of.detector(member.model, path, "x"), counted).predict(image, **args)[0].boxes
    # the boxes clear of the conf threshold (one right at it may fall either side of it in the last float bit)
    want, got = (b[b.conf >= 10 * args["conf"]] for b in (want, got))
    assert calls and len(want) == len(got) > 0
    assert (
        np.abs(want.xyxy.numpy() - got.xyxy.numpy()).max() <= 1e-2 and np.abs(want.conf.numpy() - got.conf.numpy()).max() <= 1e-4
    )


def test_an_engine_file_changed_after_the_bundle_was_opened_is_refused(engine_bundle):
    member = open_bundle(engine_bundle).detectors[0]
    files = engines.engine_paths(member.weights[0].parent, 0, "openvino")
    engines.Net("openvino", files, member.engine_digests, "fp32", "detect/x")  # as opened: runs
    body = files[1].read_bytes()
    files[1].write_bytes(body[:-4] + b"\0\0\0\0")
    with pytest.raises(SiimError, match="fold0.bin: its sha256 is not the manifest's"):
        engines.Net("openvino", files, member.engine_digests, "fp32", "detect/x")
    files[1].write_bytes(body + b"\0" * 1024)  # another size: refused before it is read
    with pytest.raises(SiimError, match="fold0.bin: not the file the manifest lists"):
        engines.Net("openvino", files, member.engine_digests, "fp32", "detect/x")
    files[1].unlink()
    files[1].symlink_to(engine_bundle / "detect" / "x" / "fold1.bin")  # a link, even to a file of the bundle
    with pytest.raises(SiimError, match="fold0.bin: cannot be read"):
        engines.Net("openvino", files, member.engine_digests, "fp32", "detect/x")


def test_formats_and_backends_are_checked_before_any_work(runs, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from siimcovid.predict.members import Hardware, member_backend

    with pytest.raises(SiimError, match=r"formats=\['tensorrt'\]: expected list\[onnx \| openvino\]"):
        export(runs, pipeline="x", out=str(tmp_path / "t"), formats=["tensorrt"])
    assert not (tmp_path / "t").exists()
    with pytest.raises(SiimError, match="formats='tensorrt': expected any of onnx, openvino"):  # the Python API's own check
        engines.check_formats(["tensorrt"])
    member = SimpleNamespace(kind="detect", name="d", family="", engines={"onnx": {0: Path("fold0.onnx")}})
    assert member_backend(member, Hardware(CPU, 4, 0, True, "fp32", "torch")) == "torch"
    assert member_backend(member, Hardware(CPU, 4, 0, True, "fp32", "auto")) == "onnx"
    assert member_backend(member, Hardware(CPU, 4, 0, True, "bf16", "auto")) == "torch"  # ORT's fp32 is slower than bf16
    gpu = SimpleNamespace(type="cuda")
    assert member_backend(member, Hardware(gpu, 4, 0, True, "fp32", "auto")) == "torch"
    with pytest.raises(SiimError, match="backend=onnx runs on the CPU"):  # named on a GPU: said, not run on the CPU unseen
        member_backend(member, Hardware(gpu, 4, 0, True, "fp32", "onnx"))
    with pytest.raises(SiimError, match="no openvino engine of it .*formats=openvino"):
        member_backend(member, Hardware(CPU, 4, 0, True, "fp32", "openvino"))
    with pytest.raises(SiimError, match="backend=onnx computes in fp32 here, not bf16"):
        member_backend(member, Hardware(CPU, 4, 0, True, "bf16", "onnx"))
    monkeypatch.setattr(engines, "has_module", lambda name: name != "onnxruntime")
    with pytest.raises(SiimError, match=r"backend=onnx needs onnxruntime: pip install 'siimcovid\[engines\]'"):
        member_backend(member, Hardware(CPU, 4, 0, True, "fp32", "onnx"))
    assert member_backend(member, Hardware(CPU, 4, 0, True, "fp32", "auto")) == "torch"  # auto: what can run here
    monkeypatch.setattr(engines, "has_module", lambda name: name != "openvino")
    with pytest.raises(SiimError, match="formats=openvino needs openvino"):
        export(runs, pipeline="x", out=str(tmp_path / "t"), formats=["openvino"])


@pytest.mark.slow
def test_the_tiny_bundle_scores_the_same_on_every_backend_and_records_which_ran(tiny_run, tmp_path):
    """The tiny run exported with both engines and int8, predicted on its test images by torch, onnx, openvino (fp32 and
    bf16), auto and int8: the classifier probabilities within 1e-4 (fp32) or 1e-2 (bf16, int8) of torch's, every
    confident box matched, the score within 0.002 (fp32) or 0.01 (bf16, int8); torch is the run's own submission byte
    for byte; detector TTA (Ultralytics' augment: other shapes) runs through the engine too."""
    import pandas as pd

    base, result = tiny_run
    bundle = call("export", project=str(base / "runs"), pipeline="e2e", out=str(tmp_path / "b.zip"), formats=["openvino", "onnx"],
                  int8=["detect", "classify"], calibration=16)  # fmt: skip
    runs = {"torch": {}, "onnx": {}, "openvino": {}, "openvino-bf16": {"precision": "bf16"}, "auto": {},
            "torch-tta": {"tta": True}, "openvino-tta": {"tta": True}, "auto-int8": {"precision": "int8"}}  # fmt: skip
    scores, images, boxes, record = {}, {}, {}, {}
    for name, extra in runs.items():
        out = tmp_path / name
        done = call("predict", bundle=str(bundle), source=str(base / "siim"), out=str(out), workers=0, plan=False,
                    backend=name.split("-")[0], **extra)  # fmt: skip
        record[name] = yaml.safe_load((out / "predict.yaml").read_text())["members"]
        scores[name] = call("evaluate", submission=str(done["submission"]), data=str(base / "siim"), split="test").final
        images[name] = pd.read_csv(out / "classify" / "e2e" / "pred_test_image.csv").sort_values("image_id")
        boxes[name] = pd.read_csv(out / "detect" / "e2e" / "pred_test.csv")
        if name == "torch":
            assert (out / "submission.csv").read_bytes() == result["submission"].read_bytes()
    assert {m["backend"] for m in record["auto"].values()} == {"openvino"}
    assert {(m["backend"], m["precision"]) for m in record["openvino-bf16"].values()} == {("openvino", "bf16")}
    assert {(m["backend"], m["precision"]) for m in record["auto-int8"].values()} == {("openvino", "int8")}
    probability = [c for c in images["torch"].columns if images["torch"][c].dtype.kind == "f"]
    fp32 = (("onnx", 1e-4), ("openvino", 1e-4), ("auto", 1e-4))
    for name, tolerance in (*fp32, ("openvino-bf16", 1e-2), ("auto-int8", 1e-2)):
        difference = np.abs(images[name][probability].to_numpy() - images["torch"][probability].to_numpy()).max()
        assert difference <= tolerance, name
        assert abs(scores[name] - scores["torch"]) <= (0.002 if (name, tolerance) in fp32 else 0.01), name
    pairs = [(name, "torch") for name in ("onnx", "openvino", "openvino-bf16", "auto-int8")] + [("openvino-tta", "torch-tta")]
    for name, want in pairs:
        for image_id, a in boxes[want].groupby(["image_id", "fold"]):
            b = boxes[name][(boxes[name].image_id == image_id[0]) & (boxes[name].fold == image_id[1])]
            for one, other in ((a, b), (b, a)):
                one, other = one[[*BOX, "conf"]].to_numpy(), other[[*BOX, "conf"]].to_numpy()
                best = one[:, 4].max()
                assert matched(one[one[:, 4] >= 0.5 * best], other, iou=0.95, conf=0.1 * best), (name, image_id)
    assert not boxes["torch-tta"].equals(boxes["torch"])  # TTA ran


def test_a_detector_traced_after_a_call_still_follows_the_shape_of_its_input(tmp_path):
    """Ultralytics' Detect caches its anchor grid for the last input shape; the trace must not bake it in, or an
    Ultralytics TTA scale or a lung crop (other shapes) would be refused by ONNX Runtime, or wrong."""
    import hashlib

    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov5n.yaml", nc=1, verbose=False).float().eval()
    with torch.no_grad():
        model._predict_once(torch.rand(1, 3, 64, 64))  # the grid of 64 x 64 cached
    body = engines.onnx_bytes(engines.detector_graph(model), torch.rand(1, 3, 64, 64), ["boxes"])
    path = tmp_path / "fold0.onnx"
    path.write_bytes(body)
    net = engines.Net(
        "onnx", [path], {path.name: {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}}, "fp32", "test"
    )
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        want = model._predict_once(x)[0].numpy()
    assert np.abs(net(x.numpy())["boxes"] - want).max() <= 1e-4 * 96


# ----------------------------------------------------------------------------- int8
@pytest.fixture
def int8_bundle(runs, tmp_path) -> Path:
    both = ["detect", "classify"]
    return export(runs, pipeline="x", out=str(tmp_path / "b8"), formats=["openvino", "onnx"], int8=both, calibration=6)


def test_int8_engines_are_every_fold_listed_and_compute_the_torch_network_within_1e_2(int8_bundle):
    """export int8=detect,classify: fold<k>.int8.xml / .bin for every fold of both members, in the manifest, int8
    weights in them (under half the fp32 IR's bytes); each computes the torch network within the issue's int8
    tolerance: probabilities within 1e-2, detector boxes within 1e-2 of the image side (at the trained size and at the
    other shapes predict feeds a network)."""
    listed = yaml.safe_load((int8_bundle / MANIFEST).read_text())["files"]
    opened = open_bundle(int8_bundle)
    for member in opened.detectors + opened.classifiers:
        assert set(member.engines) == {"onnx", "openvino", engines.INT8}
        for fold, path in member.weights.items():
            xml, weights = engines.engine_paths(path.parent, fold, engines.INT8)
            assert {xml.name, weights.name} == {f"fold{fold}.int8.xml", f"fold{fold}.int8.bin"}
            assert {p.relative_to(int8_bundle).as_posix() for p in (xml, weights)} <= set(listed)
            assert b'type="FakeQuantize"' in xml.read_bytes()
            assert weights.stat().st_size <= 0.5 * engines.engine_paths(path.parent, fold, "openvino")[1].stat().st_size
            reference, (channels, side), _ = torch_and_nets(member, fold)
            net = engines.Net(engines.INT8, [xml, weights], member.engine_digests, "int8", "test")
            for shape in [(4, channels, side, side), (2, channels, 96, 64)]:
                x = torch.rand(*shape, generator=torch.Generator().manual_seed(fold))
                with torch.inference_mode():
                    want = {k: v.numpy() for k, v in reference(x).items()}
                got = net(x.numpy())
                for key in want:
                    a, b = want[key], got[key]
                    if key == "boxes":
                        assert np.abs(a[:, :4] - b[:, :4]).max() <= 1e-2 * max(shape[2:]), (member.name, fold)
                        assert np.abs(a[:, 4:] - b[:, 4:]).max() <= 1e-2, (member.name, fold)
                    else:
                        squash = torch.sigmoid if key == "none" else lambda v: torch.softmax(v, -1)
                        difference = (squash(torch.from_numpy(a)) - squash(torch.from_numpy(b))).abs().max()
                        assert difference <= 1e-2, (member.name, fold, key)


def test_int8_calibrates_each_fold_on_its_own_training_images_as_predict_feeds_them(runs, prepared):
    """network_inputs: a fixed draw of `n` of fold k's training images (never its held-out ones), a classifier's
    the grey image at imgsz in [0, 1], a detector's letterboxed RGB at its fold's imgsz."""
    import cv2

    from siimcovid.bundle.export import export_sources, kind_members
    from siimcovid.config import load_config
    from siimcovid.data.prepared import Prepared

    src = export_sources(load_config("export", {"project": str(runs), "pipeline": "x"}))
    data = Prepared(prepared)
    for member, root in kind_members("detect", src, None) + kind_members("classify", src, None):
        for fold in member.weights:
            samples = engines.network_inputs(member, fold, root, 5)
            assert len(samples) == min(5, len(data.fold(fold, "train")))
            again = engines.network_inputs(member, fold, root, 5)
            assert all(np.array_equal(a, b) for a, b in zip(samples, again))  # a fixed draw
            train, val = set(data.fold(fold, "train").image_id), set(data.fold(fold, "val").image_id)
            if member.kind == "classify":
                size = int(member.settings["imgsz"])
                pictures = {i: cv2.imread(str(data.image_path(i, "train", size)), cv2.IMREAD_GRAYSCALE) for i in train | val}
                found = [[i for i, p in pictures.items() if np.array_equal(p[None, None] / np.float32(255), s)] for s in samples]
                assert all(s.shape == (1, 1, size, size) and s.dtype == np.float32 for s in samples)
            else:
                imgsz = int({int(k): v for k, v in member.settings["imgsz"].items()}[fold])
                pictures = {i: cv2.imread(str(data.image_path(i, "train", int(member.settings["size"])))) for i in train | val}
                found = [[i for i, p in pictures.items() if np.allclose(p[..., ::-1].transpose(2, 0, 1)[None] / 255, s)]
                         for s in samples]  # fmt: skip (the prepared size is the trained one: no letterbox padding)
                assert all(s.shape == (1, 3, imgsz, imgsz) for s in samples)
            assert all(len(f) >= 1 and set(f) <= train for f in found), (member.name, fold)
            assert len({f[0] for f in found}) == len(samples)  # distinct images


def test_precision_int8_is_checked_before_any_work(runs, synth_root, tmp_path):
    """precision=int8 runs a bundle's int8 engines on the CPU: with backend=torch, on a GPU, with a bundle that has none,
    and in detect / classify predict (no bundle there) each is one line naming the fix; export int8= of another kind
    too."""
    from types import SimpleNamespace

    from siimcovid.engine.devices import cpu_precision
    from siimcovid.predict.members import Hardware, member_backend, member_engine
    from siimcovid.stages import stage_config

    with pytest.raises(SiimError, match=r"int8=\['tensorrt'\]: expected list\[detect \| classify \| lung\]"):
        export(runs, pipeline="x", out=str(tmp_path / "t"), int8=["tensorrt"])
    bundle = export(runs, pipeline="x", out=str(tmp_path / "b"), formats=["openvino"])
    with pytest.raises(SiimError, match="precision=int8 runs the bundle's int8 engines .* not backend=torch"):
        call("predict", bundle=str(bundle), source=str(synth_root), out=str(tmp_path / "o"), precision="int8")
    with pytest.raises(SiimError, match=r"holds no int8 engine \(`siimcovid export ... int8=detect,classify`"):
        call("predict", bundle=str(bundle), source=str(synth_root), out=str(tmp_path / "o"), precision="int8", backend="auto")
    assert not (tmp_path / "o").exists()
    for stage in ("detect", "classify"):  # at config time: `siimcovid run`'s sections too, before any training
        with pytest.raises(SiimError, match=f"{stage}: precision=int8 runs a bundle's int8 engines .*`siimcovid predict`'s only"):
            stage_config(stage, "predict", {"precision": "int8"})
    with pytest.raises(SiimError, match="precision=int8: expected fp32, bf16 or auto"):  # the Python API's own check
        cpu_precision(CPU, "int8")
    files = {"openvino": {0: Path("fold0.xml")}, engines.INT8: {0: Path("fold0.int8.xml")}}
    member, plain = (SimpleNamespace(kind="detect", name="d", family="", engines=e) for e in (files, {"openvino": {0: 0}}))
    hw = Hardware(CPU, 4, 0, True, "bf16", "auto", int8=True)
    assert (member_engine(member, hw), member_backend(member, hw)) == (engines.INT8, "openvino")
    assert member_engine(plain, hw) == "openvino"  # no int8 engine: the rest's precision (bf16), OpenVINO
    assert member_engine(member, Hardware(CPU, 4, 0, True, "bf16", "auto")) == "openvino"  # int8 not asked


def test_export_measures_each_int8_fold_against_fp32_and_warns_beyond_the_tolerance(engine_bundle, caplog, monkeypatch):
    """int8_deviation: zero for a network against itself; for two different networks (fold 0 against fold 1, both
    fp32 IR) the largest difference of their probabilities (classifier) or confidences (detector), as torch computes
    them; log_int8: one line per member, a warning naming the fold beyond INT8_TOLERANCE."""
    import logging

    monkeypatch.setattr(engines, "int8_rest", lambda: "f32")  # the "int8" side in f32 too: the measure, exactly
    opened = open_bundle(engine_bundle)
    rng = np.random.default_rng(0)
    for member in opened.detectors + opened.classifiers:
        xml = {k: engines.engine_paths(member.weights[k].parent, k, "openvino")[0] for k in (0, 1)}
        channels = 1 if member.kind == "classify" else 3
        inputs = [rng.random((1, channels, 64, 64), dtype=np.float32) for _ in range(3)]
        same = engines.int8_deviation(member, xml[0], xml[0], inputs)
        # (the box term needs a confident anchor (CONFIDENT): this untrained detector has none)
        assert set(same) == ({"probability"} if member.kind == "classify" else {"confidence"})
        assert max(same.values()) == 0
        other = engines.int8_deviation(member, xml[0], xml[1], inputs)
        with torch.no_grad():
            outputs = [[torch_and_nets(member, k)[0](torch.from_numpy(x)) for x in inputs] for k in (0, 1)]
        if member.kind == "classify":
            pairs = list(zip(*outputs))
            study = [(torch.softmax(a["study"], -1) - torch.softmax(b["study"], -1)).abs().max() for a, b in pairs]
            none = [(torch.sigmoid(a["none"]) - torch.sigmoid(b["none"])).abs().max() for a, b in pairs]
            assert other["probability"] == pytest.approx(float(max(study + none)), abs=1e-4)
        else:
            want = max(float((a["boxes"][:, 4:] - b["boxes"][:, 4:]).abs().max()) for a, b in zip(*outputs))
            assert other["confidence"] == pytest.approx(want, abs=1e-4)
    member = opened.detectors[0]
    with caplog.at_level(logging.INFO, logger="siimcovid"):
        engines.log_int8(member, {0: {"confidence": 0.002, "box": 0.001}, 1: {"confidence": 0.004, "box": 0.0005}})
        engines.log_int8(member, {0: {"confidence": 0.002, "box": 0.001}, 1: {"confidence": 0.03, "box": 0.0005}})
    within, beyond = [r for r in caplog.records if "export int8" in r.getMessage()]
    assert within.levelno == logging.INFO
    assert "confidence 0.004 (fold 1), box 0.001 of the side (fold 0) (within 0.01)" in within.getMessage()
    assert beyond.levelno == logging.WARNING and "confidence 0.03 (fold 1)" in beyond.getMessage()
    assert "beyond the 0.01" in beyond.getMessage() and "int8= without detect" in beyond.getMessage()


def test_the_detector_deviation_compares_corners_of_the_confident_anchors_only():
    """Ultralytics' decoded boxes are centre x, centre y, width, height: a width 2 px wider moves each side's corner by
    1 px; an anchor below CONFIDENT (or below half the image's best) counts for the scores, never for the boxes."""
    u = np.array([[50.0, 20.0], [40.0, 20.0], [10.0, 4.0], [8.0, 4.0], [0.9, 0.05]])  # two anchors, one class
    v = u.copy()
    v[2, 0] += 2  # the confident anchor: 2 px wider
    v[0, 1] += 30  # the unconfident one: moved far
    v[4, 1] += 0.02
    found = engines.detector_deviation(u, v, 100)
    assert found == pytest.approx({"confidence": 0.02, "box": 0.01})
    u[4, 0] = 0.05  # nothing confident: no box term
    assert set(engines.detector_deviation(u, v, 100)) == {"confidence"}


def test_serve_checks_its_backend_and_precision_against_the_bundle_before_it_listens(runs, tmp_path):
    """serve passes backend= and precision= to every study's predict; one its bundle cannot run is refused at the
    start, not study by study after the node has taken them."""
    bundle = export(runs, pipeline="x", out=str(tmp_path / "b"))
    node = tmp_path / "node"
    for bad, words in [
        ({"backend": "openvino"}, "holds no openvino engine of it"),
        ({"backend": "torch", "precision": "int8"}, "precision=int8 runs the bundle's int8 engines"),
        ({"backend": "auto", "precision": "int8"}, "holds no int8 engine"),
    ]:
        with pytest.raises(SiimError, match=words):
            call("serve", bundle=str(bundle), out=str(node), exit_idle=1, **bad)
        assert not node.exists()


def test_an_int8_engine_that_is_not_an_ir_is_refused_and_one_that_was_swapped_is_seen(int8_bundle, tmp_path):
    """An attacker's fold0.int8.xml, listed with recomputed checksums: an ONNX model naming a file of this machine, or an
    XML with entities, is refused before OpenVINO reads it, as for the fp32 IR; and a swapped int8 .bin fails its sha256."""
    secret = tmp_path / "secret.bin"
    for body in (onnx_model(external=secret), b'<!DOCTYPE net [<!ENTITY a "aaaa">]><net>&a;</net>'):
        (int8_bundle / "classify" / "x" / "fold0.int8.xml").write_bytes(body)
        relist(int8_bundle, "classify/x/fold0.int8.xml")
        member = open_bundle(int8_bundle).classifiers[0]
        files = engines.engine_paths(member.weights[0].parent, 0, engines.INT8)
        with pytest.raises(SiimError, match="not an OpenVINO IR"):
            engines.Net(engines.INT8, files, member.engine_digests, "int8", "classify/x")
    member = open_bundle(int8_bundle).detectors[0]
    files = engines.engine_paths(member.weights[0].parent, 0, engines.INT8)
    files[1].write_bytes(files[1].read_bytes()[:-4] + b"\0\0\0\0")  # after opening: not what the manifest lists
    with pytest.raises(SiimError, match=r"fold0.int8.bin: its sha256 is not the manifest's"):
        engines.Net(engines.INT8, files, member.engine_digests, "int8", "detect/x")
