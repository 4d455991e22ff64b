"""precision= on the CPU (siimcovid.engine.devices): fp32 as trained, bf16 under autocast, auto = bf16 only where the CPU
computes it natively; the gates of bf16 against fp32 on the same images (classifier probabilities, detector boxes, the
bundle's test score)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siimcovid.config import ConfigError, load_config
from siimcovid.data.prepared import Prepared
from siimcovid.engine import devices
from siimcovid.utils import SiimError

CPU = torch.device("cpu")
BOX = ["x_min", "y_min", "x_max", "y_max"]


def test_auto_is_bf16_only_on_a_cpu_that_computes_it(tmp_path, monkeypatch):
    native, emulated = tmp_path / "native", tmp_path / "emulated"
    native.write_text("flags\t\t: fpu sse2 avx512f avx512bw avx512_bf16\n")
    emulated.write_text("flags\t\t: fpu sse2 avx512f avx512bw avx512_vnni\n")  # torch emulates bf16 here: slower
    assert devices.cpu_has_bf16(native) and not devices.cpu_has_bf16(emulated)
    assert not devices.cpu_has_bf16(tmp_path / "no-such-file")  # not Linux: fp32
    for has, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(devices, "cpu_has_bf16", lambda has=has: has)
        assert devices.cpu_precision(CPU, "auto") == want and devices.cpu_precision("cpu", "auto") == want
        assert devices.cpu_precision(CPU, "fp32") == "fp32" and devices.cpu_precision(CPU, "bf16") == "bf16"
        assert devices.cpu_precision(CPU, None) == "fp32"  # the default
    gpu = type("Device", (), {"type": "cuda"})()
    assert devices.cpu_precision(gpu, "bf16") == "fp32"  # a GPU's fp16 is half=
    with pytest.raises(SiimError, match="precision=int4"):
        devices.cpu_precision(CPU, "int4")
    for stage in ("predict", "classify", "detect"):
        assert load_config(stage, {}).precision == "fp32"
        with pytest.raises(ConfigError, match="precision"):
            load_config(stage, {"precision": "fp16"})


def test_a_member_of_a_family_that_does_not_read_precision_is_recorded_as_fp32(caplog):
    from types import SimpleNamespace

    import constant_family  # noqa: F401  (registers the classify family "constant", which predicts without autocast)

    from siimcovid.predict.members import Hardware
    from siimcovid.predict.stage import member_precision

    hw = Hardware(CPU, 4, 0, True, "bf16")
    own = SimpleNamespace(kind="classify", name="c", family="")
    assert member_precision(own, hw) == "bf16"
    assert member_precision(SimpleNamespace(kind="detect", name="d", family="torchvision"), hw) == "bf16"
    assert member_precision(SimpleNamespace(kind="classify", name="k", family="constant"), hw) == "fp32"
    assert "family=constant) predicts in fp32" in caplog.text
    assert member_precision(own, Hardware(CPU, 4, 0, True, "fp32")) == "fp32"


def test_fp32_never_reads_the_device():
    assert devices.cpu_precision(-1, "fp32") == "fp32" and devices.cpu_precision("cuda:7", None) == "fp32"


def test_cpu_autocast_computes_in_bf16_only_when_asked():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with devices.cpu_autocast(CPU, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with devices.cpu_autocast(CPU, "fp32"):
        assert layer(x).dtype == torch.float32


def test_a_classifier_in_bf16_gives_the_fp32_probabilities_within_1e_2(prepared):
    """The same untrained timm model on the same prepared images, fp32 and bf16 (autocast + channels_last): the
    probabilities differ (bf16 ran) by less than the stated tolerance."""
    from torch.utils.data import DataLoader

    from siimcovid.classify.data import StudyDataset, image_table
    from siimcovid.classify.model import build_model, model_cfg
    from siimcovid.classify.predict import amp_dtype_for, infer

    prep = Prepared(prepared)
    torch.manual_seed(0)
    model = build_model(model_cfg(load_config("classify", {"model": "resnet10t", "pretrained": False})))
    loader = DataLoader(StudyDataset(prep, image_table(prep, "test"), 64, masks=False), batch_size=4)
    _, fp32, none32, _ = infer(model, loader, CPU, amp_dtype_for(CPU, True, "fp32"), "hflip")
    assert amp_dtype_for(CPU, True, "bf16") == torch.bfloat16 and amp_dtype_for(CPU, True, "fp32") is None
    model = model.to(memory_format=torch.channels_last)
    _, bf16, none16, _ = infer(model, loader, CPU, torch.bfloat16, "hflip")
    assert fp32.dtype == bf16.dtype == np.float32
    assert 0 < np.abs(bf16 - fp32).max() < 1e-2 and np.abs(none16 - none32).max() < 1e-2


def matched(fp32: np.ndarray, bf16: np.ndarray, iou: float = 0.95, conf: float = 0.02) -> bool:
    """Whether every fp32 box (n, 5: xyxy, conf) has a bf16 box at IoU >= iou with its confidence within conf."""
    from siimcovid.metrics import box_iou

    for box in fp32:
        overlap = box_iou(np.broadcast_to(box[:4], bf16[:, :4].shape), bf16[:, :4])
        ok = (overlap >= iou) & (np.abs(bf16[:, 4] - box[4]) <= conf)
        if not ok.any():
            return False
    return True


@pytest.mark.slow
def test_a_detector_in_bf16_finds_the_fp32_boxes(tiny_run):
    """The tiny run's YOLO fold 0 on its test and some train images, fp32 and bf16. Its one epoch leaves confidences of
    about 0.01, so the gate is relative: each box of at least half its image's best confidence, in either precision,
    has a box of the other at IoU >= 0.95 with a confidence within 10% of that best."""
    import cv2

    from siimcovid.config import Config
    from siimcovid.detect.family import YoloFamily
    from siimcovid.detect.predict import load_run

    base, _ = tiny_run
    run = load_run(base / "runs" / "detect" / "e2e")
    prep = run.prepared
    images = [cv2.imread(str(prep.image_path(i, "test", run.size))) for i in prep.split("test").image_id]
    images += [cv2.imread(str(prep.image_path(i, "train", run.size))) for i in prep.split("train").image_id[:8]]
    found = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config("detect", {"device": "cpu", "conf": 0.001, "tta": False, "precision": precision})
        family = YoloFamily(Config(cfg))
        found[precision] = family.detect_arrays(family.load_fold(run, 0, run.weights[0], CPU), images, tta=False)
    tables = {}
    for precision in ("fp32", "bf16"):  # the crop=none path (detect predict's, a bundle's detectors): predict_images
        cfg = load_config("detect", {"device": "cpu", "conf": 0.001, "tta": False, "precision": precision})
        family = YoloFamily(Config(cfg))
        ids = list(prep.split("test").image_id)
        tables[precision] = family.predict_images(family.load_fold(run, 0, run.weights[0], CPU), run, 0, ids, "test")
    assert not tables["fp32"].equals(tables["bf16"])  # bf16 ran there too
    for image_id, a in tables["fp32"].groupby("image_id"):
        b = tables["bf16"][tables["bf16"].image_id == image_id]
        one, other = a[[*BOX, "conf"]].to_numpy(), b[[*BOX, "conf"]].to_numpy()
        best = one[:, 4].max()
        assert matched(one[one[:, 4] >= 0.5 * best], other, iou=0.95, conf=0.1 * best)
    differs = False
    for a, b in zip(found["fp32"], found["bf16"]):
        assert len(a) and len(b)
        for one, other in ((a, b), (b, a)):
            best = one[:, 4].max()
            assert matched(one[one[:, 4] >= 0.5 * best], other, iou=0.95, conf=0.1 * best)
        differs |= a.shape != b.shape or not np.array_equal(a, b)
    assert differs  # bf16 ran


@pytest.mark.slow
def test_the_bundle_in_bf16_scores_within_0_01_of_fp32_and_records_its_precision(tiny_run, tmp_path):
    import yaml

    from siimcovid.cli import call

    base, result = tiny_run
    scores, tables = {}, {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        done = call("predict", bundle=str(result["bundle"]), source=str(base / "siim"), out=str(out), workers=0,
                    precision=precision)  # fmt: skip
        record = yaml.safe_load((out / "predict.yaml").read_text())
        assert {m["precision"] for m in record["members"].values()} == {precision}
        tables[precision] = (out / "classify" / "e2e" / "pred_test_image.csv").read_bytes()
        score = call("evaluate", submission=str(done["submission"]), data=str(base / "siim"), split="test")
        scores[precision] = score.final
    assert tables["fp32"] != tables["bf16"]  # bf16 ran
    for stage in ("detect", "classify"):  # into a run's own tables (what fuse and export read): refused
        with pytest.raises(SiimError, match="would write the run's own prediction tables"):
            call(stage, "predict", run=str(base / "runs" / stage / "e2e"), split=["test"], precision="bf16", device="cpu")
    assert abs(scores["bf16"] - scores["fp32"]) <= 0.01
    assert (tmp_path / "fp32" / "submission.csv").read_bytes() == result["submission"].read_bytes()  # fp32: the run's own
