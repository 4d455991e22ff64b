"""SWA (siimcovid.engine.swa): the average is the mean of the SWA epochs' weights, batch-norm recomputed at the end,
best.pt and last.pt hold it, a fold stopped during (or right after) the SWA epochs resumes to the weights of a run
never stopped, and the settings that cannot work are refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from test_classify import tiny_cfg  # noqa: E402

from siimcovid.config import load_config  # noqa: E402
from siimcovid.engine.swa import SWA, check_swa  # noqa: E402
from siimcovid.utils import SiimError  # noqa: E402

# one wave of 3 epochs, the last 2 averaged at a constant lr; the EMA on (SWA averages the model's own weights)
SWA_RUN = {"fold": 0, "epochs": 3, "fine_lr": [], "swa_epochs": 2, "swa_lr": 2e-3, "ema": 0.9}
SWA_LR = SWA_RUN["swa_lr"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def params(state: dict, model) -> dict:
    """The trainable parameters of a state dict (not the batch-norm buffers)."""
    names = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


# ---------------------------------------------------------------- the helper


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))


def test_the_average_is_the_mean_of_the_swa_epochs_weights_and_batch_norm_is_recomputed():
    model, swa = net(), SWA(2, 4)
    seen = []
    for epoch in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # an epoch's training
        swa.update(model, epoch)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
    assert swa.first == 3 and swa.n_averaged == 2
    state = swa.state_dict()
    for name, _ in model.named_parameters():  # epochs 3 and 4 only
        assert torch.allclose(state["model"][name], (seen[2][name] + seen[3][name]) / 2, atol=1e-6), name
        assert not torch.allclose(state["model"][name], seen[3][name]), name

    data = torch.randn(64, 3) * 3 + 1
    final = swa.final_model([data[:32], data[32:]])
    with torch.no_grad():
        hidden = final[0](data)
    bn = final[1]
    assert torch.allclose(bn.running_mean, hidden.mean(0), atol=1e-5)  # the two batches' cumulative mean
    assert not final.training


def test_the_average_resumes_from_its_state_and_swa_lr_holds_the_lr():
    model, swa = net(), SWA(3, 4, lr=0.05)
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        swa.update(model, epoch)
    resumed = SWA(3, 4, lr=0.05)
    resumed.load_state_dict(swa.state_dict(), model)
    for s in (swa, resumed):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        s.update(model, 4)
        model[0].weight.data.sub_(1.0)
    a, b = swa.state_dict(), resumed.state_dict()
    assert a["n_averaged"] == b["n_averaged"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    assert not swa.owns_lr(1) and swa.owns_lr(2)
    swa.set_lr(opt, 1)
    assert opt.param_groups[0]["lr"] == 1.0
    swa.set_lr(opt, 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_settings_that_cannot_work_are_refused():
    from siimcovid.classify.train import check_config

    for bad, why in [
        ({"epochs": 3, "fine_lr": [], "swa_epochs": 3}, "the fold has 3 epochs"),
        ({"epochs": 3, "fine_lr": [1e-4], "fine_epochs": 2, "swa_epochs": 3}, "cannot span waves"),
        ({"swa_lr": 0.01}, "without swa_epochs"),
    ]:
        with pytest.raises(SiimError, match=why):
            check_config(load_config("classify", {"model": "test_efficientnet", **bad}))
    check_config(load_config("classify", {"model": "test_efficientnet", "epochs": 3, "fine_lr": [], "swa_epochs": 2}))
    with pytest.raises(SiimError, match="swa_lr"):
        load_config("classify", {"swa_lr": 0})  # {float > 0?}
    with pytest.raises(SiimError, match="the fold has 5 epochs"):
        check_swa(load_config("detect", {"swa_epochs": 5, "epochs": 5}), 5)


# ---------------------------------------------------------------- a classifier fold


def record_epochs(seen: list):
    """on_train_epoch_end: a copy of the model's own weights after each epoch's training steps."""

    def fn(trainer):
        seen.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    return fn


class Stop(Exception):
    """The in-process stand-in of a kill right after an epoch's last.pt is written."""


def stop_after(epoch: int):
    def fn(trainer, row):
        if trainer.epoch == epoch:
            raise Stop(epoch)

    return fn


@pytest.fixture(scope="module")
def swa_run(prepared, tmp_path_factory):
    from siimcovid.classify.train import main

    project, seen = tmp_path_factory.mktemp("swa"), []
    main(tiny_cfg(prepared, project, name="whole", **SWA_RUN), {"on_train_epoch_end": record_epochs(seen)})
    return project / "whole" / "fold0", seen


@pytest.mark.slow
def test_a_classifier_fold_ends_with_the_mean_of_its_swa_epochs(swa_run):
    from siimcovid.classify.model import build_model

    fold, seen = swa_run
    best, last = load(fold / "best.pt"), load(fold / "last.pt")
    model = build_model(best["model_cfg"])
    assert len(seen) == 3
    for name, value in params(best["model"], model).items():  # the mean of epochs 2 and 3, not any epoch's weights
        assert torch.allclose(value, (seen[1][name] + seen[2][name]) / 2, atol=1e-6), name
    assert any(not torch.equal(v, seen[2][k]) for k, v in params(best["model"], model).items())
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"]) and last["ema"] is None
    assert last["swa"]["n_averaged"] == 2
    running = [k for k in best["model"] if k.endswith("running_mean")]
    assert running and any(not torch.equal(best["model"][k], last["swa"]["model"][k]) for k in running)  # update_bn

    done = json.loads((fold / "done.json").read_text())
    assert done["swa"] is True and done["n_averaged"] == 2 and done["best_epoch"] == 3
    assert best["epoch"] == 3 and best["score"] == done["best_score"]

    log = pd.read_csv(fold / "results.csv")
    assert log.lr.tolist()[1:] == pytest.approx([SWA_LR, SWA_LR])  # SWALR's constant lr in the SWA epochs
    assert log.lr.tolist()[0] != pytest.approx(SWA_LR)


@pytest.mark.slow
def test_a_fold_stopped_in_its_swa_epochs_resumes_to_the_same_weights(swa_run, prepared, tmp_path):
    from test_kill_classify import assert_same_tensors

    from siimcovid.classify.train import main

    whole, _ = swa_run
    cfg = lambda: tiny_cfg(prepared, tmp_path, name="whole", **SWA_RUN)  # noqa: E731
    fold = tmp_path / "whole" / "fold0"
    for epoch in (2, 3):  # after the first SWA epoch (one averaged), then after the last (before update_bn)
        with pytest.raises(Stop):
            main(cfg(), {"on_fit_epoch_end": stop_after(epoch)})
        assert load(fold / "last.pt")["epoch"] == epoch and not (fold / "done.json").exists()
        assert load(fold / "last.pt")["swa"]["n_averaged"] == epoch - 1
    main(cfg())
    for name in ("best.pt", "last.pt"):
        a, b = load(fold / name), load(whole / name)
        for key in ("model", "ema", "optimizer", "scheduler", "swa"):
            if key in b:
                assert_same_tensors(a[key], b[key], f"{name}:{key}")
    for name in ("done.json", "val_pred_image.csv"):
        assert (fold / name).read_bytes() == (whole / name).read_bytes(), name


# ---------------------------------------------------------------- a torchvision detector fold

TV_RUN = {"family": "torchvision", "arch": "fasterrcnn_mobilenet_v3_large_fpn", "pretrained": False, "imgsz": 64}
TV_RUN.update(batch=4, workers=0, device="cpu", fold=0, epochs=3, swa_epochs=2, swa_lr=0.005)


def tv_cfg(prepared, project, **kw):
    return load_config("detect", {**TV_RUN, "data": str(prepared), "project": str(project), **kw})


def record_last(seen: list):
    """on_fit_epoch_end: the model of each epoch's last.pt (written just before)."""

    def fn(view, row):
        seen.append(load(view.dir / "last.pt")["model"])

    return fn


@pytest.fixture(scope="module")
def tv_run(prepared_small, tmp_path_factory):
    from siimcovid.detect.train import train

    project, seen = tmp_path_factory.mktemp("swa_tv"), []
    train(tv_cfg(prepared_small, project, name="whole"), {"on_fit_epoch_end": record_last(seen)})
    return project / "whole" / "fold0", seen


@pytest.mark.slow
def test_a_torchvision_fold_ends_with_the_mean_of_its_swa_epochs(tv_run):
    fold, seen = tv_run
    best, last = load(fold / "best.pt"), load(fold / "last.pt")
    names = [k for k, v in seen[0].items() if v.is_floating_point() and "running" not in k]
    assert len(seen) == 3 and names
    for name in names:
        assert torch.allclose(best["model"][name], (seen[1][name] + seen[2][name]) / 2, atol=1e-6), name
    assert any(not torch.equal(best["model"][k], seen[2][k]) for k in names)
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"]) and last.get("optimizer") is None
    running = [k for k in best["model"] if k.endswith("running_mean")]
    assert running and any(not torch.equal(best["model"][k], last["swa"]["model"][k]) for k in running)  # update_bn
    done = json.loads((fold / "done.json").read_text())
    assert done["swa"] is True and done["n_averaged"] == 2 and done["best_epoch"] == 3 == best["epoch"]
    log = pd.read_csv(fold / "results.csv")
    assert log.lr.tolist()[1:] == pytest.approx([0.005, 0.005]) and log.lr.tolist()[0] != pytest.approx(0.005)


@pytest.mark.slow
def test_a_torchvision_fold_stopped_in_its_swa_epochs_resumes_to_the_same_weights(tv_run, prepared_small, tmp_path):
    from siimcovid.detect.train import train

    whole, _ = tv_run
    fold = tmp_path / "whole" / "fold0"
    for epoch in (2, 3):
        with pytest.raises(Stop):
            train(tv_cfg(prepared_small, tmp_path, name="whole"), {"on_fit_epoch_end": stop_after(epoch)})
        assert load(fold / "last.pt")["swa"]["n_averaged"] == epoch - 1 and not (fold / "done.json").exists()
    train(tv_cfg(prepared_small, tmp_path, name="whole"))
    for name in ("best.pt", "last.pt"):
        a, b = load(fold / name)["model"], load(whole / name)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (fold / "done.json").read_bytes() == (whole / "done.json").read_bytes()


def test_a_torchvision_run_refuses_swa_epochs_of_every_epoch(prepared, tmp_path):
    from siimcovid.detect.train import train

    with pytest.raises(SiimError, match="the fold has 3 epochs"):
        train(tv_cfg(prepared, tmp_path, name="bad", swa_epochs=3))


# ---------------------------------------------------------------- a YOLO fold (Ultralytics)

YOLO_RUN = {"model": "yolov5n.yaml", "pretrained": False, "imgsz": 64, "batch": 8, "workers": 0, "device": "cpu"}
YOLO_RUN.update(plots=False, fold=0, epochs=3, swa_epochs=2, swa_lr=0.002)


def yolo_train(prepared, project, callbacks=None):
    from siimcovid.detect.common import ultralytics_keys
    from siimcovid.detect.train import train

    settings = {**YOLO_RUN, "data": str(prepared), "project": str(project), "name": "yolo", "warmup_epochs": 0}
    cfg = load_config("detect", settings, extra_ok=ultralytics_keys())  # no warmup: it would set the lr of every step
    return train(cfg, callbacks)


def record_raw(seen: dict):
    """on_train_epoch_end: Ultralytics' raw model's weights (not its EMA's) after each epoch's steps."""
    from ultralytics.utils.torch_utils import unwrap_model

    def fn(view):
        seen[view.epoch] = {k: v.detach().float().clone() for k, v in unwrap_model(view.model).state_dict().items()}

    return fn


def stop_at_save(epoch: int):
    def fn(view):
        if view.epoch == epoch:
            raise Stop(epoch)

    return fn


@pytest.mark.slow
def test_a_yolo_fold_stopped_in_its_swa_epochs_ends_with_the_mean_of_their_raw_weights(prepared, tmp_path):
    from siimcovid.detect.common import fold_state
    from siimcovid.detect.predict import main as predict

    seen, fold = {}, tmp_path / "yolo" / "fold0"
    with pytest.raises(Stop):  # after epoch 2's checkpoints (the first SWA epoch)
        yolo_train(prepared, tmp_path, {"on_train_epoch_end": record_raw(seen), "on_model_save": stop_at_save(2)})
    assert fold_state(fold) == "partial"
    partial = load(fold / "weights" / "last.pt")
    assert partial["swa"]["n_averaged"] == 1
    yolo_train(prepared, tmp_path, {"on_train_epoch_end": record_raw(seen)})  # resumes epoch 3
    assert fold_state(fold) == "done" and sorted(seen) == [1, 2, 3]

    best, last = (load(fold / "weights" / f"{n}.pt") for n in ("best", "last"))
    assert best["swa"] == last["swa"] == {"swa": True, "swa_epochs": 2, "n_averaged": 2}
    weights = best["model"].float().state_dict()
    names = [n for n, _ in best["model"].named_parameters()]
    for name in names:  # the mean of epochs 2 and 3 (epoch 2's from before the stop), as Ultralytics stores it: fp16
        mean = ((seen[2][name] + seen[3][name]) / 2).half().float()
        assert torch.allclose(weights[name], mean, atol=1e-3, rtol=1e-3), name
    assert any(not torch.allclose(weights[n], seen[3][n].half().float()) for n in names)
    last_weights = last["model"].float().state_dict()
    assert all(torch.equal(weights[k], last_weights[k]) for k in weights)
    log = pd.read_csv(fold / "results.csv")
    log.columns = [c.strip() for c in log.columns]
    assert log["lr/pg0"].tolist()[1:] == pytest.approx([0.002, 0.002])

    predict(load_config("detect", {"run": str(tmp_path / "yolo"), "split": ["oof"], "device": "cpu", "tta": False}))
    assert list(tmp_path.glob("yolo/pred_oof*.csv"))  # Ultralytics' format: detect predict reads the SWA weights


def test_a_yolo_run_refuses_swa_epochs_of_every_epoch_and_ultralytics_ddp(prepared, tmp_path):
    from siimcovid.detect.train import train

    base = {**YOLO_RUN, "data": str(prepared), "project": str(tmp_path), "name": "bad"}
    with pytest.raises(SiimError, match="the fold has 3 epochs"):
        train(load_config("detect", {**base, "swa_epochs": 3}))
    with pytest.raises(SiimError, match="swa_epochs > 0 trains on one device"):
        train(load_config("detect", {**base, "device": "0,1"}))
