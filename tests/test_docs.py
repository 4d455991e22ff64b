"""The documentation site (mkdocs.yml, docs/): its reference is generated from the code (siimcovid.reference), so a
setting or a file format cannot be missing from it; the site builds with --strict (a broken link fails)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siimcovid import reference, tables
from siimcovid.config import schema

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "siimcovid" / "cfg"


def nav_pages(nav) -> set[str]:
    out = set()
    for item in nav:
        for value in item.values() if isinstance(item, dict) else [item]:
            out |= nav_pages(value) if isinstance(value, list) else {value}
    return out


def rows(page: str) -> list[str]:
    """The first cell of each table row of a generated page: the settings, or the columns."""
    return re.findall(r"^\| `([^`]+)` \|", page, re.M)


def test_every_stage_s_defaults_file_has_a_reference_page_in_the_navigation():
    stages = {p.stem for p in CFG.glob("*.yaml")} - {"shared"}  # shared.yaml: written out in each stage's page
    generated = set(reference.pages())
    assert {f"reference/{s}.md" for s in stages} <= generated
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))["nav"]
    assert generated <= nav_pages(nav), sorted(generated - nav_pages(nav))


@pytest.mark.parametrize("stage", reference.configured_stages())
def test_a_stage_s_page_lists_exactly_its_settings_with_their_types_and_defaults(stage):
    page = reference.settings_page(stage)
    settings = schema(stage).settings
    assert rows(page) == list(settings)
    for key, s in settings.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
        assert reference.code(s.spec) in row and s.help.split()[0] in row


def test_a_cell_shows_its_text_as_written():
    """A pipe outside code would split the cell and `<folder>` would vanish as an HTML tag; inside a code span the
    table extension keeps a pipe whole and would show an escape's backslash."""
    assert reference.cell("a | b `x | y` in copies_<folder>.csv") == "a \\| b `x | y` in copies_&lt;folder>.csv"
    assert reference.code("all | int >= 0") == "`all | int >= 0`"
    assert reference.cell("a `b | c") == "a `b \\| c"  # one backtick opens no code span


def test_the_formats_page_lists_every_contract_and_its_columns():
    page = reference.formats_page()
    contracts = {n: t for n, t in vars(tables).items() if isinstance(t, tables.Table) and not n.startswith("_")}
    assert len(contracts) >= 20
    for name, table in contracts.items():
        section = page.split(f"## {name}: ", 1)[1].split("\n## ", 1)[0]
        assert rows(section) == table.names, name


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[docs]'; `make docs` and .ci/run install it)")  # fmt: skip
def test_the_site_builds_strictly_with_the_generated_reference(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    run = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    html = (tmp_path / "site" / "reference" / "serve" / "index.html").read_text()
    assert "max_associations" in html and "11112" in html
    assert (tmp_path / "site" / "search" / "search_index.json").exists()


def test_every_page_is_in_the_navigation_and_every_readme_block_it_shows_exists():
    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages <= nav, sorted(pages - nav)
    assert nav <= pages | set(reference.pages()), sorted(nav - pages - set(reference.pages()))
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for name in re.findall(r'^--8<-- "README.md:([\w-]+)"', page.read_text(), re.M):
            start, end = f"<!-- --8<-- [start:{name}] -->", f"<!-- --8<-- [end:{name}] -->"
            assert start in readme and end in readme and readme.index(start) < readme.index(end), (page, name)


def test_the_demo_range_the_readme_shows_is_the_one_run_compares_with():
    """The range beside the README's table and the one `siimcovid run` prints are one fact (run.yaml's demo_range)."""
    from siimcovid import stages

    lo, hi = stages.stage_config("run", None, {}).demo_range
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- --8<-- [start:demo-range] -->", 1)[1].split("<!-- --8<-- [end:demo-range] -->", 1)[0]
    assert f"inside {lo:.2f}-{hi:.2f} (`demo_range`" in block
    assert '--8<-- "README.md:demo-range"' in (ROOT / "docs" / "get-started" / "demo.md").read_text()
