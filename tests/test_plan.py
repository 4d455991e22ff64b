"""predict's runtime plan (siimcovid.predict.plan): each member timed on a few images, the projection logged and
recorded, budget= stopping before the members run with the cuts that fit."""

from __future__ import annotations

import pytest
import yaml

from siimcovid.predict.plan import FEWER, Cost, cuts, fitting
from siimcovid.utils import SiimError


def test_the_cuts_are_measured_savings_and_the_smallest_that_fits_comes_first():
    det = Cost("detect/x", folds=5, load=2.0, per_image=1.0, per_image_no_tta=0.5)
    cls = Cost("classify/b5", folds=5, load=1.0, per_image=0.4, per_image_no_tta=None, per_image_bf16=0.2)
    n = 100
    assert det.seconds(n) == 5 * (2 + 100 * 1.0) and det.seconds(n, folds=4) == 4 * (2 + 100)
    options = dict(cuts([det, cls], n))
    assert options["tta=none (every member)"] == pytest.approx(5 * 100 * 0.5)
    assert options["precision=bf16 (this CPU computes it)"] == pytest.approx(5 * 100 * 0.2)
    assert options[f"detect/x: {FEWER}"] == pytest.approx(102)
    assert not any("left out" in k for k in options)  # the only detector and the only classifier stay
    assert [s for _, s in cuts([det, cls], n)] == sorted(options.values(), reverse=True)
    total = det.seconds(n) + cls.seconds(n)  # 510 + 205
    fit = fitting(total, total - 150, cuts([det, cls], n))  # 150 s over: tta=none (250) fits, bf16 (100) does not
    assert fit == ["tta=none (every member)"]
    fit = fitting(total, total - 300, cuts([det, cls], n))  # no cut alone: the largest together (250 + 102)
    assert fit == ["tta=none (every member)", f"detect/x: {FEWER}"]
    assert fitting(total, 10.0, cuts([det, cls], n)) == []  # nothing fits: said so
    halves = [("tta=none (every member)", 50.0), ("precision=bf16 (this CPU computes it)", 50.0)]
    assert fitting(100.0, 20.0, halves) == []  # each halves the time: together a quarter (25 s) is left, not nothing
    assert fitting(100.0, 30.0, halves) == ["tta=none (every member)", "precision=bf16 (this CPU computes it)"]
    other = Cost("classify/b3", folds=5, load=1.0, per_image=0.3, per_image_no_tta=None)
    assert dict(cuts([det, cls, other], n))["classify/b3 left out (export the bundle again without it)"] == pytest.approx(155)
    exported = Cost("detect/x", folds=5, load=2.0, per_image=1.0, per_image_no_tta=0.5, per_image_engine=0.3)
    engine = dict(cuts([exported, cls], n, "backend=auto precision=bf16"))
    assert engine["backend=auto precision=bf16 (the bundle's exported engines)"] == pytest.approx(5 * 100 * 0.7)
    assert not any(k.startswith("backend") for k in options)  # no member with an engine: no such cut


def test_a_budget_without_the_plan_is_refused_before_any_work(tmp_path):
    from siimcovid.cli import call

    with pytest.raises(SiimError, match="budget= is checked against the plan"):
        call("predict", bundle=str(tmp_path / "b"), source=str(tmp_path / "s"), out=str(tmp_path / "o"), plan=False, budget=1)
    assert not (tmp_path / "o").exists()


def test_a_none_model_is_no_second_study_classifier_to_leave_out():
    study = Cost("classify/b5", folds=5, load=1.0, per_image=0.4, per_image_no_tta=None, group="classify")
    none = Cost("classify/none_b7", folds=5, load=1.0, per_image=0.4, per_image_no_tta=None, group="none")
    det = Cost("detect/x", folds=5, load=1.0, per_image=0.4, per_image_no_tta=None)
    assert not any("left out" in what for what, _ in cuts([study, none, det], 10))


@pytest.fixture(scope="module")
def bundle_and_source(tiny_run, synth_root):
    """The session's tiny bundle, and a SIIM root with more test images than the plan times (2 x plan_images)."""
    _, result = tiny_run
    return result["bundle"], synth_root


@pytest.mark.slow
def test_the_plan_times_each_member_and_changes_no_output(bundle_and_source, tmp_path, caplog):
    from siimcovid.cli import call

    bundle, root = bundle_and_source
    planned = call("predict", bundle=str(bundle), source=str(root), out=str(tmp_path / "a"), workers=0, plan_images=2)
    plain = call("predict", bundle=str(bundle), source=str(root), out=str(tmp_path / "b"), workers=0, plan=False)
    assert planned["submission"].read_bytes() == plain["submission"].read_bytes()
    record = yaml.safe_load((tmp_path / "a" / "predict.yaml").read_text())
    assert set(record["plan"]["members"]) == {"detect/e2e", "classify/e2e"} and record["plan"]["projected_hours"] > 0
    assert all(m["s_per_image"] >= 0 and m["folds"] == 2 for m in record["plan"]["members"].values())
    assert "plan" in planned["seconds"] and "plan" not in plain["seconds"]
    assert "projected total" in caplog.text
    # which cuts save time here is timing (a tiny model's TTA costs about nothing): their kinds and signs are not
    kinds = ("tta=none", "precision=bf16", "one fold fewer", "left out")
    assert record["plan"]["cuts"] and all(any(k in cut for k in kinds) for cut in record["plan"]["cuts"])
    assert all(hours >= 0 for hours in record["plan"]["cuts"].values())


@pytest.mark.slow
def test_a_budget_below_the_projection_stops_before_the_members_run(bundle_and_source, tmp_path):
    from siimcovid.cli import call

    bundle, root = bundle_and_source
    out = tmp_path / "over"
    with pytest.raises(SiimError, match=r"over budget=1e-07 h;.*Each cut, measured on this machine"):
        call("predict", bundle=str(bundle), source=str(root), out=str(out), workers=0, plan_images=2, budget=1e-7)
    assert not (out / "detect" / "e2e" / "pred_test.csv").exists() and not (out / "submission.csv").exists()
    assert (out / "prepared" / "meta.csv").is_file()  # prepare ran: a re-run with cuts reuses it
    done = call("predict", bundle=str(bundle), source=str(root), out=str(out), workers=0, plan_images=2, tta="none")
    record = yaml.safe_load((out / "predict.yaml").read_text())
    assert done["submission"].is_file() and "plan" in record  # the same out=, other settings: planned again, then run
    with pytest.raises(SiimError, match="over budget"):  # another tta: the tables are not reused, so the plan checks
        call("predict", bundle=str(bundle), source=str(root), out=str(out), workers=0, plan_images=2, budget=1e-7)


def test_the_engine_cut_names_the_settings_it_changes():
    """The engine cut's label: backend=auto from a torch run, precision=int8 where the bundle holds int8 engines and
    predict did not ask for them, precision=bf16 where only the CPU's precision changes; nothing when there is no cut."""
    import torch

    from siimcovid.predict.members import Hardware
    from siimcovid.predict.plan import engine_cut

    cpu = torch.device("cpu")
    torch_fp32 = Hardware(cpu, 4, 0, True, "fp32", "torch")
    assert engine_cut(torch_fp32, None) == ""
    assert engine_cut(torch_fp32, Hardware(cpu, 4, 0, True, "bf16", "auto")) == "backend=auto precision=bf16"
    assert engine_cut(torch_fp32, Hardware(cpu, 4, 0, True, "bf16", "auto", int8=True)) == "backend=auto precision=int8"
    auto_bf16 = Hardware(cpu, 4, 0, True, "bf16", "auto")
    assert engine_cut(auto_bf16, Hardware(cpu, 4, 0, True, "bf16", "auto", int8=True)) == "precision=int8"
