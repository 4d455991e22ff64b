"""The documentation site's reference, generated from the code (docs/hooks.py adds these pages at build time).

    pages() -> {path: markdown}     every generated page, by its path under docs/
    settings_page(stage)            a stage's settings from cfg/<stage>.yaml: key, type, default, meaning, tags
    formats_page()                  every table crossing a stage boundary, from tables.py's contracts
    registries_page()               every registry kind and its names (what `siimcovid help` lists)

One place for each fact: the settings are the defaults files (siimcovid.config.schema), the formats tables.py, the
names the registry; nothing here restates them by hand, so the site cannot drift from the code.
"""

from __future__ import annotations

from siimcovid import registry, tables
from siimcovid.config import default_config_path, schema
from siimcovid.stages import STAGES
from siimcovid.utils import SiimError

REFERENCE = "reference"


def cell(text) -> str:
    """Text for a Markdown table cell: one line; outside code spans pipes escaped and `<` an entity (`copies_<folder>.csv`
    is no HTML tag); inside them as written (the table extension splits cells around code spans, and shows a backslash)."""
    parts = " ".join(str(text).split()).split("`")
    code = len(parts) % 2  # an odd number of backticks is no code span: every part is text
    return "`".join(p if i % 2 and code else p.replace("|", "\\|").replace("<", "&lt;") for i, p in enumerate(parts))


def code(value) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    text = " ".join(text.split())
    return f"`{text}`" if text else "` `"


def configured_stages() -> list[str]:
    """The stages with a defaults file, in the registry's order."""
    return [name for name in STAGES if default_config_path(name).exists()]


def settings_page(stage: str) -> str:
    modes = [m for m in STAGES[stage].modes if m]
    usage = " | ".join(modes)
    lines = [
        "---",
        "hide: [toc]",  # one table and no headings: the page's width goes to the table
        "---",
        f"# `siimcovid {stage}`" + (f" (modes: {usage})" if usage else ""),
        "",
        f"Generated from `siimcovid/cfg/{stage}.yaml` (what `siimcovid {stage} help` prints). Give a setting as",
        "`key=value` on the command line, in an experiment file (`cfg=my.yaml`), or from Python as",
        f'`siimcovid.cli.call("{stage}", key=value)`.',
        "",
        "| setting | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, s in schema(stage).settings.items():
        tags = f" *({', '.join(sorted(s.tags))})*" if s.tags else ""
        lines.append(f"| `{key}` | {code(s.spec)} | {code(s.default)} | {cell(s.help)}{tags} |")
    return "\n".join(lines) + "\n"


def formats_page() -> str:
    lines = [
        "# File formats",
        "",
        "Generated from the contracts of `siimcovid/tables.py`: every CSV one stage writes and another reads, its",
        "columns, their types and what they hold. A reader checks a file against its contract and names the file and",
        "line of what does not fit.",
        "",
    ]
    for name, table in vars(tables).items():
        if not isinstance(table, tables.Table) or name.startswith("_"):
            continue
        lines += [f"## {name}: {table.name}", "", f"`{table.files}`" + (f": {cell(table.doc)}" if table.doc else ""), ""]
        if table.key:
            lines += [f"Key: {', '.join(f'`{k}`' for k in table.key)}.", ""]
        lines += ["| column | type | required | meaning |", "|---|---|---|---|"]
        for c in table.columns:
            bounds = "" if c.lo is None and c.hi is None else f" ({'' if c.lo is None else c.lo}..{'' if c.hi is None else c.hi})"
            lines.append(f"| `{c.name}` | {c.dtype}{bounds} | {'yes' if c.required else 'no'} | {cell(c.doc)} |")
        lines.append("")
    return "\n".join(lines)


def registries_page() -> str:
    lines = [
        "# Registries",
        "",
        "Generated from `siimcovid.registry`: each kind of named thing a setting chooses, and its names (what",
        "`siimcovid help` lists). A plugin adds its own with `registry.register(kind, name)`.",
        "",
        "| kind | what it chooses | names |",
        "|---|---|---|",
    ]
    for kind in registry.kinds():
        about = registry.about(kind)
        try:
            names = ", ".join(f"`{n}`" for n in registry.names(kind))
        except SiimError as e:  # a kind whose built-in module is missing here: said, the others listed (as `siimcovid help`)
            names = f"(not available: {cell(e)})"
        lines.append(f"| `{kind}` | {cell(about)} | {names} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    out = {f"{REFERENCE}/{stage}.md": settings_page(stage) for stage in configured_stages()}
    out[f"{REFERENCE}/formats.md"] = formats_page()
    out[f"{REFERENCE}/registries.md"] = registries_page()
    return out
