"""Shared helpers: atomic writes."""

from __future__ import annotations

import os
import stat

import pytest

from siimcovid.utils import as_list, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt") == 0o666 & ~umask


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_temporary_folders_get_the_permissions_of_a_plain_mkdir(tmp_path, umask):
    from siimcovid.utils import temp_dir_beside

    old = os.umask(umask)
    try:
        built = temp_dir_beside(tmp_path / "bundle")  # e.g. a bundle built there, then renamed
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(built) == mode(tmp_path / "plain") == 0o777 & ~umask


def test_a_failed_atomic_write_leaves_nothing(tmp_path):
    from siimcovid.utils import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_as_list():
    assert as_list(None) == [] and as_list("") == [] and as_list(3) == [3] and as_list((1, 2)) == [1, 2]
