"""`siimcovid evaluate` on the synthetic dataset (conftest's synth_root and prepared fixtures)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from siimcovid.cli import entrypoint, main
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import STUDY_CLASSES, STUDY_COLUMNS
from siimcovid.utils import SiimError


def perfect_from_csvs(folder) -> pd.DataFrame:
    """A perfect submission written straight from the truth CSVs (independent of siimcovid's builders):
    the image `label` column is already a prediction string; studies take their one-hot class."""
    images = pd.read_csv(folder / "train_image_level.csv")
    studies = pd.read_csv(folder / "train_study_level.csv")
    study_rows = [
        (r["id"], " ".join(f"{c} {float(r[STUDY_COLUMNS[c]])} 0 0 1 1" for c in STUDY_CLASSES)) for _, r in studies.iterrows()
    ]
    return pd.DataFrame(study_rows + list(zip(images["id"], images["label"])), columns=["id", "PredictionString"])


def test_perfect_test_submission_scores_one(synth_root, tmp_path, capsys):
    path = tmp_path / "perfect.csv"
    perfect_from_csvs(synth_root / "test_truth").to_csv(path, index=False)
    score = main(["evaluate", f"submission={path}", f"data={synth_root}", "split=test"])
    assert score.final == 1.0 and score.study_map == 1.0 and score.image_map == 1.0
    out = capsys.readouterr().out
    assert "final (mean over classes)" in out and "opacity" in out
    # the test predictions are no train truth
    with pytest.raises(SiimError, match="not in the train truth"):
        main(["evaluate", f"submission={path}", f"data={synth_root}"])


def test_a_partial_test_submission_is_an_error(synth_root, tmp_path, caplog, monkeypatch):
    path = tmp_path / "partial.csv"
    sub = perfect_from_csvs(synth_root / "test_truth")
    sub.iloc[1:].to_csv(path, index=False)  # one id left out
    # Kaggle rejects a submission that misses test ids: so does evaluate split=test
    message = rf"covers {len(sub) - 1} of the {len(sub)} test ids \(missing e.g. '{sub.id.iloc[0]}'\): Kaggle rejects"
    with pytest.raises(SiimError, match=message) as raised:
        main(["evaluate", f"submission={path}", f"data={synth_root}", "split=test"])
    assert str(path) in str(raised.value)
    # on the command line: one error line and exit 2
    monkeypatch.setattr("sys.argv", ["siimcovid", "evaluate", f"submission={path}", f"data={synth_root}", "split=test"])
    with pytest.raises(SystemExit) as exited:
        entrypoint()
    assert exited.value.code == 2 and "siimcovid: error:" in caplog.text and "Kaggle rejects" in caplog.text
    caplog.clear()
    # partial=true scores the ids present, knowingly (a warning)
    assert main(["evaluate", f"submission={path}", f"data={synth_root}", "split=test", "partial=true"]).final == 1.0
    assert f"covers {len(sub) - 1} of the {len(sub)} test ids" in caplog.text and "partial=true" in caplog.text
    # ids=all: the missing id counts as misses (no error: that is the score Kaggle would give)
    assert main(["evaluate", f"submission={path}", f"data={synth_root}", "split=test", "ids=all"]).final < 1.0
    # the whole file is no error, and the train split keeps scoring partial (out-of-fold) files
    sub.to_csv(tmp_path / "whole.csv", index=False)
    assert main(["evaluate", f"submission={tmp_path / 'whole.csv'}", f"data={synth_root}", "split=test"]).final == 1.0
    train = perfect_from_csvs(synth_root)
    train.iloc[1:].to_csv(tmp_path / "train_partial.csv", index=False)
    assert main(["evaluate", f"submission={tmp_path / 'train_partial.csv'}", f"data={synth_root}"]).final == 1.0
    with pytest.raises(SiimError, match=r"partial='maybe': expected bool"):
        main(["evaluate", f"submission={path}", f"data={synth_root}", "split=test", "partial=maybe"])


def test_json_and_imperfect_scores(synth_root, tmp_path, capsys):
    sub = perfect_from_csvs(synth_root)
    images = sub.id.str.endswith("_image")
    # drop every opacity box of half the boxed images, and say "none" there instead
    boxed = sub[images & sub.PredictionString.str.startswith("opacity")].index
    sub.loc[boxed[::2], "PredictionString"] = "none 1 0 0 1 1"
    path = tmp_path / "half.csv"
    sub.to_csv(path, index=False)
    score = main(["evaluate", f"submission={path}", f"data={synth_root}", "--json", f"out={tmp_path / 's.json'}"])
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "s.json").read_text())
    assert report["final"] == pytest.approx(score.final)
    assert report["study_map"] == 1.0
    assert 0.3 < report["ap"]["opacity"] < 0.8  # about half the boxes found, all at precision 1
    assert report["ap"]["none"] < 1.0  # confident false "none"s rank with the true ones
    assert report["final"] == pytest.approx((4 * 1.0 + report["ap"]["opacity"] + report["ap"]["none"]) / 6)


def test_out_of_fold_scoring_with_a_prepared_dir(synth_root, prepared, tmp_path):
    meta = Prepared(prepared).split("train")
    fold0 = meta[meta.fold == 0]
    sub = perfect_from_csvs(synth_root)
    keep = set(fold0.image_id + "_image") | set(fold0.study_id + "_study")
    oof = sub[sub.id.isin(keep)]
    assert 0 < len(oof) < len(sub)
    path = tmp_path / "oof0.csv"
    oof.to_csv(path, index=False)
    # ids=present (default): only the fold's ids are scored
    assert main(["evaluate", f"submission={path}", f"data={prepared}"]).final == 1.0
    assert main(["evaluate", f"submission={path}", f"data={prepared}", "fold=0"]).final == 1.0
    assert main(["evaluate", f"submission={path}", f"data={prepared}", "fold=all"]).final == 1.0
    with pytest.raises(SiimError, match=r"fold='first': expected all \| int >= 0"):
        main(["evaluate", f"submission={path}", f"data={prepared}", "fold=first"])
    with pytest.raises(SiimError, match="fold 3 does not exist"):
        main(["evaluate", f"submission={path}", f"data={prepared}", "fold=3"])
    with pytest.raises(SiimError, match=r"fold=\[0, 1\]: expected"):  # one fold or all
        main(["evaluate", f"submission={path}", f"data={prepared}", "fold=0,1"])
    # ids=all: the other folds' boxes and studies count as misses
    assert main(["evaluate", f"submission={path}", f"data={prepared}", "ids=all"]).final < 0.9
    # a fold the submission does not cover leaves nothing to score
    with pytest.raises(SiimError, match="nothing to score"):
        main(["evaluate", f"submission={path}", f"data={prepared}", "fold=1"])
    # opacity only (detector checkpoints) and study only (classifiers)
    assert list(main(["evaluate", f"submission={path}", f"data={prepared}", "classes=opacity"]).ap) == ["opacity"]
    assert set(main(["evaluate", f"submission={path}", f"data={prepared}", "classes=study"]).ap) <= set(STUDY_CLASSES)
    assert list(main(["evaluate", f"submission={path}", f"data={prepared}", "classes=opacity,none"]).ap) == ["opacity", "none"]


def test_user_errors(synth_root, tmp_path):
    path = tmp_path / "p.csv"
    perfect_from_csvs(synth_root).to_csv(path, index=False)
    with pytest.raises(SiimError, match="needs a prepared dir"):
        main(["evaluate", f"submission={path}", f"data={synth_root}", "fold=0"])
    # the choices of classes and ids are checked with the settings (cfg/evaluate.yaml), before any file is read
    with pytest.raises(SiimError, match=r"classes='opacty': expected study \| image \| all \| negative"):
        main(["evaluate", f"submission={tmp_path / 'absent.csv'}", f"data={synth_root}", "classes=opacty"])
    with pytest.raises(SiimError, match=r"classes=\['opacity', 'nonee'\]: expected"):
        main(["evaluate", f"submission={tmp_path / 'absent.csv'}", f"data={synth_root}", "classes=opacity,nonee"])
    with pytest.raises(SiimError, match=r"ids='some': expected present \| all"):
        main(["evaluate", f"submission={tmp_path / 'absent.csv'}", f"data={synth_root}", "ids=some"])
    with pytest.raises(SiimError, match="neither a prepared dir"):
        main(["evaluate", f"submission={path}", f"data={tmp_path}"])
    with pytest.raises(SiimError, match="needs submission"):
        main(["evaluate", f"data={synth_root}"])


def test_prepared_dir_without_its_csvs_falls_back_to_meta(synth_root, prepared, tmp_path):
    import shutil

    import yaml

    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(prepared / "meta.csv", moved / "meta.csv")
    cfg = Prepared.read_cfg(prepared)  # its settings and what it learned, written back as one mapping
    cfg["data"] = cfg["data_resolved"] = str(tmp_path / "gone")  # the SIIM root is no longer where it was prepared from
    (moved / "prepare.yaml").write_text(yaml.safe_dump(cfg))
    path = tmp_path / "p.csv"
    perfect_from_csvs(synth_root).to_csv(path, index=False)
    # meta.csv boxes are clipped to the image; the unclipped truth boxes still overlap them well
    assert main(["evaluate", f"submission={path}", f"data={moved}", "fold=1"]).final == pytest.approx(1.0)
    with pytest.raises(SiimError, match="no test truth"):
        main(["evaluate", f"submission={path}", f"data={moved}", "split=test"])
