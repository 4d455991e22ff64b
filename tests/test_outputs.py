"""Outputs never destroy a user's files (siimcovid.outputs, the one rule every writing stage calls).

A stage writes into a folder that is new, empty or its own (it holds the stage's record); anything else is refused in
one line unless overwrite=true, and then only the stage's own files (those its record lists) are replaced or
removed. The root, the home folder and a folder holding the source are refused whatever the settings. Each case
plants a user's file, runs the real command and checks that the file survives.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siimcovid.outputs import Written, check_out, open_out
from siimcovid.utils import SiimError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the rule itself
def test_a_new_an_empty_or_its_own_folder_may_be_written_anything_else_needs_overwrite(tmp_path):
    assert check_out(tmp_path / "new", "rec.yaml") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "rec.yaml")
    own = open_out(tmp_path / "own", "rec.yaml", "test")
    (tmp_path / "own" / "notes.txt").write_text("a user's note beside the stage's files")
    check_out(own.folder, "rec.yaml")  # its own record: a re-run is welcome, the note is not the stage's
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("years of work")
    with pytest.raises(SiimError, match=r"holds files siimcovid did not write \(e.g. thesis.txt\).*overwrite=true") as e:
        check_out(tmp_path / "mine", "rec.yaml")
    assert "\n" not in str(e.value)
    check_out(tmp_path / "mine", "rec.yaml", overwrite=True)


@pytest.mark.parametrize("where", ["root", "home", "parent of the source", "the source"])
def test_the_root_the_home_folder_and_a_folder_holding_the_source_are_refused_even_with_overwrite(where, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    source = tmp_path / "data" / "dicoms"
    source.mkdir(parents=True)
    out = {"root": Path("/"), "home": tmp_path / "home", "parent of the source": source.parent, "the source": source}[where]
    with pytest.raises(SiimError, match="filesystem root|home folder|holds the input") as e:
        check_out(out, "rec.yaml", overwrite=True, sources=[source])
    assert "\n" not in str(e.value)


def test_a_stage_replaces_and_removes_only_what_its_record_lists(tmp_path):
    written = open_out(tmp_path / "out", "rec.yaml", "test")
    ours, theirs = tmp_path / "out" / "pictures" / "a.jpg", tmp_path / "out" / "pictures" / "holiday.jpg"
    theirs.parent.mkdir()
    theirs.write_bytes(b"a user's photo")
    written.claim(ours)
    ours.write_bytes(b"drawn")
    with pytest.raises(SiimError, match="holiday.jpg is not a file siimcovid test wrote"):
        written.claim(theirs)  # even in its own folder: never over a file it did not write
    again = Written(tmp_path / "out", "rec.yaml", "test")  # a re-run reads the record
    assert again.owns(ours) and not again.owns(theirs)
    assert again.remove_all("pictures") == ["pictures/a.jpg"]
    assert not ours.exists() and theirs.read_bytes() == b"a user's photo"
    assert yaml.safe_load((tmp_path / "out" / "rec.yaml").read_text()) == {"files": []}


def test_a_hostile_record_cannot_point_a_removal_outside_its_folder(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.jpg").write_text("keep too")
    out = tmp_path / "out"
    out.mkdir()
    (out / "linked").symlink_to(elsewhere)
    listed = [str(victim), "../victim.txt", "linked/x.jpg"]
    (out / "rec.yaml").write_text(yaml.safe_dump({"files": listed}))
    written = Written(out, "rec.yaml", "test")
    written.remove_all()
    assert victim.read_text() == "keep" and (elsewhere / "x.jpg").read_text() == "keep too"
