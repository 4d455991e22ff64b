"""`siimcovid runs` from the stage registry: each stage describes its own row, from small fake run folders (no training)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from siimcovid import cli, stages
from siimcovid.config import default_config_path, fusion_keys, read_yaml
from siimcovid.runs import list_runs
from siimcovid.tables import COPIES, META, SCORES
from siimcovid.utils import SiimError

ROOT = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))


def write_scores(run: Path, **all_row) -> None:
    """scores_oof.csv (tables.SCORES): the "all" row with these scores, then two folds."""
    rows = [{"fold": "all", "n_images": 20, "n_studies": 10, **all_row}]
    rows += [{"fold": str(k), "n_images": 10, "n_studies": 5, **{c: 0.1 for c in all_row}} for k in (0, 1)]
    SCORES.write(pd.DataFrame(rows), run / "scores_oof.csv")


def meta_rows(image_ids: list[str]) -> pd.DataFrame:
    """A meta.csv (tables.META) of these train images, one study each, no boxes."""
    n = len(image_ids)
    return pd.DataFrame(
        {"image_id": image_ids, "study_id": [f"s{i}" for i in image_ids], "series_id": "x", "patient_id": "p", "split": "train",
         "fold": 0, "study_label": "negative", "boxes": [[] for _ in range(n)], "n_boxes": 0, "rows": 64, "cols": 64,
         "photometric": "MONOCHROME2", "bits_stored": 12, "transfer_syntax": "1.2.840.10008.1.2.1", "voi": "", "modality": "CR",
         "dicom": [f"train/s{i}/x/{i}.dcm" for i in image_ids]}
    )


@pytest.fixture
def project(tmp_path) -> Path:
    """One run folder per stage (and a few that are not runs), holding only the small files each stage writes."""
    p = tmp_path / "runs"
    prep = p / "prepare" / "siim"
    write_yaml(prep / "prepare.yaml", {"sizes": [256, 512], "n_folds": 5, "ext": "png", "seed": 42})
    META.write(meta_rows(["a", "b", "c"]), prep / "meta.csv")
    write_yaml(p / "prepare" / "half" / "prepare.yaml", {"sizes": [128], "n_folds": 3})

    det = p / "detect" / "v5n"
    write_yaml(det / "detect.yaml", {"model": "models/yolov5n.yaml", "imgsz": 128, "hyp": "yolov5m", "epochs": 20, "batch": 16})
    write_yaml(det / "fold0" / "args.yaml", {"mosaic": 0.5, "optimizer": "AdamW", "lr0": 0.004})
    (det / "fold1").mkdir()
    write_scores(det, opacity=0.41234, final=0.41234, image_map=0.41234)
    pd.DataFrame({"model": ["v5n"], "fold": ["all"], "opacity_ap": [0.9]}).to_csv(det / "oof_ap.csv", index=False)  # old name
    (p / "detect" / "notes").mkdir()  # no detect.yaml: not a run
    lung = p / "detect" / "siim-lung-v5n"
    write_yaml(lung / "detect.yaml", {"model": "models/yolov5n.yaml", "imgsz": 128, "task": "lung"})
    (lung / "fold0").mkdir()
    write_scores(lung, lung=0.987, final=0.987, image_map=0.987)

    cls = p / "classify" / "r10"
    write_yaml(cls / "classify.yaml", {"model": "resnet10t", "imgsz": 128, "epochs": 8, "lr": 0.001})
    for k in (0, 1, 2):
        (cls / f"fold{k}").mkdir(parents=True)
    (cls / "fold0" / "done.json").write_text("{}")
    (cls / "fold2" / "done.json").write_text("{}")
    study = {c: 0.5 for c in ("negative", "typical", "indeterminate", "atypical")}
    write_scores(cls, **study, none=0.75, study_map=0.5, image_map=0.75, final=0.55)

    fuse = p / "fuse" / "best"
    defaults = {k: v for k, v in read_yaml(default_config_path("fuse")).items() if k in fusion_keys()}
    write_yaml(fuse / "fuse_oof.yaml", {**defaults, "det": ["a.csv"], "cls": ["b.csv", "c.csv"], "iou_thr": 0.5})
    write_scores(fuse, study_map=0.4, image_map=0.6, final=0.5)
    (fuse / "submission.csv").write_text("id,PredictionString\n")
    write_yaml(p / "fuse" / "plain" / "tune.yaml", {**defaults, "det": ["a.csv"], "cls": []})
    write_yaml(p / "fuse" / "x-nested" / "fold0" / "fuse_oof.yaml", defaults)  # only fold folders: not a run itself

    write_yaml(p / "pseudo" / "pool" / "prepare.yaml", {"layout": "pseudo", "teacher": "all", "leaky": True, "sizes": [128]})

    run = p / "run" / "demo"
    write_yaml(run / "run.yaml", {"data": "siim", "tune_trials": 30, "detect": {"model": "yolov5n.yaml", "imgsz": 128}})
    pd.DataFrame({"method": ["fused", "baseline: a", "baseline: b"], "final": [0.5, 0.3, 0.35]}).to_csv(run / "cv_table.csv")
    return p


def rows_by_name(table: pd.DataFrame) -> dict[str, dict]:
    return {f"{r['stage']}/{r['name']}": r for r in table.to_dict("records")}


def test_every_stage_describes_its_runs_with_the_cv_of_its_scores_file(project):
    rows = rows_by_name(list_runs(project))
    assert set(rows) == {"prepare/siim", "prepare/half", "detect/v5n", "detect/siim-lung-v5n", "classify/r10", "fuse/best",
                         "fuse/plain", "pseudo/pool", "run/demo"}  # fmt: skip
    assert "LEAKY" in rows["pseudo/pool"]["cv"]
    assert list(list_runs(project).stage.unique()) == stages.with_runs()

    assert rows["prepare/siim"]["cv"] == "3 images" and rows["prepare/siim"]["imgsz"] == "256,512"
    assert rows["prepare/half"]["cv"] == "unfinished (no meta.csv)"

    det = rows["detect/v5n"]
    assert det["cv"] == "opacity AP 0.4123" and det["cv_value"] == pytest.approx(0.41234)  # scores_oof.csv, not oof_ap.csv
    assert (det["model"], det["imgsz"], det["folds"]) == ("yolov5n.yaml", "128", "0,1")
    assert det["settings"] == "hyp=yolov5m epochs=20 batch=16 mosaic=0.5 optimizer=AdamW lr0=0.004"
    lung = rows["detect/siim-lung-v5n"]  # a lung detector's cv is its lung AP, not an opacity AP it never had
    assert lung["cv"] == "lung AP 0.9870" and lung["cv_value"] == pytest.approx(0.987)

    cls = rows["classify/r10"]
    assert cls["cv"] == "study mAP 0.5000, AP(none) 0.7500" and cls["cv_value"] == 0.5
    assert cls["folds"] == "0,2"  # finished folds only

    fuse = rows["fuse/best"]
    assert fuse["cv"] == "final 0.5000 (study 0.4000, image 0.6000); submission.csv" and fuse["cv_value"] == 0.5
    assert fuse["model"] == "1 det + 2 cls"

    run = rows["run/demo"]
    assert run["cv"] == "final 0.5000 (best baseline 0.3500)" and run["settings"] == "data=siim tune_trials=30"
    assert all(r["date"] for r in rows.values())


def test_runs_trained_with_all_folds_pseudo_labels_are_flagged_leaky(project):
    honest, leaky = project / "pseudo" / "honest", project / "pseudo" / "all"
    write_yaml(honest / "prepare.yaml", {"layout": "pseudo", "teacher": "fold", "leaky": False})
    write_yaml(leaky / "prepare.yaml", {"layout": "pseudo", "teacher": "all", "leaky": True})
    for name, extra in (("student", [str(honest)]), ("final", [str(honest), str(leaky)])):
        write_yaml(project / "classify" / name / "classify.yaml", {"model": "resnet10t", "imgsz": 128, "extra": extra})
        write_yaml(project / "detect" / name / "detect.yaml", {"model": "yolov5n.yaml", "imgsz": 128, "extra": extra})
    table = list_runs(project, ["detect", "classify"]).set_index(["stage", "name"]).settings
    for stage in ("detect", "classify"):
        assert table[stage, "student"].endswith("extra=honest") and "LEAKY" not in table[stage, "student"]
        assert "extra=honest,all LEAKY" in table[stage, "final"]
    write_yaml(project / "classify" / "nih" / "classify.yaml", {"model": "r", "data": "/x/nih14", "label_names": ["a", "b"]})
    assert list_runs(project, ["classify"]).set_index("name").settings["nih"].startswith("multi-label on nih14 (2 labels)")


def test_a_run_shows_how_many_external_images_it_dropped_as_siim_copies(project):
    rsna = project / "prepare" / "rsna"
    write_yaml(rsna / "prepare.yaml", {"layout": "rsna"})
    for stage, config in (("detect", "detect.yaml"), ("classify", "classify.yaml")):
        run = project / stage / "with-rsna"
        write_yaml(run / config, {"model": "m", "imgsz": 128, "extra": [str(rsna)]})
        copies = pd.DataFrame({"image_id": ["r1", "r2"], "siim_image_id": ["s1", "s2"], "siim_split": "train", "distance": 3})
        COPIES.write(copies, run / "copies_rsna.csv")
        write_yaml(project / stage / "none-dropped" / config, {"model": "m", "imgsz": 128, "extra": [str(rsna)]})
        COPIES.write(copies.head(0), project / stage / "none-dropped" / "copies_rsna.csv")
    table = list_runs(project, ["detect", "classify"]).set_index(["stage", "name"]).settings
    for stage in ("detect", "classify"):
        assert table[stage, "with-rsna"].endswith("extra=rsna (2 SIIM copies dropped)")
        assert table[stage, "none-dropped"].endswith("extra=rsna")


def test_fuse_shows_the_fusion_parameters_that_differ_from_the_defaults(project):
    rows = rows_by_name(list_runs(project, "fuse"))
    assert rows["fuse/best"]["settings"] == "iou_thr=0.5"
    assert rows["fuse/plain"]["settings"] == "default fusion"
    plain = project / "fuse" / "plain" / "tune.yaml"
    changed = {**yaml.safe_load(plain.read_text()), "cls_ensemble": "rank", "det_weights": [2.0, 1.0], "workers": 4}
    write_yaml(plain, changed)
    assert rows_by_name(list_runs(project, "fuse"))["fuse/plain"]["settings"] == "det_weights=2,1 cls_ensemble=rank"


def test_a_run_without_scores_or_with_a_bad_scores_file_has_no_cv(project, caplog):
    (project / "detect" / "v5n" / "scores_oof.csv").write_text("fold,n_images\nall,3\n")  # lacks n_studies and final
    (project / "classify" / "r10" / "scores_oof.csv").unlink()
    rows = rows_by_name(list_runs(project, ["detect", "classify"]))
    for name in ("detect/v5n", "classify/r10"):
        assert rows[name]["cv"] == "" and math.isnan(rows[name]["cv_value"])
    assert "scores_oof.csv" in caplog.text  # the bad file is named, not silently skipped


def test_a_prepare_run_with_an_invalid_meta_table_says_so(project, caplog):
    meta = project / "prepare" / "siim" / "meta.csv"
    meta.write_text(meta.read_text().replace(",0,negative,", ",zero,negative,", 1))
    assert rows_by_name(list_runs(project, "prepare"))["prepare/siim"]["cv"] == "invalid meta.csv"
    assert "meta.csv, line 2: column fold: not a finite number: 'zero'" in caplog.text


def test_stage_selection_sorting_and_formats(project, capsys):
    with pytest.raises(SiimError, match="stage must be all or among"):
        list_runs(project, "synth")  # a stage without run folders
    with pytest.raises(SiimError, match=r"stage must be all or among \[.*\], got \['synth'\]"):
        cli.call("runs", project=str(project), stage="synth")  # the spec takes any name: the registry decides
    with pytest.raises(SiimError, match=r"runs setting sort='best': expected date \| cv"):
        cli.call("runs", project=str(project), sort="best")
    table = cli.call("runs", project=str(project), stage=["prepare", "fuse"], sort="cv", format="csv")
    assert set(table.stage) == {"prepare", "fuse"}
    fuse = table[table.stage == "fuse"]
    assert list(fuse.name) == ["plain", "best"]  # no cv first, best last
    printed = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out))
    assert list(printed.name) == list(table.name)
    cli.call("runs", project=str(project / "none"))
    assert "no runs under" in capsys.readouterr().out


def test_the_cli_reads_the_stage_registry():
    assert cli.STAGES == stages.modes_by_stage()
    assert stages.with_runs() == ["prepare", "detect", "classify", "fuse", "pseudo", "run"]
    no_runs = {"synth", "evaluate", "runs", "predict", "keygen", "serve"}
    assert {s.name for s in stages.STAGES.values() if s.folder is None} == no_runs
    assert stages.extra_keys("prepare") == set()
    with pytest.raises(SiimError, match="unknown stage 'nope'"):
        stages.stage("nope")


def defines(target: str) -> bool:
    """Whether "module:function" names a top-level function of a siimcovid file (read with ast: nothing is imported)."""
    module, _, function = target.partition(":")
    path = ROOT.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == function for n in tree.body)


def test_every_registered_function_exists():
    targets = [t for s in stages.STAGES.values() for t in [*s.modes.values(), s.describe, s.extra_keys] if t]
    assert len(targets) >= 18
    missing = [t for t in targets if not defines(t)]
    assert missing == []
