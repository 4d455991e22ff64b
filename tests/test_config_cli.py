"""The one config system and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siimcovid import cli
from siimcovid.config import ConfigError, Schema, Setting, Spec, load_config, parse_args
from siimcovid.stages import stage_config

ROOT = Path(__file__).resolve().parents[1]


def test_key_value_parsing():
    args = parse_args(["sizes=256,512", "epochs=3", "lr=1e-3", "name=exp1", "flag=true", "--json", "fold=all"])
    assert args == {"sizes": [256, 512], "epochs": 3, "lr": 1e-3, "name": "exp1", "flag": True, "json": True, "fold": "all"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_args(["oops"])


def test_precedence_defaults_file_command_line(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"prepare": {"sizes": [256], "n_folds": 4}}))
    cfg = load_config("prepare", ["cfg=" + str(exp), "n_folds=3"])
    assert cfg.sizes == [256] and cfg.n_folds == 3 and cfg.ext == "png"
    cfg = load_config("prepare", ["sizes=640"])
    assert cfg.sizes == [640]  # a scalar given for a list setting becomes a list


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'sizes'"):
        load_config("prepare", ["sizez=512"])
    exp = tmp_path / "bad.yaml"
    exp.write_text("n_fold: 3\n")
    with pytest.raises(ConfigError, match=f"{exp}"):
        load_config("prepare", [f"cfg={exp}"])


def test_help_and_unknown_stage(capsys):
    cli.main(["prepare", "help"])
    assert "sizes:" in capsys.readouterr().out
    cli.main([])
    assert "usage: siimcovid" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown stage"):
        cli.main(["nope"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("prepare", ["sizes=256,512"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config("prepare", [f"cfg={tmp_path / 'c.yaml'}"]) == cfg


def test_console_entry_point_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "siimcovid", "synth", "help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "train_studies" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "siimcovid", "prepare", "data=/nonexistent"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "data folder not found: /nonexistent" in proc.stderr and "Traceback" not in proc.stderr


def test_mapping_settings_replace_whole_or_update_by_key(tmp_path):
    ranges = load_config("detect", []).ranges
    cfg = load_config("detect", ["ranges.mosaic=[0.8,1.0]"])
    assert cfg.ranges["mosaic"] == [0.8, 1.0] and cfg.ranges["mixup"] == ranges["mixup"]
    exp = tmp_path / "e.yaml"
    exp.write_text("ranges:\n  mixup: [0.0, 0.1]\n")
    cfg = load_config("detect", [f"cfg={exp}", "ranges.lr0=[0.01,0.02]"])
    assert cfg.ranges == {"mixup": [0.0, 0.1], "lr0": [0.01, 0.02]}  # the file's mapping replaced the default one


def test_shipped_experiment_files_load():
    demo = load_config("run", [])
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        cfg = load_config("run", [f"cfg={path}"])
        assert cfg.detect["model"] != demo.detect["model"]  # sections replace the demo's
        assert "mosaic" not in cfg.detect and cfg.synth is None
    for cfg in [demo] + [load_config("run", [f"cfg={p}"]) for p in (ROOT / "experiments").glob("*.yaml")]:
        # every stage section holds only keys its stage knows
        for stage, section in [
            ("prepare", "prepare"),
            ("detect", "detect"),
            ("detect", "detect_predict"),
            ("classify", "classify"),
            ("classify", "classify_predict"),
            ("fuse", "fuse"),
        ]:
            stage_config(stage, None, cfg[section] or {})  # typed and checked as the stage would run them


# --- types: every key's spec, checked once at load


def test_every_key_has_a_spec_and_its_default_passes():
    from siimcovid.config import CFG_DIR, SHARED, read_yaml, schema

    stages = sorted(p.stem for p in CFG_DIR.glob("*.yaml"))
    assert set(stages) == set(cli.STAGES) | {SHARED}  # shared.yaml: the settings several stages share
    for stage in stages:
        settings = schema(stage).settings
        assert list(settings) == list(read_yaml(CFG_DIR / f"{stage}.yaml"))  # every top-level key, in order
        for key, s in settings.items():
            assert s.spec and s.tags <= {"runtime", "predict", "fusion"}, (stage, key)
            assert schema(stage).check(key, s.default) == s.default or s.default is None, (stage, key)


def checked(spec_text: str, value):
    """The value as a setting of type `spec_text` comes out of the check load_config makes (Schema.check)."""
    spec = Spec.parse(spec_text)
    return Schema("test", {"x": Setting("x", None, spec.text, frozenset(), "", spec)}).check("x", value)


def test_spec_grammar_and_coercion(tmp_path):
    assert checked("int >= 1", 3.0) == 3 and type(checked("int >= 1", 3.0)) is int
    assert checked("float > 0", 1) == 1.0 and checked("float > 0", "1e-3") == 1e-3 and checked("float 0..1", 1) == 1.0
    assert checked("bool", "true") is True
    assert checked("str?", 123) == "123" and checked("str?", None) is None and checked("int >= 32?", None) is None
    assert checked("all | int >= 0 | list[int >= 0]", "all") == "all" and checked("all | int >= 0 | list[int >= 0]", 2) == 2
    assert checked("list[int >= 32]", 640) == [640] and checked("list[int >= 32]", []) == []
    assert checked("none | hflip", "none") == "none"
    assert checked("list[float > 0] | map", {"yolov5x": 2}) == {"yolov5x": 2}
    assert checked("any", object) is object
    rejected = [("int >= 1", 64.5), ("int", True), ("int", "3"), ("float > 0", 0), ("float 0..1", 1.5), ("bool", 1),
                ("list[oof | test]", "val"), ("map", [1])]
    for spec_text, value in rejected:
        with pytest.raises(ConfigError, match=r"test setting x=.*: expected "):
            checked(spec_text, value)
    for bad in ("int >>= 1", "str > 1", "list[int", "a b"):
        with pytest.raises(ValueError):
            Spec.parse(bad)


@pytest.mark.parametrize(
    "argv, key, value, expected",
    [
        (["prepare", "sizes=foo"], "sizes", "'foo'", "list[int 32..8192]"),
        (["prepare", "sizes=64.5"], "sizes", "64.5", "list[int 32..8192]"),
        (["prepare", "sizes=16"], "sizes", "16", "list[int 32..8192]"),
        (["prepare", "n_folds=abc"], "n_folds", "'abc'", "int >= 2"),
        (["prepare", "n_folds=1"], "n_folds", "1", "int >= 2"),
        (["prepare", "workers=-3"], "workers", "-3", "int >= 0?"),
        (["classify", "train", "workers=-3"], "workers", "-3", "int >= 0"),
        (["classify", "train", "epochs=abc"], "epochs", "'abc'", "int >= 1"),
        (["classify", "train", "lr=abc"], "lr", "'abc'", "float > 0"),
        (["fuse", "tune", "trials=abc"], "trials", "'abc'", "int >= 0"),
        (["fuse", "tune", "trials=-5"], "trials", "-5", "int >= 0"),
        (["classify", "predict", "split=val"], "split", "'val'", "list[oof | test]"),
    ],
)
def test_bad_values_are_one_line_errors_at_load(argv, key, value, expected):
    stage = argv[0]
    with pytest.raises(ConfigError) as e:
        cli.main(argv)
    assert str(e.value) == f"{stage} setting {key}={value}: expected {expected}"


def test_values_the_stages_accept_still_load():
    assert load_config("prepare", ["workers=0", "sizes=256,512", "png_level=9"]).sizes == [256, 512]
    cfg = load_config("detect", ["batch=-1", "device=0,1", "pretrained=x.pt", "hyp=null"])
    assert cfg.batch == -1 and cfg.device == [0, 1] and cfg.pretrained == "x.pt" and cfg.hyp is None
    assert load_config("detect", ["device=cpu"]).device == "cpu" and load_config("detect", ["device=0"]).device == 0
    for device in ("cpu", "cuda", "cuda:1", 1, None):
        assert load_config("classify", {"device": device}).device == device
    cfg = load_config("classify", ["fine_lr=[]", "lr=1e-3", "name=123", "epochs=3.0"])
    assert cfg.fine_lr == [] and cfg.lr == 1e-3 and cfg.name == "123" and cfg.epochs == 3 and type(cfg.epochs) is int
    assert load_config("classify", ["fine_lr=1e-4,1e-5"]).fine_lr == [1e-4, 1e-5]
    cfg = load_config("fuse", ["det=a.csv,b.csv", "det_weights=2,1", "space=s.yaml"])
    assert cfg.det == ["a.csv", "b.csv"] and cfg.det_weights == [2.0, 1.0] and cfg.space == "s.yaml"
    assert load_config("fuse", {"det_weights": {"yolov5x": 2}}).det_weights == {"yolov5x": 2}
    for fold in (None, "all", 2):
        assert load_config("evaluate", {"fold": fold}).fold == fold
    for classes in (None, "study", ["opacity", "none"]):
        assert load_config("evaluate", {"classes": classes}).classes == classes


def test_ultralytics_settings_are_checked_by_ultralytics():
    with pytest.raises(ConfigError, match=r"^detect setting cos_lr='abc' \(an Ultralytics setting\): [^\n]*bool[^\n]*$"):
        cli.main(["detect", "train", "cos_lr=abc"])
    func, cfg = cli.stage_function("detect", "train", ["cos_lr=true", "close_mosaic=3.0", "cache=ram"])
    assert cfg.cos_lr is True and cfg.close_mosaic == 3 and cfg.cache == "ram"


def test_the_console_script_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "siimcovid", "prepare", "n_folds=abc"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "siimcovid: error: prepare setting n_folds='abc': expected int >= 2"


def test_a_bad_value_writes_no_run(tmp_path):
    project = tmp_path / "runs"
    with pytest.raises(ConfigError, match="lr='abc'"):
        cli.main(["classify", "train", "lr=abc", "name=x", f"project={project}"])
    assert not project.exists() or not any(project.rglob("*"))


def test_a_cfg_file_with_a_wrong_type_names_the_file(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("prepare:\n  n_folds: five\n")
    with pytest.raises(ConfigError, match=rf"^prepare setting n_folds='five' in {exp}: expected int >= 2$"):
        load_config("prepare", [f"cfg={exp}"])
    assert load_config("prepare", [f"cfg={exp}", "n_folds=3"]).n_folds == 3  # the command line wins


def test_a_saved_run_config_is_checked_when_given_back(tmp_path):
    cfg = load_config("classify", ["epochs=3"])  # what a run saves: its settings alone (what it learned: apart)
    cfg.save(tmp_path / "config.yaml")
    assert load_config("classify", [f"cfg={tmp_path / 'config.yaml'}"]).epochs == 3
    (tmp_path / "config.yaml").write_text(cfg.to_yaml().replace("epochs: 3", "epochs: three"))
    with pytest.raises(ConfigError, match="classify setting epochs='three' in .*config.yaml: expected int >= 1"):
        load_config("classify", [f"cfg={tmp_path / 'config.yaml'}"])


def test_run_sections_are_checked_by_their_stage():
    with pytest.raises(ConfigError, match=r"^detect setting epochs='abc' in run section detect: expected int >= 1$"):
        load_config("run", ["detect.epochs=abc"])  # at load, as the stage checks it: before any work
    with pytest.raises(ConfigError, match=r"^run setting detect=3: expected a mapping of detect settings$"):
        load_config("run", ["detect=3"])
    cfg = load_config("run", ["classify.epochs=3.0", "detect.cos_lr=true"])
    assert cfg.classify["epochs"] == 3 and type(cfg.classify["epochs"]) is int  # checked values, coerced
    assert cfg.detect["cos_lr"] is True and cfg.classify["model"] == "resnet10t"  # Ultralytics' keys; the rest kept


def test_runtime_and_fusion_keys():
    from siimcovid.config import fusion_keys, runtime_keys, schema

    keys = runtime_keys("classify")
    assert {"device", "workers", "name", "project", "resume", "tta", "split"} <= keys and "lr" not in keys
    assert {"device", "workers", "plots", "data"} <= runtime_keys("detect") and "epochs" not in runtime_keys("detect")
    assert schema("classify").keys("predict") == {
        "run", "split", "tta", "view_fusion", "weights", "ensemble", "out", "source", "allow_unfinished", "reuse",
        "per_fold", "precision",
    }  # fmt: skip
    assert "precision" in runtime_keys("classify") and "precision" in runtime_keys("detect")  # never a changed run
    expected = [
        "det_weights", "det_scale", "cls_weights", "cls_ensemble", "iou_thr", "skip_box_thr", "conf_type", "none_source",
        "none_det", "none_cls_weight", "none_blend", "none_model_weight", "none_model_weights", "opacity_exponent",
        "negative_none_weight",
    ]  # fmt: skip
    assert fusion_keys() == expected
    from siimcovid.fuse.pipeline import FUSION_KEYS

    assert sorted(fusion_keys()) == sorted(FUSION_KEYS)


def test_help_shows_the_specs(capsys):
    cli.main(["classify", "help"])
    assert "# {float > 0} peak lr of the first wave" in capsys.readouterr().out


def test_a_key_without_a_spec_is_an_error(tmp_path, monkeypatch):
    from siimcovid import config

    monkeypatch.setattr(config, "CFG_DIR", tmp_path)
    config.schema.cache_clear()
    try:
        (tmp_path / "shared.yaml").write_text("")  # no shared settings
        (tmp_path / "demo.yaml").write_text("a: 1  # {int >= 0} fine\nb: 2  # no spec here\n")
        with pytest.raises(ConfigError, match="'b' has no type spec"):
            config.schema("demo")
        (tmp_path / "demo.yaml").write_text("a: 1  # {int >= 0; nightly} an unknown tag\n")
        with pytest.raises(ConfigError, match="unknown tag"):
            config.schema("demo")
    finally:
        config.schema.cache_clear()


def test_a_registry_kind_is_a_choice_list():
    from siimcovid import registry

    registry.register("config_test_kind", "alpha", "a")(lambda: None)
    assert checked("@config_test_kind", "alpha") == "alpha" and checked("@config_test_kind", "a") == "a"
    with pytest.raises(ConfigError, match="expected one of alpha, a"):
        checked("@config_test_kind", "beta")


def test_a_settings_file_whose_aliases_expand_into_billions_is_refused_at_once(tmp_path):
    """A few hundred bytes: 9 levels of 9 aliases are 9**9 values once expanded (every check and message walks them)."""
    lines, prev = ["epochs:", "  - &a [x, x, x, x, x, x, x, x, x]"], "a"
    for name in "bcdefghi":
        lines.append(f"  - &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
        prev = name
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="bomb.yaml: its aliases expand into more than 1,000,000 values"):
        load_config("classify", {"cfg": str(tmp_path / "bomb.yaml")})
    (tmp_path / "shared.yaml").write_text("lr: &l 0.002\nfine_lr: [*l]\n")  # an ordinary alias is fine
    assert load_config("classify", {"cfg": str(tmp_path / "shared.yaml")}).fine_lr == [0.002]
