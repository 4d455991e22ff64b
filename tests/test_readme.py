"""Every `siimcovid ...` command the README and the documentation site's pages (docs/*.md) show must name real
stages, modes and settings."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from siimcovid import cli
from siimcovid.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def readme_commands(page: Path = README) -> list[str]:
    commands = []
    # every fenced block, its language after the opening fence (a block's closing fence never opens the next one)
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), re.S | re.M):
        if lang not in ("", "bash", "sh"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#|\s>\s", line)[0].strip()  # drop comments and redirections
            if line.startswith("siimcovid ") and "<" not in line and "..." not in line:
                commands.append(line)
    return commands


def test_the_readme_and_the_site_show_commands():
    assert len(readme_commands()) >= 10 and sum(len(readme_commands(page)) for page in PAGES) >= 50


def test_the_readme_stays_short():
    """The README is a newcomer's way in (about 150 lines); the rest is the site's (docs/)."""
    assert len(README.read_text().splitlines()) <= 160


@pytest.mark.parametrize("command", readme_commands() + [c for page in PAGES for c in readme_commands(page)])
def test_readme_command_resolves(command):
    try:
        cli.resolve(shlex.split(command)[1:])
    except ConfigError as e:
        # a settings file the README's earlier steps would have written is fine to miss here
        if not re.match(r"config file not found: runs/", str(e)):
            raise
