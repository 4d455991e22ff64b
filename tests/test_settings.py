"""One settings layer: shared keys declared once (cfg/shared.yaml), one meaning per name, renamed keys, run's sections."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
import yaml

from siimcovid import cli, config
from siimcovid.config import RENAMED, SHARED, ConfigError, help_text, load_config, schema, stage_spec, worker_processes

STAGES = list(cli.STAGES)


def raw_comment(stage: str, key: str) -> str:
    """The comment of a top-level key in cfg/<stage>.yaml, as written (continuation lines included)."""
    return config._comments(config.default_config_path(stage).read_text())[key]


def use_cfg_dir(folder, monkeypatch):
    """Read the settings files from `folder` instead of siimcovid/cfg."""
    monkeypatch.setattr(config, "CFG_DIR", folder)
    config.schema.cache_clear()
    return folder


@pytest.fixture(autouse=True)
def fresh_schemas():
    """Each test reads the settings files afresh, and leaves no schema of a test's own files behind."""
    config.schema.cache_clear()
    yield
    config.schema.cache_clear()


# ----------------------------------------------------------------------------- declared once
def test_a_shared_key_is_declared_once_and_every_stage_takes_it_from_there():
    shared = schema(SHARED).settings
    users = {key: [st for st in STAGES if key in schema(st).settings] for key in shared}
    assert {"workers", "device", "batch", "half", "engine", "ray_address", "seed", "project", "name"} <= set(shared)
    assert {"gpus_per_fold", "cpus_per_fold", "gpus_per_trial", "cpus_per_trial", "run"} <= set(shared)
    assert all(users.values()), users  # no declaration that no stage uses
    for key, stages in users.items():
        for stage in stages:
            setting = schema(stage).settings[key]
            assert raw_comment(stage, key).startswith("{shared"), (stage, key)  # never a type of its own
            assert setting.spec == stage_spec(shared[key].spec, stage), (stage, key)
            assert setting.tags >= shared[key].tags and setting.help.startswith(shared[key].help), (stage, key)
        for alt in schema(SHARED).settings[key].parsed.alts:  # `alt (stage, ...)` names stages that have the key
            assert set(alt.only) <= set(stages), (key, alt.only, stages)
    assert users["workers"] == ["synth", "prepare", "detect", "classify", "fuse", "pseudo", "predict", "serve"]


def test_a_stage_cannot_give_a_shared_key_a_meaning_of_its_own(tmp_path, monkeypatch):
    cfg_dir = use_cfg_dir(tmp_path, monkeypatch)
    (cfg_dir / "shared.yaml").write_text("workers: 0  # {int >= 0 | null (b)} processes beside the main one\n")
    (cfg_dir / "a.yaml").write_text("workers: 2  # {int >= 1} decoders\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: 'workers' is a shared setting: its spec is \{shared\}"):
        schema("a")
    (cfg_dir / "a.yaml").write_text("threads: 2  # {shared} decoders\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: 'threads' is marked \{shared\}, but shared\.yaml does not declare it"):
        schema("a")
    (cfg_dir / "a.yaml").write_text("batch: 2  # {int >= 1 | -1 (a)} a qualifier outside shared.yaml\n")
    with pytest.raises(ConfigError, match=r"'batch': an alternative for some stages only, `\(stage, \.\.\.\)`, belongs in"):
        schema("a")
    (cfg_dir / "a.yaml").write_text("workers: 2  # {shared; predict} the decoders\n")
    (cfg_dir / "b.yaml").write_text("workers: null  # {shared}\n")
    a, b = schema("a").settings["workers"], schema("b").settings["workers"]
    assert (a.spec, a.tags, a.help) == ("int >= 0", {"predict"}, "processes beside the main one; here: the decoders")
    assert (b.spec, b.default) == ("int >= 0?", None)  # the null alternative is b's: written `?`, as a stage writes it


def test_stage_spec_keeps_the_alternatives_of_that_stage():
    assert stage_spec("int >= 1 | -1 (detect)", "detect") == "int >= 1 | -1"
    assert stage_spec("int >= 1 | -1 (detect)", "classify") == "int >= 1"
    assert stage_spec("name | null (classify, detect)", "detect") == "name?" and stage_spec("name | null (x)", "fuse") == "name"
    assert stage_spec("int >= 0 | list[int >= 0] (detect) | str?", "pseudo") == "int >= 0 | str?"
    with pytest.raises(ConfigError, match=r"^classify setting batch=-1: expected int >= 1$"):
        load_config("classify", ["batch=-1"])  # Ultralytics' AutoBatch: detect's alone
    assert load_config("detect", ["batch=-1"]).batch == -1
    with pytest.raises(ConfigError, match=r"^classify setting device=\[0, 1\]: expected int >= 0 \| str\?$"):
        load_config("classify", ["device=0,1"])  # DDP inside one command: detect's alone (classify: torchrun)
    with pytest.raises(ConfigError, match=r"^fuse setting name=None: expected name"):
        load_config("fuse", {"name": None})


def test_help_writes_out_each_shared_key_as_its_stage_takes_it(capsys, tmp_path, monkeypatch):
    """`siimcovid <stage> help` is a settings file of its own: read back without shared.yaml, it has the same keys,
    defaults, types, tags and meanings as the stage."""
    texts = {stage: help_text(stage) for stage in STAGES}
    expected = {stage: schema(stage).settings for stage in STAGES}
    cli.main(["detect", "help"])
    printed = capsys.readouterr().out
    assert re.search(r"^batch: 16 +# \{int >= 1 \| -1\} images per step", printed, re.M) and "{shared" not in printed
    assert re.search(r"^batch: 16 +# \{int >= 1\} images per step.*; here: train and predict", texts["classify"], re.M | re.S)
    cfg_dir = use_cfg_dir(tmp_path, monkeypatch)
    (cfg_dir / "shared.yaml").write_text("")
    for stage, text in texts.items():
        (cfg_dir / f"{stage}.yaml").write_text(text)
        for key, want in expected[stage].items():
            got = schema(stage).settings[key]
            assert (got.default, got.spec, got.tags) == (want.default, want.spec, want.tags), (stage, key)
            assert got.help.split() == want.help.split(), (stage, key)


# ----------------------------------------------------------------------------- one meaning per name
def test_workers_0_is_the_main_process_and_null_one_per_core_in_every_stage(monkeypatch):
    from siimcovid.data import prepare, synth
    from siimcovid.fuse.wbf import resolve_workers

    assert worker_processes(None) == (os.cpu_count() or 1) and worker_processes(0) == 0 and worker_processes(3) == 3
    assert resolve_workers(0) == 1 and resolve_workers(None) == (os.cpu_count() or 1)  # 1 WBF job: no pool
    for stage in ("prepare", "synth", "fuse"):  # their 0 was "all cores": their default is now null, the same effect
        assert schema(stage).settings["workers"].default is None
    for stage in ("detect", "classify", "pseudo"):  # their 0 always was the main process (the DataLoader's)
        assert load_config(stage, ["workers=0"]).workers == 0

    def no_pool(*args, **kwargs):
        raise AssertionError("workers=0 started a process pool")

    monkeypatch.setattr(prepare, "ProcessPoolExecutor", no_pool)
    monkeypatch.setattr(synth.mp, "get_context", no_pool)
    assert list(prepare.run_jobs([{"n": 1}, {"n": 2}], 0, "test", convert=lambda job: job["n"] * 10)) == [10, 20]
    done = []
    synth.write_all([1, 2], done.append, 0, "test")
    assert done == [1, 2]


@pytest.mark.parametrize("stage, old, new", [(st, old, new) for st, names in RENAMED.items() for old, new in names.items()])
def test_an_old_name_is_one_error_that_says_the_new_one(stage, old, new, tmp_path):
    known = schema(stage).settings
    assert new in known and old not in known
    value = known[new].default
    with pytest.raises(ConfigError, match=rf"^{stage} setting '{old}' in the command line is now called '{new}'$"):
        load_config(stage, [f"{old}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump({old: value}))
    with pytest.raises(ConfigError, match=rf"^{stage} setting '{old}' in {saved} is now called '{new}'$"):
        load_config(stage, [f"cfg={saved}"])  # a settings file saved before the rename
    if stage == "detect":
        saved.write_text(yaml.safe_dump({"detect_predict": {"tta": False, old: value}}))
        with pytest.raises(ConfigError, match=rf"^{stage} setting '{old}' in run section detect_predict of {saved} is"):
            load_config("run", [f"cfg={saved}"])


def test_a_dotted_old_name_says_the_new_one():
    with pytest.raises(ConfigError, match=r"^detect setting 'space\.mosaic' in the command line is now called 'ranges\.mosaic'$"):
        load_config("detect", ["space.mosaic=[0.5,1.0]"])


def test_the_prepared_paths_module_is_not_named_like_the_input_layouts():
    from siimcovid.data.prepared_paths import image_file

    assert str(image_file("p", 512, "train", "a", "png")) == "p/512/images/train/a.png"
    assert importlib.util.find_spec("siimcovid.data.layout") is None  # layouts.py: the input formats


# ----------------------------------------------------------------------------- run.yaml's sections
def test_a_run_section_is_checked_at_load_naming_the_section_and_the_key(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"classify": {"model": "resnet10t", "epoch": 3}}))
    with pytest.raises(
        ConfigError, match=rf"^unknown classify setting 'epoch' \(did you mean 'epochs'\?\) in run section classify of {exp}\."
    ):
        load_config("run", [f"cfg={exp}"])
    exp.write_text(yaml.safe_dump({"fuse": {"iou_thr": 1.5}}))
    with pytest.raises(ConfigError, match=rf"^fuse setting iou_thr=1\.5 in run section fuse of {exp}: expected float 0\.\.1$"):
        load_config("run", [f"cfg={exp}"])
    with pytest.raises(ConfigError, match=r"^prepare setting sizes=16 in run section prepare: expected list\[int 32\.\.8192\]$"):
        load_config("run", ["prepare.sizes=16"])
    with pytest.raises(ConfigError, match=r"^run section detect: detect setting cos_lr='maybe' \(an Ultralytics setting\): "):
        load_config("run", ["detect.cos_lr=maybe"])
    cfg = load_config("run", ["pseudo.rounds=2.0", "prepare.sizes=256", "synth=null"])
    assert cfg.pseudo == {"rounds": 2} and type(cfg.pseudo["rounds"]) is int and cfg.prepare["sizes"] == [256]
    assert cfg.synth is None and cfg.prepare["n_folds"] == 5  # the demo's section, one key changed


def test_the_run_yaml_a_run_saves_is_a_valid_cfg(tmp_path):
    cfg = load_config("run", ["detect.epochs=3", "classify_predict.tta=false", "pseudo.rounds=1"])
    cfg.save(tmp_path / "run.yaml")
    assert load_config("run", [f"cfg={tmp_path / 'run.yaml'}"]) == cfg


def test_a_classifiers_tta_is_a_view_name_and_true_false_still_read(tmp_path):
    from siimcovid.bundle.members import classifier_tta

    assert load_config("classify", {}).tta == "hflip" and load_config("detect", {}).tta is True
    assert load_config("classify", ["tta=d4"]).tta == "d4" and load_config("classify", ["tta=false"]).tta is False
    (tmp_path / "old.yaml").write_text("cls_tta: none\n")
    assert load_config("pseudo", [f"cfg={tmp_path / 'old.yaml'}"]).cls_tta == "none"
    with pytest.raises(ConfigError, match=r"^classify setting tta='d8': expected none \| hflip \| vflip \| d4 \| bool"):
        load_config("classify", ["tta=d8"])
    assert classifier_tta(True, "x") == "hflip" and classifier_tta(False, "x") == "none"  # a bundle of tta on / off
    assert classifier_tta("hflip", "x") == "hflip" and classifier_tta("vflip", "x") == "vflip"
