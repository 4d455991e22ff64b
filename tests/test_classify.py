"""The classify stage on CPU: a tiny timm model (test_efficientnet, 0.1M params) on 64 px synthetic data.

Every test that trains a model (or reads the module's trained run) is marked slow.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

torch = pytest.importorskip("torch")

from siimcovid import cli  # noqa: E402
from siimcovid.classify import predict as P  # noqa: E402
from siimcovid.config import load_config  # noqa: E402
from siimcovid.data.prepared import Prepared  # noqa: E402
from siimcovid.rundir import read_run  # noqa: E402
from siimcovid.tables import CLASSIFIER_IMAGES, CLASSIFIER_STUDIES, SCORES, STUDY_CLASSES  # noqa: E402
from siimcovid.utils import SiimError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": "test_efficientnet",
    "pretrained": False,
    "imgsz": 64,
    "batch": 8,
    "workers": 0,
    "device": "cpu",
    "drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "warmup_epochs": 1,
}

# timm's smallest EfficientNet with the heads the stage builds
TINY_MODEL = {"model": "test_efficientnet", "in_chans": 3, "drop_rate": 0.0, "drop_path_rate": 0.0}
TINY_MODEL.update(mask_stride=16, none_head=True)


def tiny_cfg(prepared, project, **kw):
    return load_config("classify", {**TINY, "data": str(prepared), "project": str(project), **kw})


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """Fold 0 trained for 2 epochs + a 1-epoch second wave: shared by the tests that read a run."""
    from siimcovid.classify.train import main

    project = tmp_path_factory.mktemp("classify_runs")
    cfg = tiny_cfg(prepared, project, name="tiny", fold=0, epochs=2, fine_lr=[1e-4], fine_epochs=1)
    results = main(cfg)
    return project / "tiny", results


def fixed_batch(prepared, n=8):
    from siimcovid.classify.data import StudyDataset, image_table

    prep = Prepared(prepared)
    table = image_table(prep, "train", 0, "train").iloc[:n].reset_index(drop=True)
    ds = StudyDataset(prep, table, 64)
    items = [ds[i] for i in range(len(ds))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ---------------------------------------------------------------- model and loss


@pytest.mark.slow
def test_train_step_reduces_loss_on_fixed_batch(prepared):
    from timm.optim import create_optimizer_v2

    from siimcovid.classify.data import to_device
    from siimcovid.classify.model import StudyLoss, build_model

    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    loss_fn = StudyLoss(mask_weight=4.0, mask_bce=0.6, mask_dice=0.4, none_weight=1.0)
    opt = create_optimizer_v2(model, opt="adamw", lr=3e-3, weight_decay=0.0)
    b = to_device(fixed_batch(prepared), torch.device("cpu"))
    model.train()
    history = []
    for _ in range(25):
        parts = loss_fn(model(b["image"]), b["label"], b["none"], b["mask"])
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.7 * first["loss"]
    assert last["cls"] < first["cls"] and last["mask"] < first["mask"] and last["none"] < first["none"]


def test_pretrained_file_loads_local_weights(tmp_path):
    import timm

    from siimcovid.classify.model import build_model

    ref = timm.create_model("test_efficientnet", num_classes=1000)
    torch.save(ref.state_dict(), tmp_path / "weights.pth")
    net = build_model(TINY_MODEL, pretrained_file=str(tmp_path / "weights.pth"))
    assert torch.equal(net.backbone.conv_stem.weight, ref.conv_stem.weight)
    assert torch.equal(net.backbone.blocks[-1][0].conv_pw.weight, ref.blocks[-1][0].conv_pw.weight)
    # in_chans=1: timm folds the RGB stem into one channel (sum over RGB)
    grey = build_model({**TINY_MODEL, "in_chans": 1}, pretrained_file=str(tmp_path / "weights.pth"))
    assert torch.allclose(grey.backbone.conv_stem.weight[:, 0], ref.conv_stem.weight.sum(1))
    out = grey(torch.rand(2, 1, 64, 64))
    assert out["study"].shape == (2, 4) and out["none"].shape == (2,) and out["mask"].shape == (2, 1, 4, 4)


def test_mask_target_and_loss_for_known_box():
    import torch.nn.functional as F

    from siimcovid.classify.model import StudyLoss, mask_target

    # A 64 px mask with the box x 8..40, y 16..48 filled; the head sees a 4x4 grid of 16 px cells.
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    mask[..., 16:48, 8:40] = 255
    expected = torch.tensor([[0, 0, 0, 0], [0.5, 1, 0.5, 0], [0.5, 1, 0.5, 0], [0, 0, 0, 0]], dtype=torch.float32)
    target = mask_target(mask, (4, 4))
    assert torch.allclose(target[0, 0], expected)
    # The loss compares the mask logits with exactly that target.
    logits = torch.randn(1, 1, 4, 4)
    out = {"study": torch.zeros(1, 4), "none": torch.zeros(1), "mask": logits}
    parts = StudyLoss(mask_weight=1.0, mask_bce=1.0, mask_dice=0.0)(out, torch.tensor([1]), torch.tensor([0.0]), mask)
    assert float(parts["mask"]) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits[0, 0], expected)), rel=1e-5)


def test_dataset_mask_matches_the_box_and_follows_the_flip(prepared):
    import albumentations as A

    from siimcovid.classify.data import StudyDataset, image_table

    prep = Prepared(prepared)
    table = image_table(prep, "train")
    meta = prep.split("train").set_index("image_id")
    i = next(k for k, r in table.iterrows() if meta.loc[r.image_id, "n_boxes"] == 1)
    row = meta.loc[table.image_id[i]]
    (x1, y1, x2, y2), sx, sy = row.boxes[0], 64 / row.cols, 64 / row.rows
    plain = StudyDataset(prep, table, 64)[i]
    m = plain["mask"][0].numpy()
    # Inside the box (one pixel in from its edges) the mask is set; outside (one pixel out) it is not.
    inside = m[int(np.ceil(y1 * sy)) + 1 : int(y2 * sy) - 1, int(np.ceil(x1 * sx)) + 1 : int(x2 * sx) - 1]
    assert inside.size > 0 and (inside == 255).all()
    outside = m.copy()
    outside[max(int(y1 * sy) - 1, 0) : int(np.ceil(y2 * sy)) + 1, max(int(x1 * sx) - 1, 0) : int(np.ceil(x2 * sx)) + 1] = 0
    assert (outside == 0).all()
    assert plain["none"] == 0.0 and plain["label"] == STUDY_CLASSES.index(row.study_label)
    flipped = StudyDataset(prep, table, 64, augment=A.Compose([A.HorizontalFlip(p=1.0)]))[i]
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))


def test_mix_batch_moves_masks_with_the_pixels():
    from siimcovid.classify.data import mix_batch

    img = torch.stack([torch.zeros(1, 32, 32), torch.ones(1, 32, 32)])  # image 0 black, image 1 white
    mask = torch.stack([torch.zeros(1, 32, 32), torch.full((1, 32, 32), 255.0)])
    batch = {"image": img, "mask": mask, "label": torch.tensor([0, 2]), "none": torch.tensor([1.0, 0.0])}
    rng = np.random.default_rng(3)
    cut = mix_batch(batch, 4, mixup_alpha=0.0, cutmix_alpha=1.0, rng=rng)
    # cutmix: the pasted rectangle brings its mask; image 0 got white pixels exactly where its mask is 255.
    assert torch.equal(cut["mask"] == 255, cut["image"] == 1)
    area = float((cut["image"][0] == 1).float().mean())
    assert 0 < area < 1
    assert torch.allclose(cut["label"][0], torch.tensor([1 - area, 0, area, 0]), atol=1e-6)
    assert float(cut["none"][0]) == pytest.approx(1 - area)
    again = mix_batch(batch, 4, mixup_alpha=0.0, cutmix_alpha=1.0, rng=np.random.default_rng(3))
    assert torch.equal(again["image"], cut["image"])  # the rectangle comes from the run's seeded generator
    mix = mix_batch(batch, 4, mixup_alpha=0.4, cutmix_alpha=0.0, rng=rng)
    lam = mix["lam"]
    assert torch.allclose(mix["image"][0], torch.full((1, 32, 32), 1 - lam))
    assert torch.allclose(mix["mask"][0], torch.full((1, 32, 32), 255 * (1 - lam)))


def test_mixup_stops_for_the_last_mixup_off_epochs_of_the_fold_across_its_waves(prepared, tmp_path):
    from siimcovid.classify.train import check_config, mixes

    cfg = tiny_cfg(prepared, tmp_path, mixup=0.5, epochs=3, fine_lr=[1e-4], fine_epochs=2, mixup_off_epochs=2)
    assert [mixes(cfg, e) for e in range(1, 6)] == [True, True, True, False, False]  # epochs 4-5: the second wave
    assert [mixes(tiny_cfg(prepared, tmp_path, mixup=0.5, epochs=3, fine_lr=[]), e) for e in (1, 3)] == [True, True]
    assert not mixes(tiny_cfg(prepared, tmp_path, mixup=0.0, epochs=3), 1)
    with pytest.raises(SiimError, match="mixup_off_epochs=5: the fold has 5 epochs, so none would mix"):
        check_config(tiny_cfg(prepared, tmp_path, mixup=0.5, epochs=3, fine_lr=[1e-4], fine_epochs=2, mixup_off_epochs=5))


@pytest.mark.slow
def test_a_training_mixes_no_batch_in_its_mixup_off_epochs(prepared, tmp_path, monkeypatch):
    from siimcovid.classify import train as T

    mixed, epoch_now = [], [0]  # the epoch of each mixed batch
    real, start = T.mix_batch, T.FoldTrainer.train_one_epoch

    def counting(batch, *args, **kw):
        mixed.append(epoch_now[0])
        return real(batch, *args, **kw)

    def remember(self, epoch, *a, **kw):
        epoch_now[0] = epoch
        return start(self, epoch, *a, **kw)

    monkeypatch.setattr(T, "mix_batch", counting)

    monkeypatch.setattr(T.FoldTrainer, "train_one_epoch", remember)
    T.main(tiny_cfg(prepared, tmp_path, name="m", fold=0, epochs=3, fine_lr=[], mixup=1.0, mixup_off_epochs=1))
    assert mixed and set(mixed) == {1, 2}  # every batch of epochs 1-2 mixed (mixup=1), none of epoch 3


@pytest.mark.slow
def test_freeze_epochs_train_the_heads_only_then_everything(prepared, tmp_path, monkeypatch):
    from siimcovid.classify import train as T

    states, start = {}, T.FoldTrainer.train_one_epoch

    def snapshot(self, epoch, *a, **kw):  # the model's tensors before and after each epoch
        states[epoch, "before"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        out = start(self, epoch, *a, **kw)
        states[epoch, "after"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return out

    monkeypatch.setattr(T.FoldTrainer, "train_one_epoch", snapshot)
    T.main(tiny_cfg(prepared, tmp_path, name="f", fold=0, epochs=2, fine_lr=[], freeze_epochs=1))

    def changed(epoch, part):
        a, b = states[epoch, "before"], states[epoch, "after"]
        return [k for k in a if k.startswith(part) and a[k].is_floating_point() and not torch.equal(a[k], b[k])]

    assert changed(1, "backbone.") == []  # weights and batch-norm statistics as they were
    assert changed(1, "study_head.") and changed(1, "mask_head.")
    assert changed(2, "backbone.")  # from epoch 2 the backbone trains
    with pytest.raises(SiimError, match="freeze_epochs=2: the fold has 2 epochs"):
        T.check_config(tiny_cfg(prepared, tmp_path, epochs=2, fine_lr=[], freeze_epochs=2))


# ---------------------------------------------------------------- training runs


@pytest.mark.slow
def test_one_fold_writes_checkpoints_log_and_oof(trained, prepared):
    run, results = trained
    fold = run / "fold0"
    for f in ("best.pt", "last.pt", "results.csv", "results.png", "val_pred_image.csv", "done.json", "classify.yaml"):
        assert (fold / f).is_file(), f
    assert (run / "classify.yaml").is_file()
    log = pd.read_csv(fold / "results.csv")
    assert log.epoch.tolist() == [1, 2, 3] and log.wave.tolist() == [0, 0, 1]
    assert np.isfinite(log[["train_loss", "val_loss", "val_map"]].to_numpy()).all()
    best = torch.load(fold / "best.pt", weights_only=False)
    assert best["score"] == pytest.approx(log.val_map.max(), abs=1e-5)
    assert log.loc[log.best, "epoch"].iloc[-1] == best["epoch"] == results[0]["best_epoch"]
    oof = pd.read_csv(fold / "val_pred_image.csv", dtype={"image_id": str})
    val_ids = set(Prepared(prepared).fold(0, "val").image_id)
    assert set(oof.image_id) == val_ids and len(oof) == len(val_ids)
    assert np.allclose(oof[STUDY_CLASSES].sum(axis=1), 1, atol=1e-4)
    # The saved OOF predictions score exactly what the log says the best epoch scored.
    assert P.study_map(Prepared(prepared), oof) == pytest.approx(best["score"], abs=1e-5)


@pytest.mark.slow
def test_finished_fold_is_skipped(trained, prepared, monkeypatch):
    from siimcovid.classify import train as T

    run, _ = trained
    before = (run / "fold0" / "best.pt").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("a finished fold must not be trained again")

    monkeypatch.setattr(T.FoldTrainer, "__init__", boom)
    out = T.main(tiny_cfg(prepared, run.parent, name="tiny", fold=0, epochs=2, fine_lr=[1e-4], fine_epochs=1))
    assert out[0]["best_epoch"] >= 1 and (run / "fold0" / "best.pt").stat().st_mtime_ns == before


@pytest.mark.slow
def test_saved_run_config_seeds_the_next_run(trained):
    run, _ = trained
    _, cfg = cli.stage_function("classify", "train", {"cfg": str(run / "classify.yaml"), "fold": 1})
    assert cfg.model == "test_efficientnet" and cfg.imgsz == 64 and cfg.fine_epochs == 1 and cfg.fold == 1
    assert cfg.mode == "train" and "folds_id" not in cfg


@pytest.mark.slow
def test_same_seed_same_run_other_seed_other_run(prepared, tmp_path):
    # augmentation (albumentations keeps its own generator), dropout and shuffling all follow `seed`
    from siimcovid.classify.train import main

    def train(name, seed):
        main(tiny_cfg(prepared, tmp_path, name=name, fold=2, epochs=1, fine_epochs=0, drop_rate=0.3, seed=seed, affine=1.0))
        log = pd.read_csv(tmp_path / name / "fold2" / "results.csv")
        weights = torch.load(tmp_path / name / "fold2" / "last.pt", weights_only=False)["model"]
        return log[["train_loss", "val_loss", "val_map"]], weights

    log_a, w_a = train("a", 7)
    log_b, w_b = train("b", 7)
    log_c, _ = train("c", 8)
    pd.testing.assert_frame_equal(log_a, log_b)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert log_c.train_loss[0] != log_a.train_loss[0]


def test_dataloader_workers_draw_different_augmentations(prepared):
    from torch.utils.data import DataLoader

    from siimcovid.classify.data import StudyDataset, build_augment, image_table, seed_worker

    cfg = tiny_cfg(prepared, "unused", hflip=0.0, affine=1.0, brightness_contrast=0.0)
    table = image_table(Prepared(prepared), "train", 0, "train").iloc[[0]]
    ds = StudyDataset(Prepared(prepared), table, 64, build_augment(cfg, seed=3))
    same_item = torch.utils.data.Subset(ds, [0, 0, 0, 0])  # worker k gets item k: one image, four draws

    def draws(**kw):
        loader = DataLoader(same_item, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0), **kw)
        return [batch["image"] for batch in loader]

    plain = draws()
    assert torch.equal(plain[0], plain[1])  # what forked workers do alone: the same draw in both
    seeded = draws(worker_init_fn=seed_worker)
    assert not torch.equal(seeded[0], seeded[1])
    assert all(torch.equal(x, y) for x, y in zip(seeded, draws(worker_init_fn=seed_worker)))  # and repeatable


@pytest.mark.slow
def test_resume_continues_from_the_last_epoch(prepared, tmp_path, monkeypatch):
    from siimcovid.classify import train as T

    cfg = dict(name="resume", fold=1, epochs=2, fine_lr=[1e-4], fine_epochs=1)
    real, seen = T.FoldTrainer.train_one_epoch, []

    def interrupted(self, epoch, *a, **k):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(self, epoch, *a, **k)

    monkeypatch.setattr(T.FoldTrainer, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.main(tiny_cfg(prepared, tmp_path, **cfg))
    fold = tmp_path / "resume" / "fold1"
    assert torch.load(fold / "last.pt", weights_only=False)["epoch"] == 1 and not (fold / "done.json").exists()

    saved = torch.load(fold / "last.pt", weights_only=False)

    def recording(self, epoch, *a, **k):
        if not seen:  # the resumed fold starts from the saved weights and optimizer state, not from scratch
            assert all(torch.equal(v, saved["model"][n]) for n, v in self.model.state_dict().items())
            assert a[0].state_dict()["state"].keys() == saved["optimizer"]["state"].keys()
        seen.append(epoch)
        return real(self, epoch, *a, **k)

    monkeypatch.setattr(T.FoldTrainer, "train_one_epoch", recording)
    T.main(tiny_cfg(prepared, tmp_path, **cfg))
    assert seen == [2, 3]
    log = pd.read_csv(fold / "results.csv")
    assert log.epoch.tolist() == [1, 2, 3] and (fold / "done.json").is_file()


@pytest.mark.slow
def test_ddp_two_gloo_processes_same_layout(trained, prepared_small, tmp_path):
    run, _ = trained
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [f"{k}={v}" for k, v in {**TINY, "batch": 4}.items()] + [  # the small set: 7 training images
        f"data={prepared_small}",
        f"project={tmp_path}",
        "name=ddp",
        "fold=0",
        "epochs=2",
        "fine_lr=1e-4",
        "fine_epochs=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "siimcovid",
        "classify",
        "train",
        *args,
    ]
    # Own session: on a timeout the whole group (torchrun and its two workers) is killed, no orphans.
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"torchrun with 2 gloo processes did not finish in 300 s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    fold = tmp_path / "ddp" / "fold0"
    def files(folder):
        return sorted("tensorboard" if p.name.startswith("events.out.tfevents.") else p.name for p in folder.iterdir())

    assert files(fold) == files(run / "fold0")  # rank 0 alone writes, the TensorBoard events too (one file)
    log = pd.read_csv(fold / "results.csv")
    assert log.epoch.tolist() == [1, 2, 3]
    # The validation predictions of both ranks were gathered: every held-out image exactly once.
    oof = pd.read_csv(fold / "val_pred_image.csv", dtype={"image_id": str})
    assert sorted(oof.image_id) == sorted(Prepared(prepared_small).fold(0, "val").image_id)


# ---------------------------------------------------------------- trainer hooks


def test_unknown_event_and_clashing_loss_term_are_clear_errors():
    from siimcovid.classify import train as T

    assert T.default_callbacks()["is_better"] == [T.study_map_improved]
    trainer = T.FoldTrainer.__new__(T.FoldTrainer)  # the hook mechanics only: no data, no model
    trainer.callbacks = T.default_callbacks()
    with pytest.raises(SiimError, match="unknown training event 'on_epoch_end'"):
        trainer.add_callback("on_epoch_end", print)
    trainer.add_callback("on_loss", lambda t, out, batch, parts: {"mask": parts["loss"] * 0})
    with pytest.raises(SiimError, match="already has a term 'mask'"):
        trainer.add_extra_losses({}, {}, {"loss": torch.tensor(1.0), "mask": torch.tensor(0.5)})
    best = {"score": 0.5, "epoch": 1, "wave": 0}
    trainer.best = best
    assert trainer.is_better({"val_map": 0.6}) and not trainer.is_better({"val_map": 0.5})
    assert not trainer.is_better({"val_map": float("nan")})  # the default rule, as before hooks
    trainer.add_callback("is_better", lambda t, stats, b: stats["val_loss"] < 1.0)  # the last one added decides
    assert trainer.is_better({"val_map": 0.0, "val_loss": 0.5})


def test_backward_step_without_a_scaler_is_the_former_disabled_gradscaler_step():
    """On CPU (and with bf16) there is no fp16 scaler: plain backward, timm's clip, step, bit for bit as before."""
    from timm.optim import create_optimizer_v2

    from siimcovid.classify import train as T
    from siimcovid.classify.model import StudyLoss, build_model

    def one_step(new: bool):
        torch.manual_seed(0)
        model = build_model(TINY_MODEL)
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.01)
        x = torch.rand(4, 1, 64, 64)
        parts = StudyLoss()(model(x), torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 0, 0, 1]), torch.zeros(4, 1, 64, 64))
        if new:
            trainer = T.FoldTrainer.__new__(T.FoldTrainer)
            trainer.cfg, trainer.model, trainer.scaler = load_config("classify", {"clip_grad": 0.05}), model, None
            trainer.backward_step(parts["loss"], opt)
        else:
            scaler = torch.amp.GradScaler("cuda", enabled=False)
            scaler.scale(parts["loss"]).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
        return model.state_dict()

    old, new = one_step(False), one_step(True)
    assert all(torch.equal(old[k], new[k]) for k in old)


@pytest.fixture(scope="module")
def hooked(prepared, tmp_path_factory):
    """Fold 1 trained (2 epochs + a 1-epoch wave) with an extra loss term, an epoch-end hook and a checkpoint rule."""
    from siimcovid.classify.train import main

    calls = {"end": [], "rule": []}

    def l2(trainer, out, batch, parts):
        return {"l2": 0.01 * out["study"].float().pow(2).mean()}

    def at_end(trainer, row):
        calls["end"].append(dict(row))

    def third_epoch_only(trainer, stats, best):
        calls["rule"].append((dict(stats), dict(best)))
        return len(trainer.rows) == 2  # rows holds the epochs before this one

    project = tmp_path_factory.mktemp("classify_hooks")
    cfg = tiny_cfg(prepared, project, name="hooks", fold=1, epochs=2, fine_lr=[1e-4], fine_epochs=1)
    results = main(cfg, callbacks={"on_loss": l2, "on_fit_epoch_end": [at_end], "is_better": third_epoch_only})
    return project / "hooks" / "fold1", results, calls


@pytest.mark.slow
def test_extra_loss_term_is_added_to_the_loss_and_logged(hooked):
    fold, _, _ = hooked
    log = pd.read_csv(fold / "results.csv")
    assert list(log.columns[-1:]) == ["train_l2"] and (log.train_l2 > 0).all()
    # StudyLoss alone is cls + none_weight * none + mask_weight * mask; the hook's term comes on top
    builtin = log.train_cls + 1.0 * log.train_none + 4.0 * log.train_mask
    np.testing.assert_allclose(log.train_loss, builtin + log.train_l2, rtol=1e-4)
    assert (log.train_loss - builtin > 1e-4).all()


@pytest.mark.slow
def test_epoch_end_hook_sees_each_epoch_once_with_its_stats(hooked):
    fold, _, calls = hooked
    log = pd.read_csv(fold / "results.csv")
    assert [r["epoch"] for r in calls["end"]] == [1, 2, 3]
    for row, (_, logged) in zip(calls["end"], log.iterrows()):
        assert row["val_map"] == pytest.approx(logged.val_map, abs=1e-5) and row["best"] == logged.best
        assert row["train_l2"] == pytest.approx(logged.train_l2, rel=1e-4)


@pytest.mark.slow
def test_checkpoint_rule_decides_which_epoch_best_pt_holds(hooked):
    fold, results, calls = hooked
    log = pd.read_csv(fold / "results.csv")
    # epoch 1 is always kept (later waves restart from it); then only the rule's choice, epoch 3
    assert log.best.tolist() == [True, False, True]
    best = torch.load(fold / "best.pt", weights_only=False)
    assert best["epoch"] == results[1]["best_epoch"] == 3
    assert best["score"] == pytest.approx(log.val_map[2], abs=1e-5)
    assert [b["epoch"] for _, b in calls["rule"]] == [0, 1, 1]  # the best so far, as the rule saw it
    assert all({"val_map", "val_loss", "train_loss", "train_l2"} <= set(stats) for stats, _ in calls["rule"])
    oof = pd.read_csv(fold / "val_pred_image.csv", dtype={"image_id": str})  # written with the chosen checkpoint
    assert P.study_map(Prepared(best_data(fold)), oof) == pytest.approx(best["score"], abs=1e-5)


def best_data(fold):
    return read_run(fold / "classify.yaml")["data"]


@pytest.mark.slow
def test_extra_training_data_reaches_the_loader(prepared, tmp_path):
    from torch.utils.data import ConcatDataset, Dataset

    from siimcovid.classify.data import StudyDataset, image_table
    from siimcovid.classify.train import main

    class Spy(Dataset):
        """Extra images (here: fold 0's held-out images, as pseudo-labels would be) that record each fetch."""

        def __init__(self, dataset):
            self.dataset, self.fetched = dataset, []

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, i):
            self.fetched.append(i)
            return self.dataset[i]

    prep = Prepared(prepared)
    spy = Spy(StudyDataset(prep, image_table(prep, "train", 0, "val"), 64))
    seen = []

    def more_data(trainer):
        seen.append(len(trainer.train_dataset))
        trainer.train_dataset = ConcatDataset([trainer.train_dataset, spy])

    def steps(trainer, row):
        seen.append(len(trainer.train_loader))

    main(tiny_cfg(prepared, tmp_path, name="more", fold=1, epochs=1, fine_epochs=0),
         callbacks={"on_train_data": more_data, "on_fit_epoch_end": steps})  # fmt: skip
    n_train = len(prep.fold(1, "train"))
    assert seen == [n_train, (n_train + len(spy)) // 8]  # batch 8, the last partial batch dropped
    assert len(spy.fetched) > 0 and set(spy.fetched) <= set(range(len(spy)))
    assert len(spy.fetched) == len(set(spy.fetched))  # one epoch: each extra image at most once


def test_oof_scores_equal_the_per_fold_study_map_and_none_ap(prepared):
    """scores_oof.csv (metrics.fold_scores) gives the study mAP and AP(none) of the former per-fold scoring."""
    from siimcovid import metrics
    from siimcovid.data import truth

    prep = Prepared(prepared)
    meta = prep.split("train")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), len(meta))
    images = pd.DataFrame({"model": "m", "image_id": meta.image_id, "study_id": meta.study_id, "fold": meta.fold})
    images[STUDY_CLASSES] = probs
    images["none"] = rng.random(len(meta))
    studies = P.study_table(images)
    table = P.oof_scores(prep, images, studies).set_index("fold")
    assert table.index.tolist() == ["all", "0", "1", "2"]
    for fold in table.index:  # the former score_oof: per fold, study truth and image truth of the fold's images
        im = images if fold == "all" else images[images.fold == int(fold)]
        st = studies if fold == "all" else studies[studies.fold == int(fold)]
        rows = truth.oof_images(prep.root, im.image_id)
        study = metrics.score(truth.study_truth(rows), metrics.study_pred(st[["study_id"] + STUDY_CLASSES]))
        none = metrics.score(truth.image_truth(rows), metrics.image_pred(None, im[["image_id", "none"]]), classes=["none"])
        assert table.loc[fold, "study_map"] == pytest.approx(study.study_map, abs=1e-12)
        assert table.loc[fold, "none"] == pytest.approx(none.ap["none"], abs=1e-12)
        assert [table.loc[fold, c] for c in STUDY_CLASSES] == pytest.approx([study.ap[c] for c in STUDY_CLASSES], abs=1e-12)
        assert table.loc[fold, "n_studies"] == len(st) and table.loc[fold, "n_images"] == len(im)


# ---------------------------------------------------------------- predict, aggregation, ensembles


@pytest.mark.slow
def test_predict_writes_oof_and_test_tables(trained, prepared):
    from siimcovid.classify.predict import main

    run, _ = trained
    cfg = load_config(
        "classify", {"run": str(run), "split": ["oof", "test"], "tta": True, "workers": 0, "device": "cpu", "batch": 8}
    )
    main(cfg)
    prep = Prepared(prepared)
    oof_img, oof_st = P.read_tables(run, "oof")
    assert list(oof_img.columns) == CLASSIFIER_IMAGES.names and list(oof_st.columns) == CLASSIFIER_STUDIES.names
    assert sorted(oof_img.image_id) == sorted(prep.fold(0, "val").image_id) and (oof_img.fold == 0).all()
    test_img, test_st = P.read_tables(run, "test")
    assert sorted(test_img.image_id) == sorted(prep.split("test").image_id) and (test_img.fold == -1).all()
    assert sorted(test_st.study_id) == sorted(prep.split("test").study_id.unique())
    assert np.allclose(test_st[STUDY_CLASSES].sum(axis=1), 1, atol=1e-4)
    assert ((test_img.none >= 0) & (test_img.none <= 1)).all() and (test_img.model == "tiny").all()
    score = SCORES.read(run / "scores_oof.csv")
    assert score.fold.tolist() == ["all", "0"] and (score.tta == "hflip").all() and (score.weights == "best").all()
    assert list(score.columns) == [c for c in SCORES.names if c not in ("opacity", "lung")]  # lung: a lung detector's
    assert score.study_map[0] == pytest.approx(score.loc[0, STUDY_CLASSES].mean(), abs=1e-5)
    assert score.study_map[0] == pytest.approx(P.study_map(prep, oof_img), abs=1e-5)


def test_hflip_tta_averages_the_image_and_its_mirror():
    from torch.utils.data import DataLoader

    class LeftRight(torch.nn.Module):
        """Study logits = (mean of the left half, mean of the right half, 0, 0)."""

        def forward(self, x):
            w = x.shape[-1] // 2
            left, right = x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))
            z = torch.zeros_like(left)
            return {"study": torch.stack([left, right, z, z], 1) * 10, "none": left * 0, "mask": x[:, :, :2, :2]}

    img = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    img[:, :, :, :4] = 255  # bright left half
    items = [
        {"image": img[i], "mask": img[i], "label": torch.tensor(0), "none": torch.tensor(0.0), "index": torch.tensor(i)}
        for i in range(2)
    ]
    loader = DataLoader(items, batch_size=2)
    _, plain, _, _ = P.infer(LeftRight(), loader, torch.device("cpu"), tta=False)
    _, tta, _, _ = P.infer(LeftRight(), loader, torch.device("cpu"), tta=True)
    with pytest.raises(SiimError, match=r"tta='mirror': tta is one of none, hflip, vflip, d4"):
        P.infer(LeftRight(), loader, torch.device("cpu"), tta="mirror")
    assert plain[0, 0] > 0.9 and plain[0, 1] < 0.1
    assert tta[0, 0] == pytest.approx(tta[0, 1]) and tta[0, 0] == pytest.approx((plain[0, 0] + plain[0, 1]) / 2)


def test_study_aggregation_is_the_mean_over_the_study_images():
    images = pd.DataFrame(
        {
            "model": "m",
            "image_id": ["a", "b", "c"],
            "study_id": ["s1", "s1", "s2"],
            "fold": [0, 0, 1],
            "negative": [0.1, 0.3, 0.7],
            "typical": [0.6, 0.4, 0.1],
            "indeterminate": [0.2, 0.2, 0.1],
            "atypical": [0.1, 0.1, 0.1],
            "none": [0.0, 1.0, 0.5],
        }
    )
    st = P.study_table(images).set_index("study_id")
    assert st.loc["s1", "negative"] == pytest.approx(0.2) and st.loc["s1", "typical"] == pytest.approx(0.5)
    assert st.loc["s1", "none"] == pytest.approx(0.5) and st.loc["s1", "n_images"] == 2 and st.loc["s1", "fold"] == 0
    assert st.loc["s2", "negative"] == pytest.approx(0.7) and st.loc["s2", "n_images"] == 1 and st.loc["s2", "fold"] == 1


def test_combine_mean_geomean_rank():
    def table(model, neg):
        return pd.DataFrame(
            {
                "model": model,
                "study_id": ["s1", "s2", "s3"],
                "fold": 0,
                "n_images": 1,
                "negative": neg,
                "typical": 0.5,
                "indeterminate": 0.25,
                "atypical": 0.25,
                "none": neg,
            }
        )

    a, b = table("a", [0.1, 0.4, 0.9]), table("b", [0.9, 0.1, 0.4]).iloc[::-1]  # order must not matter
    mean = P.combine([a, b], "mean").set_index("study_id")
    assert mean.loc["s1", "negative"] == pytest.approx(0.5) and mean.loc["s2", "negative"] == pytest.approx(0.25)
    assert (mean.model == "a+b").all()
    geo = P.combine([a, b], "geomean").set_index("study_id")
    assert geo.loc["s1", "negative"] == pytest.approx(0.3) and geo.loc["s3", "negative"] == pytest.approx(0.6)
    rank = P.combine([a, b], "rank").set_index("study_id")
    # ranks in a: s1 1/3, s2 2/3, s3 1; in b: s1 1, s2 1/3, s3 2/3
    assert rank.negative.to_dict() == pytest.approx({"s1": 2 / 3, "s2": 0.5, "s3": 5 / 6})
    assert P.combine([a, b], "mean", weights=[3, 1]).set_index("study_id").loc["s1", "negative"] == pytest.approx(0.3)
    with pytest.raises(SiimError, match="same study_id"):
        P.combine([a, table("c", [0.1, 0.2, 0.3]).assign(study_id=["s1", "s2", "x"])], "mean")
    with pytest.raises(SiimError, match="ensemble method 'vote'"):  # siimcovid.ensemble's own check
        P.combine([a, b], "vote")


@pytest.mark.slow
def test_predict_ensemble_of_two_runs(trained, tmp_path):
    from siimcovid.classify.predict import main

    run, _ = trained
    other = tmp_path / "tiny2"
    shutil.copytree(run, other)
    cfg = load_config(
        "classify",
        {
            "run": [str(run), str(other)],
            "split": "oof",
            "tta": False,
            "workers": 0,
            "device": "cpu",
            "ensemble": "geomean",
            "out": str(tmp_path / "ens"),
        },
    )
    main(cfg)
    ens_img, ens_st = P.read_tables(tmp_path / "ens", "oof")
    one_img, one_st = P.read_tables(run, "oof")
    # Two identical members: the geometric mean is the member itself.
    merged = ens_st.merge(one_st, on="study_id", suffixes=("", "_1"))
    assert len(merged) == len(one_st) and np.allclose(merged.negative, merged.negative_1, atol=1e-5)
    assert (ens_st.model == "tiny+tiny2").all() and (tmp_path / "ens" / "scores_oof.csv").is_file()
    # another ensemble into the same folder: the first one's OOF tables must not stay beside its test tables
    main(load_config("classify", {**cfg, "split": "test", "ensemble": "mean"}))
    assert sorted(p.name for p in (tmp_path / "ens").glob("pred_*.csv")) == ["pred_test_image.csv", "pred_test_study.csv"]
    assert yaml.safe_load((tmp_path / "ens" / "ensemble.yaml").read_text())["ensemble"] == "mean"


# ---------------------------------------------------------------- clear errors


def run_cli(*args):
    from siimcovid.cli import main

    return main(["classify", *args])


def test_unknown_model_name(prepared, tmp_path):
    with pytest.raises(SiimError, match="unknown timm model 'efficientnet_b33'.*efficientnet_b3"):
        run_cli("train", f"data={prepared}", f"project={tmp_path}", "imgsz=64", "model=efficientnet_b33", "pretrained=false")


def test_unknown_optimizer(prepared, tmp_path):
    with pytest.raises(SiimError, match="optimizer=madgard: not a timm optimizer; did you mean madgrad"):
        run_cli("train", f"data={prepared}", f"project={tmp_path}", "imgsz=64", "model=test_efficientnet", "optimizer=madgard")
    assert not any(tmp_path.iterdir())


def test_missing_fold_and_size(prepared, tmp_path):
    with pytest.raises(SiimError, match="fold 5 does not exist"):
        run_cli("train", f"data={prepared}", f"project={tmp_path}", "imgsz=64", "fold=5", "model=test_efficientnet")
    with pytest.raises(SiimError, match="not 96"):
        run_cli("train", f"data={prepared}", f"project={tmp_path}", "imgsz=96", "model=test_efficientnet")


def test_image_without_mask(prepared, tmp_path):
    copy = tmp_path / "prep"
    shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns("128"))
    victim = Prepared(copy).fold(2, "val").image_id.iloc[0]
    Prepared(copy).mask_path(victim, 64).unlink()
    with pytest.raises(SiimError, match=f"image {victim} has no mask"):
        run_cli(
            "train",
            f"data={copy}",
            f"project={tmp_path}",
            "imgsz=64",
            "fold=0",
            "model=test_efficientnet",
            "pretrained=false",
            "workers=0",
        )
    assert not (tmp_path / "test_efficientnet_64" / "fold0").exists()


@pytest.mark.slow
def test_resume_with_other_model_is_refused(trained, prepared):
    run, _ = trained
    with pytest.raises(SiimError, match=r"was trained with model=test_efficientnet \(now resnet10t\)"):
        run_cli(
            "train",
            f"data={prepared}",
            f"project={run.parent}",
            "name=tiny",
            "imgsz=64",
            "fold=0",
            "model=resnet10t",
            "pretrained=false",
            "workers=0",
        )


@pytest.mark.slow
def test_finished_folds_are_not_skipped_under_other_training_settings(trained, prepared):
    from siimcovid.classify.train import main

    run, _ = trained
    same = dict(name="tiny", fold=0, epochs=2, fine_lr=[1e-4], fine_epochs=1)
    before = (run / "classify.yaml").read_text()
    with pytest.raises(SiimError, match=r"trained with mask_weight=4.0 \(now 1.0\), epochs=2 \(now 3\)"):
        main(tiny_cfg(prepared, run.parent, **{**same, "epochs": 3, "mask_weight": 1.0}))
    assert (run / "classify.yaml").read_text() == before
    main(tiny_cfg(prepared, run.parent, **same, workers=1))  # where it runs may change: fold 0 is skipped


def test_fold_checkpoints_need_done_json_unless_allowed(tmp_path):
    run = tmp_path / "run"
    for k in (0, 1):
        (run / f"fold{k}").mkdir(parents=True)
        (run / f"fold{k}" / "best.pt").write_text("weights")
    (run / "fold0" / P.DONE).write_text("{}")  # what `classify train` writes last
    with pytest.raises(SiimError, match=r"folds \[1\] have not finished training: re-run `siimcovid classify train`"):
        P.fold_checkpoints(run)
    assert P.fold_checkpoints(run, allow_unfinished=True) == {0: run / "fold0" / "best.pt", 1: run / "fold1" / "best.pt"}
    with pytest.raises(SiimError, match=r"no trained fold \(no fold<k>/last.pt\)"):
        P.fold_checkpoints(run, weights="last")
    (run / "fold1" / P.DONE).write_text("{}")
    assert list(P.fold_checkpoints(run)) == [0, 1]


def test_wave_plan_one_later_wave_per_fine_lr():
    from siimcovid.classify.train import wave_plan

    cfg = load_config("classify", {"epochs": 3, "lr": 1e-3, "warmup_epochs": 1, "fine_lr": [1e-4, 1e-5], "fine_epochs": 2})
    assert wave_plan(cfg) == [(1e-3, 3, 1), (1e-4, 2, 0), (1e-5, 2, 0)]
    assert wave_plan(load_config("classify", {"fine_lr": []})) == [(1e-3, 12, 1)]
    assert wave_plan(load_config("classify", {"fine_epochs": 0})) == [(1e-3, 12, 1)]
    with pytest.raises(SiimError, match="fine_lr"):  # 0 (the old "one wave") is refused when the config loads
        load_config("classify", ["fine_lr=0"])


def test_predict_unknown_run(tmp_path):
    with pytest.raises(SiimError, match="run 'nope' not found"):
        run_cli("predict", "run=nope", f"project={tmp_path}")


def test_cli_stays_light_for_other_stages():
    code = (
        "import sys; from siimcovid.cli import resolve; resolve(['classify', 'train', 'help']); "
        "resolve(['synth']); resolve(['prepare']); print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert out.stdout.strip() == "False False", out.stderr


@pytest.mark.slow
def test_predict_refuses_unfinished_folds_and_changed_folds(trained, tmp_path):
    import yaml

    from siimcovid.classify.predict import fold_checkpoints, predict_run

    run_dir, _ = trained
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("pred_*.csv")))
    (copy / "fold0" / "done.json").unlink()  # still training (or died)
    with pytest.raises(SiimError, match=r"folds \[0\] have not finished training"):
        fold_checkpoints(copy)
    assert list(fold_checkpoints(copy, allow_unfinished=True)) == [0]
    cfg = yaml.safe_load((copy / "classify.yaml").read_text())
    cfg["learned"]["folds_id"] = "0123456789ab"  # trained on another fold assignment
    (copy / "classify.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SiimError, match="trained on other folds"):
        predict_run(copy, "oof", False, torch.device("cpu"), 8, 0, allow_unfinished=True)


@pytest.mark.slow
def test_predict_checks_the_folds_of_each_fold_model(trained, tmp_path):
    # `train fold=0 resume=false` after a new prepare rewrites the run's classify.yaml but
    # leaves the other folds' models: each fold model's own fingerprint must be checked.
    from siimcovid.classify.predict import predict_run

    run_dir, _ = trained
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("pred_*.csv")))
    ckpt = torch.load(copy / "fold0" / "best.pt", weights_only=False)
    assert ckpt["folds_id"] == Prepared(ckpt_data(copy)).folds_id and ckpt["fold"] == 0
    predict_run(copy, "oof", False, torch.device("cpu"), 8, 0)  # as trained: fine
    torch.save({**ckpt, "folds_id": "0123456789ab"}, copy / "fold0" / "best.pt")
    with pytest.raises(SiimError, match=r"fold0 was trained on other folds"):
        predict_run(copy, "oof", False, torch.device("cpu"), 8, 0)
    predict_run(copy, "test", False, torch.device("cpu"), 8, 0)  # test images were never trained on


@pytest.mark.slow
def test_predict_with_the_last_epoch_weights(trained, tmp_path):
    # weights=last: the final EMA weights from last.pt (no choice made on the fold being predicted)
    from siimcovid.classify.predict import predict_run

    run_dir, _ = trained
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("pred_*.csv")))
    last = torch.load(copy / "fold0" / "last.pt", weights_only=False)
    assert last["ema"] is not None and last["epoch"] == 3
    with_last, _ = predict_run(copy, "oof", False, torch.device("cpu"), 8, 0, weights="last")
    torch.save({"model": last["ema"], "model_cfg": last["model_cfg"], "folds_id": last["folds_id"]}, copy / "fold0" / "best.pt")
    as_best, _ = predict_run(copy, "oof", False, torch.device("cpu"), 8, 0, weights="best")
    np.testing.assert_allclose(with_last[STUDY_CLASSES], as_best[STUDY_CLASSES], atol=1e-6)
    with pytest.raises(SiimError, match=r"no trained fold \(no fold<k>/final.pt\)"):  # the config only allows best, last
        predict_run(copy, "oof", False, torch.device("cpu"), 8, 0, weights="final")


def ckpt_data(run_dir):

    return read_run(run_dir / "classify.yaml")["data"]


def test_mask_head_stays_in_the_graph_with_mask_weight_zero():
    """DDP needs a gradient for every parameter: with mask_weight=0 the mask head gets zeros, not None."""
    from siimcovid.classify.model import StudyLoss, build_model

    model = build_model(TINY_MODEL)
    images = torch.rand(2, 3, 64, 64)
    out = model(images)
    parts = StudyLoss(mask_weight=0.0)(out, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), torch.zeros(2, 1, 64, 64))
    parts["loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if "mask" in n]
    assert grads and all(g is not None and float(g.abs().sum()) == 0.0 for g in grads)


def test_amp_dtype_follows_the_gpu_generation(monkeypatch):
    # bf16 only with bf16 hardware (Ampere, compute capability 8+): T4 and V100 emulate it slowly
    from siimcovid.classify.predict import amp_dtype_for

    gpu = torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4
    assert amp_dtype_for(gpu, True) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    assert amp_dtype_for(gpu, True) == torch.bfloat16
    assert amp_dtype_for(gpu, False) is None and amp_dtype_for(torch.device("cpu"), True) is None


def test_device_names():
    from siimcovid.engine.devices import parse, torch_device

    assert torch_device("cpu").type == "cpu" and torch_device("auto").type in ("cpu", "cuda")
    with pytest.raises(SiimError, match="torchrun"):
        torch_device("0,1")
    assert (parse("cuda:1").indices, parse([0, 1]).count, parse("cpu").count, parse(None).count) == ((1,), 2, 0, None)
    assert parse("0,1").text == "0,1" and parse("cuda").text == "0"
    with pytest.raises(SiimError, match="device=gpu7: expected cpu, cuda"):
        parse("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(SiimError, match="CUDA is not available"):
            torch_device(0)  # device=0 means the first GPU, as in Ultralytics
