"""A classifier's TTA views (siimcovid.classify.tta): tta=none | hflip | vflip | d4, true / false read as hflip / none
wherever tta was on or off (settings, a run's predict.yaml, a bundle, an ensemble's record); detectors on or off."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_classify_crop import CPU, Seeing, lung_tables, source, views_of  # noqa: E402

from siimcovid.classify import predict as P  # noqa: E402
from siimcovid.classify.data import StudyDataset, image_table, to_device  # noqa: E402
from siimcovid.classify.model import probabilities  # noqa: E402
from siimcovid.classify.tta import D4, TTA_NAMES, VIEWS, apply, detector_tta, invert, tta_name, tta_views  # noqa: E402
from siimcovid.config import ConfigError, load_config  # noqa: E402
from siimcovid.data.prepared import Prepared  # noqa: E402
from siimcovid.utils import SiimError  # noqa: E402


def test_d4_is_eight_distinct_invertible_transforms_of_a_non_symmetric_image():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).reshape(2, 1, 5, 5)  # no symmetry of the square keeps it
    seen = [apply(v, x) for v in D4]
    assert len(D4) == 8 and len({v.name for v in D4}) == 8
    assert len({tuple(y.flatten().tolist()) for y in seen}) == 8  # 8 distinct images
    for v, y in zip(D4, seen):
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.equal(invert(v, y), x)  # each undone
        assert sorted(y.flatten().tolist()) == sorted(x.flatten().tolist())  # pixels moved, none changed
    by_name = {v.name: y for v, y in zip(D4, seen)}
    assert torch.equal(by_name["identity"], x) and torch.equal(by_name["hflip"], x.flip(-1))
    assert torch.equal(by_name["vflip"], x.flip(-2)) and torch.equal(by_name["rot180"], x.flip(-2).flip(-1))
    assert torch.equal(by_name["rot90"][0, 0, 0], x[0, 0, :, -1])  # a quarter turn counter-clockwise: the right column on top
    # the views of each name: the image as it is first, then its others (hflip and vflip are d4's own)
    assert [len(VIEWS[n]) for n in TTA_NAMES] == [1, 2, 2, 8] and all(VIEWS[n][0] == D4[0] for n in TTA_NAMES)
    assert VIEWS["hflip"][1] in D4 and VIEWS["vflip"][1] in D4


def test_tta_names_true_false_aliases_and_a_bad_value_names_the_allowed_ones():
    assert [tta_name(n) for n in TTA_NAMES] == list(TTA_NAMES)
    assert tta_name(True) == "hflip" and tta_name(False) == "none" and tta_name(" D4 ") == "d4"
    assert tta_views(True) == VIEWS["hflip"] and tta_views(False) == VIEWS["none"]
    assert [detector_tta(v) for v in ("none", False, "hflip", "vflip", "d4", True)] == [False, False, True, True, True, True]
    for bad in ("mirror", "d8", 1, None, ["hflip"]):
        with pytest.raises(SiimError, match=r"tta is one of none, hflip, vflip, d4 \(true = hflip, false = none\)"):
            tta_name(bad, "where")
    for stage, key in (("classify", "tta"), ("pseudo", "cls_tta"), ("predict", "tta")):
        with pytest.raises(ConfigError, match=rf"{stage} setting {key}='d8': expected none \| hflip \| vflip \| d4 \| bool"):
            load_config(stage, [f"{key}=d8"])
        assert load_config(stage, [f"{key}=vflip"])[key] == "vflip" and load_config(stage, [f"{key}=true"])[key] is True
    assert load_config("run", ["classify_predict.tta=d4"]).classify_predict["tta"] == "d4"


class Lopsided(torch.nn.Module):
    """A small random convolutional classifier: no symmetry, so each view gives other probabilities."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 6, 3, stride=2)
        self.head = torch.nn.Linear(6 * 7 * 7, 5)

    def forward(self, x):
        z = self.head(torch.relu(self.conv(x)).flatten(1))
        return {"study": z[:, :4] * 3, "none": z[:, 4] * 3, "mask": None}


def loader(n: int = 6, size: int = 16):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    item = lambda i: {"image": images[i], "label": torch.tensor(0), "none": torch.tensor(0.0), "index": torch.tensor(i)}  # noqa: E731
    items = [item(i) for i in range(n)]
    return images, torch.utils.data.DataLoader(items, batch_size=4)


def test_infer_means_the_views_hflip_is_the_old_true_and_false_is_none():
    model, (images, batches) = Lopsided().eval(), loader()
    got = {tta: P.infer(model, batches, CPU, tta=tta)[1:3] for tta in (*TTA_NAMES, True, False)}
    with torch.inference_mode():  # what tta=true computed before, batch by batch: the image and its mirror, averaged
        batch = [to_device(b, CPU)["image"] for b in batches]  # float in [0, 1], as infer reads them
        plain = [probabilities(model(x)) for x in batch]
        mirror = [probabilities(model(x.flip(-1))) for x in batch]
        s1, n1 = (torch.cat([p[i] for p in plain]) for i in (0, 1))
        old = [torch.cat([(p[i] + m[i]) / 2 for p, m in zip(plain, mirror)]).numpy() for i in (0, 1)]
        views = [probabilities(model(apply(v, images.float() / 255))) for v in D4]
    for a, b in zip(got[True], old):
        assert (a == b).all()  # bit for bit
    for a, b, c in zip(got["hflip"], got[True], got[False]):
        assert (a == b).all() and (c == got["none"][0 if c.ndim == 2 else 1]).all()
    assert (got["none"][0] == s1.numpy()).all() and (got["none"][1] == n1.numpy()).all()
    d4_study = sum(s for s, _ in views) / 8
    assert got["d4"][0] == pytest.approx(d4_study.numpy(), abs=1e-6) and got["d4"][0].sum(1) == pytest.approx(1, abs=1e-5)
    assert not (abs(got["d4"][0] - got["hflip"][0]) < 1e-4).all() and not (abs(got["vflip"][0] - got["hflip"][0]) < 1e-4).all()
    with pytest.raises(SiimError, match=r"tta='d8': tta is one of none, hflip, vflip, d4"):
        P.infer(model, batches, CPU, tta="d8")


def test_the_lung_crop_view_is_seen_in_the_same_tta_views(prepared, monkeypatch):
    """crop=lung: the crop view of a fold model goes through infer with the run's tta, as the whole view does."""
    prep = Prepared(prepared)
    asked, real = [], P.infer
    monkeypatch.setattr(P, "infer", lambda *a, **k: asked.append(a[4] if len(a) > 4 else k.get("tta")) or real(*a, **k))
    fused = P.predict_fold((Seeing(), None, Path("f.pt")), source(prep, views_of(prep, lung_tables(prep)), tta="d4"), 1, "train")
    assert asked == ["d4", "d4"] and len(fused) == len(image_table(prep, "train", 1, "val"))
    table = image_table(prep, "train", 1, "val")
    at, subset, windows = P.crop_subset(table, views_of(prep).windows(prep, 1, table, "oof"))
    model = Seeing()
    crops = StudyDataset(prep, subset, 64, masks=False, windows=windows)
    real(model, torch.utils.data.DataLoader(crops, batch_size=len(subset)), CPU, tta="d4")
    assert len(model.seen) == 8 and torch.equal(model.seen[1], torch.rot90(model.seen[0], 1, dims=(-2, -1)))


def test_old_bundles_run_folders_and_ensemble_records_with_true_false_still_read():
    from siimcovid.bundle.members import CLASSIFY_SETTINGS, classifier_tta
    from siimcovid.predict.members import member_tta

    assert [classifier_tta(v, "b") for v in (True, False, "hflip", "none", "d4")] == ["hflip", "none", "hflip", "none", "d4"]
    with pytest.raises(SiimError, match=r"^classify/x/settings.yaml: classify setting tta='d8': expected none \| hflip"):
        classifier_tta("d8", "classify/x/settings.yaml")
    key = next(k for k in CLASSIFY_SETTINGS.keys if k.name == "tta")
    assert key.check(True, "old bundle") == "hflip" and key.check(False, "old bundle") == "none"
    old = type("Member", (), {"kind": "classify", "name": "b3", "settings": {"tta": True}})()
    assert member_tta(old, None) == "hflip" and member_tta(old, "d4") == "d4" and member_tta(old, False) == "none"
    record = {"runs": ["a", "b"], "ensemble": "mean", "tta": True, "weights": "best"}  # an ensemble folder's, tta on
    assert P.same_tta(record) == {**record, "tta": "hflip"} and P.same_tta({**record, "tta": "d4"})["tta"] == "d4"
    assert P.view(True) == "hflip" and P.view(False) == "none" and P.view("vflip") == "vflip"
