"""The one config system and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siimcovid import cli
from siimcovid.config import ConfigError, load_config, parse_args

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
    space = load_config("detect", []).space
    cfg = load_config("detect", ["space.mosaic=[0.8,1.0]"])
    assert cfg.space["mosaic"] == [0.8, 1.0] and cfg.space["mixup"] == space["mixup"]
    exp = tmp_path / "e.yaml"
    exp.write_text("space:\n  mixup: [0.0, 0.1]\n")
    cfg = load_config("detect", [f"cfg={exp}", "space.lr0=[0.01,0.02]"])
    assert cfg.space == {"mixup": [0.0, 0.1], "lr0": [0.01, 0.02]}  # the file's mapping replaced the default one


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
            load_config(stage, cfg[section] or {}, extra_ok=cli.EXTRA_KEYS.get(stage, lambda: set())())
