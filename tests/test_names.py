"""Names stay where the user expects: every run name is one folder name, every folder a stage writes in is a folder,
and numbers are finite and of a sane size, all checked when the settings are loaded (siimcovid/config.py's `name`
and `folder` types, its float and int checks), with one line naming the stage and the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from siimcovid import cli
from siimcovid.config import ConfigError, load_config, parse_value, schema
from siimcovid.utils import SiimError

ROOT = Path(__file__).resolve().parents[1]
BAD_NAMES = ["../../escape", "..", ".", "/abs", "a/b", "a\\b", "", "tab\there", "x" * 201]
NAME_KEYS = [("prepare", "name"), ("classify", "name"), ("detect", "name"), ("fuse", "name"), ("pseudo", "name"),
             ("run", "name"), ("export", "pipeline")]  # fmt: skip
FOLDER_KEYS = [("classify", "project"), ("detect", "project"), ("fuse", "project"), ("pseudo", "project"),
               ("run", "project"), ("export", "project"), ("runs", "project"), ("prepare", "out"),
               ("prepare", "data_yaml_dir"), ("synth", "out"), ("predict", "out"), ("pseudo", "out")]  # fmt: skip


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def console(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The console script as a user runs it (exit code, stderr)."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-m", "siimcovid", *args], capture_output=True, text=True, cwd=cwd, env=env)


# ----------------------------------------------------------------------------- names: one path component
@pytest.mark.parametrize("stage, key", NAME_KEYS)
@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_name_that_is_not_one_folder_name_is_refused_at_load(stage, key, bad):
    with pytest.raises(ConfigError) as e:
        load_config(stage, {key: bad})
    message = str(e.value)
    assert message.startswith(f"{stage} setting {key}={bad!r}: expected name") and "\n" not in message
    assert "a name is one folder name, not a path; this one " in message


def test_the_message_says_what_is_wrong_with_the_name():
    with pytest.raises(ConfigError) as e:
        cli.main(["prepare", "name=../x"])
    assert str(e.value) == (
        "prepare setting name='../x': expected name? "
        "(a name is one folder name, not a path; this one holds a path separator ('/' or '\\'))"
    )
    with pytest.raises(ConfigError, match=r"^fuse setting name='\.': expected name \(.*is empty, '\.' or '\.\.'\)$"):
        cli.main(["fuse", "name=."])


def test_plain_names_still_load():
    for name in ("demo", "b3_512", "siim-yolov5xu", "exp.v2", "123", "ünïcode"):
        assert load_config("run", {"name": name}).name == name
    assert load_config("fuse", ["name=123"]).name == "123" and load_config("prepare").name is None


def test_every_name_setting_is_typed_as_one():
    """The stages' run-name settings all use the `name` type (none is a plain str or path)."""
    for stage, key in NAME_KEYS:
        assert schema(stage).settings[key].spec.split("?")[0] == "name", (stage, key)


# ----------------------------------------------------------------------------- the escapes, end to end
def test_prepare_name_dotdot_writes_nothing_above_the_working_folder(tiny_root, tmp_path, monkeypatch):
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = files_under(tmp_path)
    with pytest.raises(ConfigError, match=r"^prepare setting name='\.\./\.\./escape': expected name"):
        cli.main(["prepare", f"data={tiny_root}", "name=../../escape", "sizes=64", "n_folds=2", "workers=1"])
    assert files_under(tmp_path) == before  # today: a/b/escape_fold<k>.yaml and work/escape/
    assert not list(tmp_path.rglob("*escape*"))


def test_prepare_name_dot_does_not_write_into_runs_prepare(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^prepare setting name='\.'"):
        cli.main(["prepare", f"data={tiny_root}", "name=.", "sizes=64", "n_folds=2", "workers=1"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data_yaml").exists()


def test_run_name_dotdot_does_not_make_the_stages_share_a_folder(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^run setting name='\.\./esc': expected name"):
        cli.main(["run", "name=../esc", f"data={tiny_root}", f"project={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "esc").exists()


def test_fuse_absolute_name_does_not_write_outside_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "abs"
    with pytest.raises(ConfigError, match=rf"^fuse setting name='{outside}': expected name"):
        cli.main(["fuse", f"name={outside}", f"project={tmp_path / 'runs'}", "cls=cls.csv", "split=oof"])
    assert not outside.exists() and not (tmp_path / "runs").exists()


def test_a_default_name_from_an_odd_folder_name_is_refused(tmp_path, monkeypatch):
    """prepare names the data set after the data folder: a folder name with a control character (or the root,
    whose name is empty) would become a run folder; it is refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "scan\x07s"
    odd.mkdir()
    with pytest.raises(SiimError, match=r"^prepare: the default name, made from the folder name of data .*control"):
        cli.main(["prepare", f"data={odd}"])
    with pytest.raises(SiimError, match=r"^prepare: the default name.*: name='' is empty"):
        cli.main(["prepare", "data=/"])
    assert files_under(tmp_path) == {Path(odd.name)}


def test_a_default_classifier_name_from_a_hub_model_is_refused():
    from siimcovid.classify.train import run_name

    cfg = load_config("classify", {"model": "hf-hub:timm/resnet10t.c3_in1k", "imgsz": 64})
    with pytest.raises(SiimError, match=r"^classify: the default name, made from model= and imgsz= \(give name= .*"):
        run_name(cfg)
    assert run_name(load_config("classify", {"model": "resnet10t", "imgsz": 64})) == "resnet10t_64"


def test_nested_tuning_writes_fold_folders_of_one_folder_name(prepared, tmp_path):
    """run's nested tuning fuses into <project>/fuse/<name>-nested/fold<k>/: each a fuse run whose name is one
    folder name (fold<k>), the nested folder its project."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_fuse import classifier, exact_detections, truth_images

    from siimcovid.run import Fusion, nested_tuning

    images = truth_images(prepared, "oof")
    exact_detections(images).to_csv(tmp_path / "det.csv", index=False)
    classifier(images, signal=1.0).to_csv(tmp_path / "cls.csv", index=False)
    cfg = load_config("run", {"name": "demo", "fuse": {"workers": 1}})
    fusion = Fusion(cfg, prepared, tmp_path / "runs")
    result = nested_tuning(prepared, fusion, ([str(tmp_path / "det.csv")], [str(tmp_path / "cls.csv")]), trials=1)
    assert 0 <= result["score"].final <= 1
    nested = tmp_path / "runs" / "fuse" / "demo-nested"
    assert sorted(p.name for p in nested.iterdir()) == ["fold0", "fold1", "fold2"]
    assert all((nested / f"fold{k}" / "best.yaml").is_file() for k in range(3))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["fuse"]


# ----------------------------------------------------------------------------- folders: not a file
@pytest.mark.parametrize("stage, key", FOLDER_KEYS)
def test_a_folder_setting_naming_a_file_is_refused_at_load(stage, key, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match=rf"^{stage} setting {key}='{afile}': expected folder\?? \(a folder to write in; "
                       r"this one is an existing file, not a folder\)$"):  # fmt: skip
        load_config(stage, {key: str(afile)})
    with pytest.raises(ConfigError, match=rf"this one lies under '{afile}', a file\)$"):
        load_config(stage, {key: str(afile / "sub")})
    assert afile.read_text() == "mine"
    assert load_config(stage, {key: str(tmp_path / "new" / "folder")})[key] == str(tmp_path / "new" / "folder")


@pytest.mark.parametrize("args", [["fuse", "split=oof"], ["classify", "train"], ["run"], ["synth"]])
def test_project_an_existing_file_is_one_line_not_a_traceback(args, tmp_path):
    (tmp_path / "afile").write_text("mine")
    key = "out" if args[0] == "synth" else "project"
    proc = console([*args, f"{key}=afile"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        f"siimcovid: error: {args[0]} setting {key}='afile': expected folder (a folder to write in; "
        "this one is an existing file, not a folder)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "mine"


# ----------------------------------------------------------------------------- numbers: finite, of a sane size
def float_settings():
    """(stage, key) of every setting of every stage that takes a float (alone, in a list, or one of several)."""

    def has_float(spec) -> bool:
        return any(a.kind == "float" or (a.kind == "list" and has_float(a.item)) for a in spec.alts)

    stages = sorted(p.stem for p in (ROOT / "siimcovid" / "cfg").glob("*.yaml"))
    return [(st, k) for st in stages for k, s in schema(st).settings.items() if has_float(s.parsed)]


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e400", ".inf", "-1e400"])
def test_every_float_setting_refuses_non_finite_values(text):
    settings = float_settings()
    assert ("classify", "lr") in settings and ("fuse", "iou_thr") in settings and len(settings) > 40
    value = parse_value(text)  # what the command line gives: inf, -inf, nan (1e400 reads as inf)
    for stage, key in settings:
        with pytest.raises(ConfigError, match=rf"^{stage} setting {key}=.*: expected .*a finite number") as e:
            schema(stage).check(key, value)
        assert "\n" not in str(e.value)


def test_lr_inf_is_one_line_at_load(tmp_path):
    proc = console(["classify", "train", "lr=inf", f"project={tmp_path / 'runs'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "siimcovid: error: classify setting lr=inf: expected float > 0 (a finite number)"
    with pytest.raises(ConfigError, match=r"^classify setting lr=inf in .*exp\.yaml: expected float > 0 \(a finite"):
        (tmp_path / "exp.yaml").write_text("lr: .inf\n")
        load_config("classify", [f"cfg={tmp_path / 'exp.yaml'}"])
    with pytest.raises(ConfigError, match=r"^classify setting fine_lr=\[0\.0001, nan\]: expected list\[float > 0\]"):
        load_config("classify", ["fine_lr=1e-4,nan"])
    with pytest.raises(ConfigError, match=r"^detect setting box=inf \(an Ultralytics setting\): expected a finite number$"):
        cli.main(["detect", "train", "box=inf"])


def test_sizes_with_twenty_digits_is_one_line(tmp_path):
    proc = console(["prepare", "sizes=12345678901234567890", f"out={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "siimcovid: error: prepare setting sizes=12345678901234567890: expected list[int 32..8192]"
    assert not (tmp_path / "out").exists()


IMAGE_SIZES = [("prepare", "sizes", 8192), ("prepare", "yolo_size", 8192), ("pseudo", "sizes", 8192),
               ("classify", "imgsz", 8192), ("detect", "imgsz", 8192), ("detect", "predict_imgsz", 8192),
               ("synth", "rows", 16384), ("synth", "cols", 16384)]  # fmt: skip


@pytest.mark.parametrize("stage, key, most", IMAGE_SIZES)
def test_image_sizes_have_an_upper_bound(stage, key, most):
    assert load_config(stage, {key: most})[key] in (most, [most])
    with pytest.raises(ConfigError, match=rf"^{stage} setting {key}={most + 1}: expected .*{most}"):
        load_config(stage, {key: most + 1})
    with pytest.raises(ConfigError, match=rf"^{stage} setting {key}=12345678901234567890: expected "):
        load_config(stage, {key: 12345678901234567890})


def test_an_int_setting_fits_in_64_bits():
    assert load_config("classify", {"seed": 2**63 - 1}).seed == 2**63 - 1
    for value in (2**63, -(2**63), 10**30, 1e30):
        with pytest.raises(ConfigError, match=r"^classify setting seed=.*: expected int \(a 64-bit integer, below 2\*\*63\)$"):
            load_config("classify", {"seed": value})
    with pytest.raises(ConfigError, match=r"^fuse setting trials=1000000000000000000000: expected int >= 0 \(a 64-bit"):
        cli.main(["fuse", "tune", "trials=1000000000000000000000"])


def test_a_link_loop_or_a_device_as_project_is_one_line(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)  # mkdir would fail with "too many levels of symbolic links"
    with pytest.raises(ConfigError, match=r"^fuse setting project=.*: expected folder \(a folder to write in; this one exists "):
        load_config("fuse", {"project": str(loop)})
    with pytest.raises(ConfigError, match=rf"this one lies under '{loop}', which is not a folder\)$"):
        load_config("fuse", {"project": str(loop / "x")})
    message = r"^predict setting out='/dev/null': expected folder\? \(.* exists and is not a folder\)$"
    with pytest.raises(ConfigError, match=message):
        load_config("predict", {"out": "/dev/null"})


@pytest.mark.parametrize("typed", ["0123", "1:30", "0x1f", "1e3", "2024-01-01"])
def test_a_name_or_folder_typed_on_the_command_line_is_the_text_as_typed(typed):
    """YAML 1.1 reads 0123 as 83 and 2024-01-01 as a date: a name or a folder is the text the user typed."""
    assert load_config("fuse", [f"name={typed}"]).name == typed
    assert str(load_config("fuse", [f"project={typed}"]).project) == typed
    assert load_config("classify", ["device=0", "workers=3"]).device == 0  # a number where the setting takes one
