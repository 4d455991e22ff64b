"""Pretraining and fine-tuning: the soft-target loss, init= loading, classifier multi-label pretraining on an
external set -> SIIM fine-tune, detector pretraining on RSNA-layout boxes -> fine-tune, extra= on both stages.

The external folders come from tests/test_extra.py's fixtures (SIIM synth + prepare in the rsna / csv layouts).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_classify import TINY_MODEL, tiny_cfg
from test_extra import csv_prepared, pseudo_dir, rsna_prepared  # noqa: F401  fixtures

from siimcovid.classify.model import LabelLoss, StudyLoss, build_model, init_from, soft_cross_entropy
from siimcovid.data.extra import ExtraData
from siimcovid.rundir import read_run
from siimcovid.utils import SiimError

# ---------------------------------------------------------------- the soft-target loss


def test_soft_ce_matches_hard_ce_on_one_hot():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    onehot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, labels))
    torch.testing.assert_close(soft_cross_entropy(logits, onehot, 0.1), F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_unknown_targets_contribute_nothing():
    torch.manual_seed(1)
    n = 6
    out = {"study": torch.randn(n, 4, requires_grad=True), "none": torch.randn(n, requires_grad=True)}
    out["mask"] = torch.randn(n, 1, 4, 4, requires_grad=True)
    study = torch.softmax(torch.randn(n, 4), 1)
    study[[1, 4]] = float("nan")  # unknown study class
    none = torch.rand(n)
    none[[2]] = float("nan")
    mask = (torch.rand(n, 1, 16, 16) > 0.5).to(torch.uint8) * 255
    has_mask = torch.tensor([True, True, False, True, False, True])
    parts = StudyLoss(mask_weight=2.0).forward(out, study, none, mask, has_mask)
    parts["loss"].backward()
    # no gradient reaches the unknown terms' outputs
    assert torch.all(out["study"].grad[[1, 4]] == 0) and torch.all(out["study"].grad[[0, 2, 3, 5]].abs().sum(1) > 0)
    assert out["none"].grad[2] == 0 and torch.all(out["none"].grad[[0, 1, 3, 4, 5]] != 0)
    assert torch.all(out["mask"].grad[[2, 4]] == 0)
    # the known rows alone give the same loss
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(parts["cls"], F.cross_entropy(out["study"][keep].detach(), study[keep]))
    with_mask = [0, 1, 3, 5]
    sub = StudyLoss(mask_weight=2.0).forward(
        {k: v.detach()[with_mask] for k, v in out.items()}, study[with_mask], none[with_mask], mask[with_mask]
    )
    torch.testing.assert_close(parts["mask"], sub["mask"])
    # every target unknown: a zero still tied to the graph
    nothing = StudyLoss().forward(out, torch.full((n, 4), float("nan")), torch.full((n,), float("nan")), mask, has_mask * False)
    assert all(float(nothing[k].detach()) == 0 for k in ("cls", "none", "mask"))
    assert nothing["loss"].requires_grad


def test_label_loss_masks_unknown_labels():
    torch.manual_seed(2)
    out = {"labels": torch.randn(5, 3, requires_grad=True), "mask": torch.randn(5, 1, 4, 4), "none": None}
    labels = torch.tensor([[1, 0, float("nan")], [0, float("nan"), 1], [1, 1, 0], [float("nan")] * 3, [0, 0, 1]])
    parts = LabelLoss(mask_weight=0.0).forward(out, labels, torch.zeros(5), torch.zeros(5, 1, 16, 16), None)
    known = ~torch.isnan(labels)
    torch.testing.assert_close(parts["cls"], F.binary_cross_entropy_with_logits(out["labels"][known], labels[known]))
    parts["loss"].backward()
    assert torch.all(out["labels"].grad[~known] == 0)


# ---------------------------------------------------------------- init= loading


def save_ckpt(model, path: Path, mcfg: dict) -> Path:
    torch.save({"model": model.state_dict(), "model_cfg": mcfg}, path)
    return path


def test_init_loads_matching_tensors_and_rebuilds_heads(tmp_path):
    pre_cfg = {**TINY_MODEL, "labels": ["Effusion", "Mass", "Nodule"]}
    torch.manual_seed(0)
    pretrained = build_model(pre_cfg)
    ckpt = save_ckpt(pretrained, tmp_path / "pre.pt", pre_cfg)
    torch.manual_seed(1)
    siim = build_model(TINY_MODEL)
    fresh = {k: v.clone() for k, v in siim.state_dict().items()}
    n, rebuilt = init_from(siim, ckpt, TINY_MODEL["model"])
    assert rebuilt == ["study_head", "none_head"]  # the label head does not exist here; the SIIM heads are new
    own, src = siim.state_dict(), pretrained.state_dict()
    shared = [k for k in own if k in src and src[k].shape == own[k].shape]
    assert n == len(shared) and any(k.startswith("mask_head.") for k in shared)
    for k in own:
        torch.testing.assert_close(own[k], src[k] if k in shared else fresh[k])
    # SIIM -> SIIM: everything fits, nothing rebuilt
    torch.manual_seed(2)
    again = build_model(TINY_MODEL)
    n2, rebuilt2 = init_from(again, save_ckpt(siim, tmp_path / "siim.pt", TINY_MODEL), TINY_MODEL["model"])
    assert n2 == len(again.state_dict()) and rebuilt2 == []
    with pytest.raises(SiimError, match="model=resnet10t"):
        init_from(again, ckpt, "resnet10t")


# ---------------------------------------------------------------- training (slow)


def run_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_classify_pretrain_then_finetune(prepared, csv_prepared, tmp_path, caplog):  # noqa: F811
    from siimcovid.classify.train import main

    caplog.set_level(logging.INFO, logger="siimcovid")
    main(tiny_cfg(csv_prepared, tmp_path, name="pre", fold=0, epochs=1, fine_lr=[], batch=4))
    fold = tmp_path / "pre" / "fold0"
    log = pd.read_csv(fold / "results.csv")
    assert "val_auc" in log and np.isfinite(log.val_auc).all() and log.val_map.isna().all()
    best = torch.load(fold / "best.pt", weights_only=False)
    names = ExtraData(csv_prepared).label_names
    assert best["model_cfg"]["labels"] == names and best["classes"] == names
    probs = pd.read_csv(fold / "val_pred_labels.csv")
    assert list(probs.columns[-len(names) :]) == names
    assert set(probs.image_id) == set(ExtraData(csv_prepared).prep.fold(0, "val").image_id)
    from siimcovid.classify.predict import predict_run

    with pytest.raises(SiimError, match="multi-label pretraining run"):  # no study head to predict with
        predict_run(tmp_path / "pre", "oof", False, torch.device("cpu"), 4, 0)

    caplog.clear()
    main(tiny_cfg(prepared, tmp_path, name="fine", fold=0, epochs=1, fine_lr=[], init=str(tmp_path / "pre")))
    line = next(m for m in run_log(caplog).splitlines() if m.startswith("init: loaded"))
    assert str(fold / "best.pt") in line and line.endswith("rebuilt: study_head, none_head")
    assert (tmp_path / "fine" / "fold0" / "done.json").is_file()
    saved = read_run(tmp_path / "fine" / "classify.yaml")
    assert saved["init"] == str((tmp_path / "pre").resolve())
    with pytest.raises(SiimError, match="init="):  # a recorded setting: a resume without it is refused
        main(tiny_cfg(prepared, tmp_path, name="fine", fold=0, epochs=1, fine_lr=[]))
    with pytest.raises(SiimError, match="trained on the same folds"):  # fold 0's model saw the other folds' images
        main(tiny_cfg(prepared, tmp_path, name="fine2", fold=0, epochs=1, fine_lr=[], init=str(tmp_path / "fine")))


@pytest.mark.slow
def test_classify_extra_trains(prepared, rsna_prepared, pseudo_dir, tmp_path, caplog):  # noqa: F811
    from siimcovid.classify.train import main

    caplog.set_level(logging.INFO, logger="siimcovid")
    extra = [str(rsna_prepared), str(pseudo_dir)]
    main(tiny_cfg(prepared, tmp_path, name="x", fold=0, epochs=1, fine_lr=[], extra=extra, mixup=0.5, dedup="keep"))
    assert "training images +" in run_log(caplog)
    assert (tmp_path / "x" / "fold0" / "done.json").is_file()
    log = pd.read_csv(tmp_path / "x" / "fold0" / "results.csv")
    assert np.isfinite(log[["train_loss", "train_cls", "train_none", "train_mask", "val_map"]].to_numpy()).all()


DETECT_TINY = ["model=yolov5n.yaml", "epochs=1", "imgsz=64", "batch=8", "workers=0", "device=cpu", "plots=false"]


def detect(*args):
    from siimcovid import cli

    return cli.main(["detect", "train", *args])


@pytest.mark.slow
def test_detect_pretrain_on_rsna_then_finetune(prepared, rsna_prepared, pseudo_dir, tmp_path, capfd):  # noqa: F811
    rsna_yamls = rsna_prepared.parent / "data_yaml"
    detect(f"data={rsna_prepared}", f"data_yaml_dir={rsna_yamls}", *DETECT_TINY, "pretrained=false", "fold=0",
           f"project={tmp_path}", "name=rsna")  # fmt: skip
    assert (tmp_path / "rsna" / "fold0" / "weights" / "best.pt").is_file()
    capfd.readouterr()
    siim_yamls = Path(prepared).parent / "data_yaml"
    common = [f"data={prepared}", f"data_yaml_dir={siim_yamls}", *DETECT_TINY, "fold=0", f"project={tmp_path}"]
    extra = f"extra={rsna_prepared},{pseudo_dir}"
    # Ultralytics' own logger (no propagation; its stream handler may hold a stream an earlier test captured): listen to it
    messages = logging.Handler()
    messages.emit = lambda record: lines.append(record.getMessage())
    lines: list[str] = []
    logging.getLogger("ultralytics").addHandler(messages)
    try:
        detect(*common, "name=fine", f"init={tmp_path / 'rsna'}", extra, "dedup=keep")
    finally:
        logging.getLogger("ultralytics").removeHandler(messages)
    out = capfd.readouterr()
    text = out.out + out.err + "\n".join(lines)
    transferred = re.search(r"Transferred (\d+)/(\d+) items from pretrained weights", text)
    assert transferred and transferred.group(1) == transferred.group(2)  # same architecture, one class: every tensor
    args = yaml.safe_load((tmp_path / "fine" / "fold0" / "args.yaml").read_text())
    assert args["pretrained"] == str((tmp_path / "rsna" / "fold0" / "weights" / "best.pt").resolve())
    data = yaml.safe_load(Path(args["data"]).read_text())
    assert isinstance(data["train"], list) and len(data["train"]) == 2
    n_extra = len(Path(data["train"][1]).read_text().splitlines())
    assert n_extra == len(ExtraData(rsna_prepared).detector_images(0, 128)) + len(ExtraData(pseudo_dir).detector_images(0, 128))
    with pytest.raises(SiimError, match="extra"):  # extra is a recorded setting
        detect(*common, "name=fine", f"init={tmp_path / 'rsna'}")
    with pytest.raises(SiimError, match="trained on the same folds"):  # a SIIM run's fold 0 saw the other folds' images
        detect(*common, "name=fine2", f"init={tmp_path / 'fine'}")
