"""family=torchvision: one fold of torchvision's Faster R-CNN (the light mobilenet arch, from scratch) trains through the
fold engine and predicts OOF and test boxes in the DETECTIONS contract, in original pixels."""

from __future__ import annotations

import pytest

from siimcovid import cli
from siimcovid.data.prepared import Prepared
from siimcovid.tables import DETECTIONS

TINY = ["family=torchvision", "arch=fasterrcnn_mobilenet_v3_large_fpn", "pretrained=false", "epochs=1", "imgsz=64"]
TINY += ["batch=4", "workers=0", "device=cpu"]


@pytest.mark.slow
def test_a_torchvision_fold_trains_and_predicts_in_original_pixels(prepared, tmp_path):
    prep = Prepared(prepared)
    run = cli.main(["detect", "train", f"data={prepared}", *TINY, f"project={tmp_path}", "name=tv", "fold=0"])
    out = cli.main(["detect", "predict", f"run={run}", "device=cpu", "tta=true"])["tv"]
    oof, test = DETECTIONS.read(out["oof"]), DETECTIONS.read(out["test"])
    assert set(oof.image_id) <= set(prep.fold(0, "val").image_id) and (oof.fold == 0).all()
    assert set(test.image_id) <= set(prep.split("test").image_id)
    meta = prep.meta.set_index("image_id")
    for table in (oof, test):
        assert (table.x_max <= meta.loc[table.image_id, "cols"].to_numpy() + 1e-6).all()
        assert (table.y_max <= meta.loc[table.image_id, "rows"].to_numpy() + 1e-6).all()
        assert ((table.x_min < table.x_max) & (table.conf.between(0, 1))).all()
