"""A bundle from a stranger cannot run code, fill the disk or hang predict; a signed one cannot be changed unseen.

The bundles are the fast ones of tests/test_bundle.py (hand-built runs of small real checkpoints, exported), made
hostile the way an attacker would: a payload whose unpickling writes a marker file, placed where a loader could
run it, and the manifest's checksums recomputed so that every plain check passes. Each test checks that the
bundle is refused (or the payload ignored) and that the marker never appears.
"""

# ruff: noqa: F811  (bundle, runs, yolo_checkpoint: fixtures of test_bundle.py, imported, then test arguments)
from __future__ import annotations

import hashlib
import os
import signal
import stat
import zipfile
from pathlib import Path

import pytest
import yaml
from test_bundle import bundle, export, runs, yolo_checkpoint  # noqa: F401  (fixtures)

from siimcovid.bundle import MANIFEST, open_bundle
from siimcovid.cli import call
from siimcovid.signing import SIGNATURE
from siimcovid.utils import SiimError


class Payload:
    """Unpickling it runs os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo PWNED > {self.marker}",))


def relist(bundle: Path, *rels: str) -> None:
    """Recompute the manifest entries of the files `rels` (added or changed), as an attacker would."""
    data = yaml.safe_load((bundle / MANIFEST).read_text())
    for rel in rels:
        body = (bundle / rel).read_bytes()
        data["files"][rel] = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    (bundle / MANIFEST).write_text(yaml.safe_dump(data, sort_keys=False))


def edit_yaml(bundle: Path, rel: str, change) -> None:
    data = yaml.safe_load((bundle / rel).read_text())
    change(data)
    (bundle / rel).write_text(yaml.safe_dump(data, sort_keys=False))
    relist(bundle, rel)


def zipped(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(folder).as_posix())
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SIIMCOVID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_hang():
    """Fail a test that blocks (a read of a FIFO or /dev/zero) instead of hanging the suite."""

    def alarm(*_):
        raise TimeoutError("blocked for 60 s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- no code runs
@pytest.mark.parametrize("member", ["classify/x/fold0.safetensors", "detect/x/fold1.safetensors"])
@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_a_pickle_in_place_of_weights_is_refused_and_never_run(bundle, member, as_zip, tmp_path, cache):
    import torch

    marker = tmp_path / "marker"
    torch.save({"model": {}, "x": Payload(marker)}, bundle / member)  # the attack on format 1, on format 2's files
    relist(bundle, member)
    (tmp_path / "dicoms").mkdir()
    target = zipped(bundle, tmp_path / "evil.zip") if as_zip else bundle
    with pytest.raises(SiimError, match=rf"{member}: not a readable safetensors file"):
        call("predict", bundle=str(target), source=str(tmp_path / "dicoms"), out=str(tmp_path / "out"))
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rel", ["classify/x/fold0.pt", "evil.pt", "detect/y/fold0.safetensors"])
def test_a_file_listed_beside_the_bundles_own_is_refused(bundle, rel, tmp_path):
    import torch

    marker = tmp_path / "marker"
    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": Payload(marker)}, bundle / rel)
    relist(bundle, rel)
    with pytest.raises(SiimError, match=rf"bundle {bundle}: {rel}: (not a file of a bundle|detect/y/ is not a member)"):
        open_bundle(bundle)
    assert not marker.exists()


def test_the_check_is_what_stops_an_ultralytics_yaml_from_running_code(bundle, tmp_path):
    """Control: Ultralytics itself evals a model YAML's `activation`, so the description check is load-bearing."""
    import copy

    from ultralytics.nn.tasks import DetectionModel

    marker = tmp_path / "marker"
    arch = copy.deepcopy(yaml.safe_load((bundle / "detect/x/model.yaml").read_text())["yaml"])
    arch["activation"] = f"__import__('os').system('echo PWNED > {marker}') or nn.SiLU()"
    DetectionModel(copy.deepcopy(arch), verbose=False)  # what loading a bundle without the check would do
    assert marker.exists()
    marker.unlink()
    edit_yaml(bundle, "detect/x/model.yaml", lambda d: d["yaml"].update(activation=arch["activation"]))
    with pytest.raises(SiimError, match=r"detect/x/model.yaml: activation .* is not of the form nn.<Activation>\(literal"):
        open_bundle(bundle)
    assert not marker.exists()


@pytest.mark.parametrize(
    "layer, message",
    [
        ("torch_safe_load", "names 'torch_safe_load', not a model layer"),  # a function of Ultralytics' tasks module
        ("TorchVision", "names 'TorchVision', not a model layer"),  # loads torchvision weights (the network)
        ("nn.functional", "names 'nn.functional', not a model layer"),
    ],
)
def test_a_detector_description_naming_anything_but_a_layer_is_refused(bundle, layer, message):
    edit_yaml(bundle, "detect/x/model.yaml", lambda d: d["yaml"]["head"][-2].__setitem__(2, layer))
    with pytest.raises(SiimError, match=rf"bundle {bundle}: detect/x/model.yaml: layer \d+ {message}"):
        open_bundle(bundle)


def test_descriptions_that_would_fetch_or_blow_up_are_refused(bundle):
    edit_yaml(bundle, "classify/x/model.yaml", lambda d: d.update(model="hf-hub:someone/evil"))
    with pytest.raises(SiimError, match="classify/x/model.yaml: model 'hf-hub:someone/evil' is not a timm model"):
        open_bundle(bundle)
    edit_yaml(bundle, "classify/x/model.yaml", lambda d: d.update(model="test_efficientnet", pretrained_file="/x"))
    with pytest.raises(SiimError, match=r"unknown key\(s\) \['pretrained_file'\]"):
        open_bundle(bundle)
    edit_yaml(bundle, "classify/x/model.yaml", lambda d: d.pop("pretrained_file"))
    edit_yaml(bundle, "detect/x/model.yaml", lambda d: d["yaml"]["backbone"][0][3].__setitem__(0, 10**9))
    with pytest.raises(SiimError, match="layer 0: an argument above 100000"):
        open_bundle(bundle)


def test_weights_that_do_not_fit_the_description_are_an_error_not_a_guess(bundle):
    import torch

    from siimcovid import weights

    member = open_bundle(bundle).classifiers[0]
    other = {**member.model, "model": "resnet10t"}
    with pytest.raises(SiimError, match=r"t: the weights do not fit the model its model.yaml describes \(\d+ missing"):
        weights.classifier(weights.check_description(other, "classify", "t"), member.weights[0], "t", torch.device("cpu"))


def test_bundle_yaml_with_aliases_or_unknown_keys_is_refused(bundle):
    (bundle / "fuse.yaml").write_text("a: &a [1, 1, 1]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n")
    relist(bundle, "fuse.yaml")
    with pytest.raises(SiimError, match=r"fuse.yaml is not valid YAML \(an anchor or alias"):
        open_bundle(bundle)


@pytest.mark.parametrize(
    "rel, change, message",
    [
        ("fuse.yaml", lambda d: d.update(det=["../../escape"]), r"fuse.yaml: det: \['../../escape'\] is not a list of"),
        ("fuse.yaml", lambda d: d.update(iou_thr="a lot"), "fuse.yaml: fuse setting iou_thr='a lot'"),
        ("prepare.yaml", lambda d: d.update(sizes=[10**20]), "prepare.yaml: prepare setting sizes="),
        ("detect/x/settings.yaml", lambda d: d.update(ultralytics={"save": 1}), "detect/x/settings.yaml: ultralytics: unknown"),
        ("detect/x/settings.yaml", lambda d: d.update(conf="high"), "detect/x/settings.yaml: detect setting conf=.high."),
        ("classify/x/settings.yaml", lambda d: d.update(imgsz=-1), "classify/x/settings.yaml: classify setting imgsz=-1"),
    ],
)
def test_every_setting_a_bundle_holds_is_typed_as_the_stages_type_it(bundle, rel, change, message):
    edit_yaml(bundle, rel, change)
    with pytest.raises(SiimError, match=rf"bundle {bundle}: {message}"):
        open_bundle(bundle)


def test_a_manifest_path_outside_the_bundle_is_refused(bundle):
    edit_yaml(bundle, MANIFEST, lambda d: d["files"].update({"../outside": {"sha256": "0" * 64, "bytes": 0}}))
    with pytest.raises(SiimError, match=r"lists '../outside', which is not a path inside the bundle"):
        open_bundle(bundle)


# ----------------------------------------------------------------------------- no hang, no flood
@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo"])
def test_a_link_or_a_pipe_in_a_bundle_folder_is_refused_without_reading_it(bundle, kind, no_hang):
    path = bundle / "detect/x/fold0.safetensors"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(SiimError, match="detect/x/fold0.safetensors is not a regular file or folder"):
        open_bundle(bundle)


def test_a_zip_is_checked_entry_by_entry_and_nothing_unlisted_reaches_the_cache(bundle, tmp_path, cache):
    out = zipped(bundle, tmp_path / "extra.zip")
    with zipfile.ZipFile(out, "a", zipfile.ZIP_STORED) as zf:
        zf.writestr("detect/x/extra.bin", b"\0" * 1000)
    with pytest.raises(SiimError, match="detect/x/extra.bin is not listed in manifest.yaml: not extracting it"):
        open_bundle(out)
    assert not cache.exists() or not any(cache.rglob("*"))


def test_a_zip_bomb_is_refused_unread_even_when_listed_with_its_true_size(bundle, tmp_path, cache):
    (bundle / "detect/x/fold0.safetensors").write_bytes(b"\0" * (64 << 20))  # 64 MB of zeros, listed as they are
    relist(bundle, "detect/x/fold0.safetensors")
    out = tmp_path / "bomb.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(bundle).as_posix())
    assert out.stat().st_size < 16 << 20
    with pytest.raises(SiimError, match="is compressed or encrypted in the zip: a bundle's zip stores its files"):
        open_bundle(out)
    assert not cache.exists() or not any(cache.rglob("*"))


def test_with_trust_a_zip_signed_by_another_key_is_refused_before_extraction(runs, tmp_path, cache):
    other = call("keygen", out=str(tmp_path / "other"))
    mine = call("keygen", out=str(tmp_path / "mine"))
    out = export(runs, pipeline="x", out=str(tmp_path / "b.zip"), sign=str(other["private"]))
    with pytest.raises(SiimError, match="which trust=.* does not hold"):
        open_bundle(out, trust=mine["public"])
    assert not cache.exists() or not any(cache.rglob("*"))
    assert open_bundle(out, trust=other["public"]).classifiers and any(cache.iterdir())


def test_a_bundle_refused_after_extraction_leaves_nothing_in_the_cache(bundle, tmp_path, cache):
    edit_yaml(bundle, "fuse.yaml", lambda d: d.update(iou_thr="a lot"))
    with pytest.raises(SiimError, match="fuse setting iou_thr='a lot'"):
        open_bundle(zipped(bundle, tmp_path / "b.zip"))
    assert not cache.exists() or not any(cache.iterdir())


def test_a_cache_entry_not_made_from_the_zip_is_refused(runs, bundle, tmp_path, cache):
    import shutil

    out = export(runs, pipeline="x", out=str(tmp_path / "x.zip"))
    entry = cache / hashlib.sha256(out.read_bytes()).hexdigest()
    other = export(runs, pipeline="x", out=str(tmp_path / "other"), fp16_weights=True)  # another bundle, same names
    cache.mkdir()
    shutil.copytree(other, entry)  # planted where the zip would be extracted
    with pytest.raises(SiimError, match="holds another manifest than the zip: delete it"):
        open_bundle(out)
    shutil.rmtree(entry)
    entry.write_text("not a folder")
    with pytest.raises(SiimError, match="is not a folder siimcovid extracted: delete it"):
        open_bundle(out)
    entry.unlink()
    assert open_bundle(out).root == entry


def test_weights_changed_after_the_checks_are_refused_when_loaded(runs, keys, tmp_path):
    import torch

    from siimcovid import weights

    signed = export(runs, pipeline="x", out=str(tmp_path / "signed"), sign=str(keys["private"]))
    member = open_bundle(signed, trust=keys["public"]).classifiers[0]
    path = member.weights[0]
    other = export(runs, pipeline="x", out=str(tmp_path / "other"))  # same architecture, fold 1's weights under fold 0's name
    path.write_bytes((other / "classify/x/fold1.safetensors").read_bytes())
    with pytest.raises(SiimError, match="fold0.safetensors changed after the bundle was checked"):
        weights.classifier(member.model, path, str(path), torch.device("cpu"), sha256=member.digests[0])


def test_a_description_that_would_allocate_without_bound_is_refused_before_any_memory(bundle):
    edit_yaml(bundle, "detect/x/model.yaml", lambda d: d["yaml"]["backbone"][0][3].__setitem__(0, "100000"))  # a string
    with pytest.raises(SiimError, match="detect/x/fold0.safetensors: the weights do not fit the model its model.yaml"):
        open_bundle(bundle)
    edit_yaml(bundle, "detect/x/model.yaml", lambda d: d["yaml"]["backbone"][0][3].__setitem__(0, 64))
    edit_yaml(bundle, "detect/x/model.yaml", lambda d: d["yaml"].update(activation="nn.Linear(100000, 100000)"))
    with pytest.raises(SiimError, match=r"activation 'nn.Linear\(100000, 100000\)' is not of the form nn.<Activation>"):
        open_bundle(bundle)  # 40 GB of weights in every Conv: an activation is element-wise
    edit_yaml(bundle, "detect/x/model.yaml", lambda d: d["yaml"].pop("activation"))
    upsample = next(i for i, layer in enumerate(yaml.safe_load((bundle / "detect/x/model.yaml").read_text())["yaml"]["head"])
                    if layer[2] == "nn.Upsample")  # fmt: skip
    edit_yaml(bundle, "detect/x/model.yaml", lambda d: d["yaml"]["head"][upsample][3].__setitem__(1, 1000))
    with pytest.raises(SiimError, match="nn.Upsample enlarges by 1000: at most 8"):  # no weights: only this check sees it
        open_bundle(bundle)
    edit_yaml(bundle, "detect/x/model.yaml", lambda d: d["yaml"]["head"][upsample][3].__setitem__(1, 2))
    edit_yaml(bundle, "classify/x/model.yaml", lambda d: d.update(model="vit_7b_patch16_dinov3"))  # 27 GB in fp32
    with pytest.raises(SiimError, match="classify/x/fold0.safetensors: the weights do not fit"):
        open_bundle(bundle)


def test_a_classifier_that_cannot_run_at_the_bundles_image_size_is_refused_at_open(bundle):
    from siimcovid import weights
    from siimcovid.classify.model import build_model

    desc = {"family": "timm", **yaml.safe_load((bundle / "classify/x/model.yaml").read_text()), "model": "test_vit3"}
    desc.pop("family")
    state = build_model(desc).state_dict()  # a fixed 160 px input; the bundle predicts at 64 px
    for k in (0, 1):
        weights.save_state(state, bundle / f"classify/x/fold{k}.safetensors")
    relist(bundle, "classify/x/fold0.safetensors", "classify/x/fold1.safetensors")
    edit_yaml(bundle, "classify/x/model.yaml", lambda d: d.update(model="test_vit3"))
    with pytest.raises(SiimError, match="classify/x/fold0.safetensors: its model does not run on 64 px images"):
        open_bundle(bundle)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["files"].update({"detect/x/settings.yaml/x": {"sha256": "0" * 64, "bytes": 1}}), "as a file and as a"),
        (lambda d: d["files"].update({"/".join(["a" * 190] * 8): {"sha256": "0" * 64, "bytes": 1}}), "not a path inside"),
        (lambda d: d.update(junk=[0] * 10), r"manifest.yaml: unknown key\(s\) \['junk'\]"),
    ],
)
def test_manifest_tricks_are_one_line_errors(bundle, change, message):
    edit_yaml(bundle, MANIFEST, change)
    with pytest.raises(SiimError, match=message):
        open_bundle(bundle)


def test_prepare_sizes_the_members_do_not_read_and_classes_they_do_not_have_are_refused(bundle):
    edit_yaml(bundle, "prepare.yaml", lambda d: d.update(sizes=list(range(32, 600))))
    with pytest.raises(SiimError, match=r"prepare.yaml: sizes \[32, 33.*but its members read \[64\]"):
        open_bundle(bundle)
    edit_yaml(bundle, "prepare.yaml", lambda d: d.update(sizes=[64]))
    edit_yaml(bundle, "detect/x/settings.yaml", lambda d: d.update(ultralytics={"classes": [10**30]}))
    with pytest.raises(SiimError, match=r"ultralytics classes=\[.*expected a list of the model's classes \(0 to 0\)"):
        open_bundle(bundle)


def test_a_yaml_file_past_its_limit_is_refused_unparsed(bundle):
    (bundle / "fuse.yaml").write_text("junk: [" + "0, " * 600_000 + "0]\n")  # 1.8 MB: a bundle's fuse.yaml is ~1 KB
    relist(bundle, "fuse.yaml")
    with pytest.raises(SiimError, match="fuse.yaml: larger than 1 MiB, the most a fuse.yaml can be"):
        open_bundle(bundle)


def test_a_zip_entry_of_another_size_than_listed_is_refused_before_extraction(bundle, tmp_path, cache):
    (bundle / "prepare.yaml").write_text((bundle / "prepare.yaml").read_text() + "# one more line\n")
    out = zipped(bundle, tmp_path / "b.zip")  # the manifest still lists the old size
    with pytest.raises(SiimError, match="prepare.yaml is corrupt: its size in the zip is not the one manifest.yaml lists"):
        open_bundle(out)
    assert not cache.exists() or not any(cache.rglob("*"))


# ----------------------------------------------------------------------------- signatures
@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    return call("keygen", out=str(tmp_path / "keys" / "team"))


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites_one(keys):
    assert stat.S_IMODE(keys["private"].stat().st_mode) == 0o600 and b"PRIVATE KEY" in keys["private"].read_bytes()
    assert b"PUBLIC KEY" in keys["public"].read_bytes()
    before = keys["private"].read_bytes()
    with pytest.raises(SiimError, match="exists: a key is never overwritten"):
        call("keygen", out=str(keys["private"].with_suffix("")))
    assert keys["private"].read_bytes() == before


def test_a_signed_bundle_opens_with_its_key_and_names_the_file_changed_after_signing(runs, keys, tmp_path, caplog):
    signed = export(runs, pipeline="x", out=str(tmp_path / "signed"), sign=str(keys["private"]))
    assert (signed / SIGNATURE).is_file()
    assert open_bundle(signed, trust=keys["public"]).fusion["iou_thr"] == 0.55
    assert open_bundle(signed, trust=keys["public"].parent).detectors  # a folder of trusted keys
    open_bundle(signed)
    assert "is signed by key" in caplog.text and "not checked: give trust=" in caplog.text
    # the attack the manifest alone cannot see: edit fuse.yaml, recompute its checksum
    edit_yaml(signed, "fuse.yaml", lambda d: d.update(iou_thr=0.9))
    open_bundle(signed)  # without trust= the checksums agree...
    with pytest.raises(SiimError, match=r"fuse.yaml changed after the bundle was signed by key [0-9a-f]{16}"):
        open_bundle(signed, trust=keys["public"])  # ...with it, the change is named


def test_trust_refuses_an_unsigned_bundle_another_key_and_a_forged_signature(runs, bundle, keys, tmp_path, caplog):
    with pytest.raises(SiimError, match=f"bundle {bundle} is not signed, and trust=.* asks for a signature by key"):
        open_bundle(bundle, trust=keys["public"])
    open_bundle(bundle)
    assert f"bundle {bundle} is unsigned" in caplog.text
    other = call("keygen", out=str(tmp_path / "other"))
    signed = export(runs, pipeline="x", out=str(tmp_path / "signed"), sign=str(other["private"]))
    with pytest.raises(SiimError, match=r"signed by key [0-9a-f]{16}, which trust=.* does not hold"):
        open_bundle(signed, trust=keys["public"])
    forged = yaml.safe_load((signed / SIGNATURE).read_text())
    forged["signed"]["files"]["fuse.yaml"] = "0" * 64  # vouch for another fuse.yaml, keeping the signature
    (signed / SIGNATURE).write_text(yaml.safe_dump(forged))
    with pytest.raises(SiimError, match="signature.yaml does not verify with key"):
        open_bundle(signed, trust=other["public"])


def test_predict_with_trust_refuses_before_any_work(bundle, keys, tmp_path):
    (tmp_path / "dicoms").mkdir()
    with pytest.raises(SiimError, match="is not signed, and trust="):
        call("predict", bundle=str(bundle), source=str(tmp_path / "dicoms"), out=str(tmp_path / "out"), trust=str(keys["public"]))
    assert not (tmp_path / "out").exists()


def test_an_openssh_public_key_is_a_trusted_key(runs, keys, tmp_path):
    from cryptography.hazmat.primitives import serialization

    from siimcovid.signing import private_key

    public = private_key(keys["private"]).public_key()
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "id_ed25519.pub").write_bytes(ssh + b" someone@host\n")
    signed = export(runs, pipeline="x", out=str(tmp_path / "signed"), sign=str(keys["private"]))
    assert open_bundle(signed, trust=tmp_path / "id_ed25519.pub").classifiers


# ----------------------------------------------------------------------------- pickles named on the command line
def test_a_classify_init_from_elsewhere_is_read_as_weights_only(tmp_path, runs):
    import torch

    from siimcovid.classify.model import init_weights

    marker = tmp_path / "marker"
    evil = tmp_path / "best.pt"
    torch.save({"model": {}, "x": Payload(marker)}, evil)
    with pytest.raises(SiimError, match=f"init={evil}: holds Python objects besides weights"):
        init_weights(evil)
    assert not marker.exists()
    state, model_cfg = init_weights(runs / "classify/x/fold0/best.pt")  # a run's own best.pt: weights and plain data
    assert state and model_cfg["model"] == "test_efficientnet"


def test_a_detector_pt_from_elsewhere_is_named_as_a_pickle(tmp_path, runs, yolo_checkpoint, caplog):  # noqa: F811
    import shutil

    from siimcovid.config import load_config
    from siimcovid.detect.common import check_model
    from siimcovid.engine.family import family_class
    from siimcovid.engine.folds import resolve_init

    check_model(str(runs / "detect/x/fold0/weights/best.pt"))  # a run's own checkpoint
    yolo = family_class("yolo", "detect")(load_config("detect", {}))
    yolo.check_init(resolve_init(yolo, str(runs / "detect/x"), 0))
    assert "is a pickle" not in caplog.text
    foreign = Path(shutil.copy(yolo_checkpoint, tmp_path / "downloaded.pt"))
    check_model(str(foreign))
    assert f"model={foreign} is a pickle (as every Ultralytics .pt is): loading it runs any code it holds" in caplog.text


# ----------------------------------------------------------------------------- export never replaces what is not a bundle
def test_export_overwrite_replaces_only_a_bundle_and_never_a_folder_holding_the_runs(runs, bundle, tmp_path):
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(SiimError, match=r"documents exists and is not a bundle as export writes one .*: overwrite=true"):
        export(runs, pipeline="x", out=str(mine), overwrite=True)
    assert (mine / "thesis.txt").read_text() == "years of work"
    (tmp_path / "notes.zip").write_bytes(b"not a zip of a bundle")
    with pytest.raises(SiimError, match="notes.zip exists and is not a bundle"):
        export(runs, pipeline="x", out=str(tmp_path / "notes.zip"), overwrite=True)
    with pytest.raises(SiimError, match="holds the input"):  # replacing runs/ (or a folder above it) would delete them
        export(runs, pipeline="x", out=str(runs), overwrite=True)
    assert (runs / "run/x/run.yaml").is_file()
    (mine / MANIFEST).write_text("apiVersion: v1\n")  # a folder that merely holds a file of that name
    with pytest.raises(SiimError, match="documents exists and is not a bundle"):
        export(runs, pipeline="x", out=str(mine), overwrite=True)
    assert (mine / "thesis.txt").read_text() == "years of work"
    (bundle / "notes.txt").write_text("mine")  # a bundle with a user's notes added: not replaced either
    with pytest.raises(SiimError, match="exists and is not a bundle"):
        export(runs, pipeline="x", out=str(bundle), overwrite=True)
    (bundle / "notes.txt").unlink()
    assert export(runs, pipeline="x", out=str(bundle), overwrite=True) == bundle  # a bundle: replaced


def test_deep_nesting_and_a_malformed_signature_are_one_line_and_leave_no_cache(bundle, tmp_path, cache):
    fusion = (bundle / "fuse.yaml").read_text()
    (bundle / "fuse.yaml").write_text("a: " + "[" * 600 + "]" * 600 + "\n")  # the Python parser's recursion: 1000
    relist(bundle, "fuse.yaml")
    with pytest.raises(SiimError, match="fuse.yaml nests deeper than 32 levels"):
        open_bundle(bundle)
    (bundle / "fuse.yaml").write_text(fusion)
    relist(bundle, "fuse.yaml")
    (bundle / SIGNATURE).write_text("algorithm: ed25519\nkey: 0\n")  # YAML, but no signature
    with pytest.raises(SiimError, match="signature.yaml is not a siimcovid signature"):
        open_bundle(zipped(bundle, tmp_path / "b.zip"))
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("out", [".", "/", "..", "keys/", "keys", "/dev/null"])
def test_keygen_needs_a_new_file_name(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys").mkdir()
    with pytest.raises(SiimError, match="names no new file .*: give a path ending in a new name"):
        call("keygen", out=out)
    assert not any((tmp_path / "keys").iterdir()) and not list(tmp_path.glob("*.key"))


def test_a_pretrained_file_that_names_code_is_refused_before_timm_loads_it(tmp_path):
    import torch

    from siimcovid.classify.model import build_model

    marker = tmp_path / "marker"
    torch.save({"state_dict": {}, "x": Payload(marker)}, tmp_path / "weights.pth")
    cfg = {"model": "test_efficientnet", "in_chans": 3, "drop_rate": 0.0, "drop_path_rate": 0.0, "mask_stride": 16}
    with pytest.raises(SiimError, match="pretrained_file=.*weights.pth: holds Python objects besides weights"):
        build_model({**cfg, "none_head": True}, pretrained_file=str(tmp_path / "weights.pth"))
    assert not marker.exists()


def test_the_work_folder_of_an_export_killed_midway_is_removed_by_the_next_one(runs, tmp_path):
    import socket
    import subprocess
    import sys

    from siimcovid.bundle import WORK_MARK

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed, running, mine = (tmp_path / f".b.{k}.tmp" for k in ("killed", "running", "mine"))
    for folder, pid in ((killed, dead.stdout.strip()), (running, os.getpid())):
        (folder / "bundle").mkdir(parents=True)
        (folder / WORK_MARK).write_text(f"{socket.gethostname()} {pid}")
    (mine / "bundle").mkdir(parents=True)  # no mark: a folder export did not make, whatever its name
    export(runs, pipeline="x", out=str(tmp_path / "b"))
    assert not killed.exists() and running.is_dir() and mine.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", running.name, mine.name])
