"""The fold engine with a family of its own: tests/constant_family.py (a per-image constant, ~60 lines) trains,
skips when finished, refuses changed settings, calls the events, and predicts out-of-fold and test tables of the
classifier contract, with no edit anywhere else in siimcovid."""

from pathlib import Path

import constant_family  # noqa: F401  (registers the family "constant": importing it is all it takes)
import pytest

from siimcovid import registry
from siimcovid.classify.predict import study_map
from siimcovid.config import load_config
from siimcovid.data.prepared import Prepared
from siimcovid.engine import folds
from siimcovid.engine.family import family_class
from siimcovid.rundir import fold_checkpoints, read_run
from siimcovid.tables import CLASSIFIER_IMAGES
from siimcovid.utils import SiimError


def family(prepared, project, **kw):
    cfg = load_config("classify", {"data": str(prepared), "project": str(project), "device": "cpu", **kw})
    return family_class("constant", "classify")(cfg)


def test_a_family_of_one_module_trains_skips_and_predicts_through_the_engine(prepared, tmp_path):
    assert "constant" in registry.names("classify_family") and "constant" not in registry.names("detect_family")
    seen = []
    events = {e: [lambda t, *a, e=e: seen.append((e, t.fold))] for e in ("on_train_start", "on_fit_epoch_end", "on_train_end")}
    results = folds.train(family(prepared, tmp_path), events)
    prep = Prepared(prepared)
    assert sorted(results) == list(range(prep.n_folds)) and all(r["epochs"] == 1 for r in results.values())
    assert [e for e, k in seen if k == 0] == ["on_train_start", "on_fit_epoch_end", "on_train_end"]
    run = tmp_path / "constant"
    assert (run / "classify.yaml").is_file() and all((run / f"fold{k}" / "done.json").is_file() for k in results)

    again = folds.train(family(prepared, tmp_path), events)  # finished: every fold skipped, its record returned
    assert again == results and len(seen) == 3 * prep.n_folds

    ckpts = fold_checkpoints(run, "prior.json", lambda f: (f / "done.json").is_file(), False, "classify")
    tables = folds.predict(family(prepared, tmp_path), prep, ckpts, ["oof", "test"], "cpu")
    oof, test = (CLASSIFIER_IMAGES.check(tables[s]) for s in ("oof", "test"))
    assert sorted(oof.image_id) == sorted(prep.split("train").image_id)  # each train image once, by its fold's model
    assert sorted(test.image_id) == sorted(prep.split("test").image_id) and set(test.fold) == {-1}
    assert 0.0 <= study_map(prep, oof) <= 1.0


def test_the_engine_refuses_a_run_of_other_settings_and_a_family_of_another_stage(prepared, tmp_path):
    folds.train(family(prepared, tmp_path, fold=0))
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(SiimError, match="was trained with extra="):
        folds.train(family(prepared, tmp_path, fold=0, extra=[str(other)]))
    with pytest.raises(SiimError, match="family=constant is a classify family, not a detect one"):
        family_class("constant", "detect")
    # a family without lung-crop views (crops=False) refuses crop=lung, naming the families that have them
    with pytest.raises(SiimError, match=r"family=constant has no lung-crop views \(classify families with them: timm"):
        folds.train(family(prepared, tmp_path, fold=0, crop="lung", lung=str(other)))


def test_a_family_of_one_module_runs_from_the_command_line_and_predicts_its_tables(prepared, tmp_path):
    from siimcovid import cli
    from siimcovid.tables import CLASSIFIER_STUDIES, SCORES

    settings = {"data": str(prepared), "project": str(tmp_path), "device": "cpu"}
    cli.call("classify", "train", family="constant", name="const", **settings)
    run = tmp_path / "const"
    assert read_run(run / "classify.yaml")["family"] == "constant"  # recorded: predict finds the family again
    written = cli.call("classify", "predict", run="const", split=["oof", "test"], **settings)["const"]
    images = CLASSIFIER_IMAGES.read(written["oof"])
    assert set(images.model) == {"const"} and len(images) == len(Prepared(prepared).split("train"))
    assert len(CLASSIFIER_STUDIES.read(written["test_study"])) == Prepared(prepared).split("test").study_id.nunique()
    assert "all" in set(SCORES.read(written["scores"]).fold.astype(str))


@pytest.fixture(scope="module")
def const_bundle(prepared, tmp_path_factory):
    """A constant run, its tables, and its export: a bundle folder."""
    from siimcovid import cli

    base = tmp_path_factory.mktemp("const")
    settings = {"data": str(prepared), "project": str(base), "device": "cpu"}
    cli.call("classify", "train", family="constant", name="const", **settings)
    cli.call("classify", "predict", run="const", split=["oof", "test"], **settings)
    cli.call("export", classify=[str(base / "const")], out=str(base / "bundle"))
    return base


def test_a_family_of_one_module_exports_into_a_bundle_and_predicts_from_it(const_bundle, synth_root, tmp_path):
    from siimcovid import cli
    from siimcovid.bundle import open_bundle
    from siimcovid.submission import read_submission

    bundle = open_bundle(const_bundle / "bundle")  # its members checked by the family's own checks
    assert [(m.name, m.family) for m in bundle.classifiers] == [("const", "constant")] and not bundle.detectors
    cli.call("predict", bundle=str(const_bundle / "bundle"), source=str(synth_root), out=str(tmp_path / "pred"), device="cpu")
    assert len(read_submission(tmp_path / "pred" / "submission.csv"))
    test = CLASSIFIER_IMAGES.read(tmp_path / "pred" / "classify" / "const" / "pred_test_image.csv")
    own = CLASSIFIER_IMAGES.read(const_bundle / "const" / "pred_test_image.csv")  # the run's own test predictions
    both = test.merge(own, on="image_id", suffixes=("", "_run"))
    assert len(both) == len(own) and (both.negative - both.negative_run).abs().max() < 1e-6  # the same model, moved


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(family="nosuch"), "family .nosuch. is no classify family of this siimcovid"),  # never registered
        (lambda d: d.update(code="__import__('os')"), "described by its family alone"),
        (lambda d: d.update(family="timm"), "model.yaml: model=None is not a str"),  # then timm's checks apply
    ],
)
def test_a_family_member_in_a_tampered_bundle_is_refused_by_its_checks(const_bundle, tmp_path, change, message):
    import shutil

    from test_bundle_safety import edit_yaml

    from siimcovid.bundle import open_bundle

    bundle = Path(shutil.copytree(const_bundle / "bundle", tmp_path / "b"))
    edit_yaml(bundle, "classify/const/model.yaml", change)  # the manifest re-hashed, as an attacker would
    with pytest.raises(SiimError, match=message):
        open_bundle(bundle)


def test_a_family_member_whose_tensors_do_not_fit_is_refused(const_bundle, tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file
    from test_bundle_safety import relist

    from siimcovid.bundle import open_bundle

    bundle = Path(shutil.copytree(const_bundle / "bundle", tmp_path / "b"))
    save_file({"study": torch.zeros(10**3)}, bundle / "classify/const/fold0.safetensors")
    relist(bundle, "classify/const/fold0.safetensors")
    with pytest.raises(SiimError, match="not a constant model's tensors"):
        open_bundle(bundle)


def test_the_engine_refuses_any_changed_setting_or_family_of_a_trained_run_for_every_family(prepared, tmp_path):
    folds.train(family(prepared, tmp_path, fold=0))
    folds.train(family(prepared, tmp_path, fold=1))  # another fold of the run, its own job: not a change
    assert read_run(tmp_path / "constant" / "classify.yaml")["fold"] == 1
    with pytest.raises(SiimError, match=r"was trained with seed=42 \(now 2\): use another name=, resume=false, or delete"):
        folds.train(family(prepared, tmp_path, fold=0, seed=2))
    from siimcovid import cli

    with pytest.raises(SiimError, match=r"was trained with .*family=constant \(now timm\)"):  # another family, one folder
        cli.call("classify", "train", data=str(prepared), project=str(tmp_path), name="constant", fold=0, imgsz=64, device="cpu")
    folds.train(family(prepared, tmp_path, fold=0, seed=2, resume=False))  # trained again from scratch: allowed
    assert read_run(tmp_path / "constant" / "classify.yaml")["seed"] == 2


def test_resume_false_starts_a_fold_again_without_the_tensorboard_events_of_the_attempt_before(prepared, tmp_path):
    folds.train(family(prepared, tmp_path, fold=0))  # tracking=tensorboard, the default: the engine's events write them
    fold = tmp_path / "constant" / "fold0"
    before = sorted(p.name for p in fold.glob("events.out.tfevents.*"))
    assert len(before) == 1
    (fold / "notes.txt").write_text("mine")  # a user's file beside the fold's own
    folds.train(family(prepared, tmp_path, fold=0, resume=False))
    after = sorted(p.name for p in fold.glob("events.out.tfevents.*"))
    assert len(after) == 1 and after != before and (fold / "notes.txt").read_text() == "mine"


def test_a_tracking_store_that_cannot_be_opened_stops_the_run_before_anything_is_written(prepared, tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow)")
    for uri, message in [
        (str(tmp_path / "store"), r"not a tracking store; give a server \(http://host:5000\) or a database \(sqlite:///"),
        ("sqlite:////proc/no/such/x.db", "the MLflow store cannot be opened"),  # a database it cannot create
    ]:
        with pytest.raises(SiimError, match=message):
            folds.train(family(prepared, tmp_path, tracking="mlflow", tracking_uri=uri))
        assert not (tmp_path / "constant").exists()  # refused before the run folder
