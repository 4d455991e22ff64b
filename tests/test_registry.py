"""The one registry (siimcovid.registry), `siimcovid help`, the packages' `__all__` and docstrings against the stage
registry and the files, and the tables.py docstring against its contracts. Read from the source with ast and
importlib.util.find_spec where importing would pull in torch."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from siimcovid import cli, registry, stages, tables
from siimcovid.config import ConfigError, load_config
from siimcovid.data.prepared import Prepared
from siimcovid.utils import SiimError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "siimcovid"


# ----------------------------------------------------------------------------- register / add / get / names
def test_register_files_functions_classes_and_objects_under_one_kind():
    @registry.register("test-any", "fn", "fn-alias")
    def fn():
        return 1

    @registry.register("test-any", "cls")
    class Thing:
        pass

    obj = registry.add("test-any", "obj", {"a": 1})
    assert fn() == 1 and isinstance(Thing(), Thing)  # decorated things come back unchanged
    assert registry.names("test-any") == ["fn", "fn-alias", "cls", "obj"]
    assert registry.get("test-any", "fn-alias") is fn and registry.get("test-any", "cls") is Thing
    assert registry.get("test-any", "obj") is obj
    assert registry.view("test-any")["obj"] is obj and "test-any" in registry.kinds()
    with pytest.raises(SiimError, match=r"test-any='nope': expected one of fn, fn-alias, cls, obj"):
        registry.get("test-any", "nope")
    with pytest.raises(SiimError, match="test-any 'obj' is registered twice"):
        registry.add("test-any", "obj", {"a": 2})
    with pytest.raises(SiimError, match="no registry 'test-none'"):
        registry.names("test-none")


def test_stages_go_through_the_registry():
    assert list(stages.STAGES) == registry.names("stage")
    assert all(registry.get("stage", name) is s for name, s in stages.STAGES.items())
    assert stages.stage("detect").modes["train"] == "siimcovid.detect.train:main"
    with pytest.raises(SiimError, match="unknown stage 'nope'"):
        stages.stage("nope")


def test_builtins_are_found_without_importing_their_modules_first():
    code = (
        "import sys; from siimcovid import registry\n"
        "assert 'siimcovid.fuse.formulas' not in sys.modules\n"
        "print(registry.names('none_det'), registry.names('layout'), 'siimcovid.fuse.formulas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['prod',", "'max']", "['siim',", "'rsna',", "'csv',", "'folder']", "True"]


def test_a_missing_builtin_module_fails_its_kind_only_when_used(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.BUILTINS, "test-missing", registry.Kind(("siimcovid.no_such_module",), "a test"))
    assert "test-missing" in registry.kinds()  # listing the kinds imports nothing
    missing = "registry kind 'test-missing': its built-in module siimcovid.no_such_module is missing"
    with pytest.raises(SiimError, match=missing):
        registry.names("test-missing")
    assert "prod" in registry.names("none_det")  # the other kinds still work
    # a module that is there but lacks a dependency is that module's own error, not "missing"
    (tmp_path / "registry_test_needs_dep.py").write_text("import registry_test_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BUILTINS, "test-dep", registry.Kind(("registry_test_needs_dep",), "a test"))
    with pytest.raises(ModuleNotFoundError, match="registry_test_no_such_dependency"):
        registry.names("test-dep")


LAYOUT_MODULE = '''
from siimcovid.registry import get, register


@register("layout", "{name}")
def tmp_layout(root, splits, problems):
    """The siim layout, train split only."""
    return get("layout", "siim")(root, [s for s in splits if s == "train"], problems)
'''


def test_a_layout_in_a_module_outside_siimcovid_needs_no_edit(tmp_path, monkeypatch):
    """Importing a module that registers a layout is all it takes: the registry, prepare's setting check and its
    error message know it."""
    (tmp_path / "registry_test_layouts.py").write_text(LAYOUT_MODULE.format(name="tmp_path_layout"))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("registry_test_layouts")
    assert registry.get("layout", "tmp_path_layout") is module.tmp_layout
    assert registry.names("layout")[:4] == ["siim", "rsna", "csv", "folder"]  # the built-ins are still there, first
    assert load_config("prepare", {"layout": "tmp_path_layout"}).layout == "tmp_path_layout"
    with pytest.raises(ConfigError, match="expected one of siim, rsna, csv, folder, tmp_path_layout"):
        load_config("prepare", {"layout": "nope"})


def plugin_site(site: Path, module: str, text: str) -> dict:
    """An installed plugin package as pip leaves it (a dist-info importlib.metadata finds on sys.path) whose entry
    point names `module`; the environment that puts it on the path."""
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[siimcovid.plugins]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(text)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def test_an_entry_point_plugin_is_imported_for_the_command_line(tiny_root, tmp_path):
    """A layout in an installed package's entry point ("siimcovid.plugins") is known to `siimcovid help` and
    `siimcovid prepare layout=` with no edit of siimcovid: prepare converts the data through it."""
    env = plugin_site(tmp_path / "site", "registry_plugin_layouts", LAYOUT_MODULE.format(name="plugin_layout"))

    def siimcovid(*args: str) -> str:
        command = [sys.executable, "-m", "siimcovid", *args]
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert "siim, rsna, csv, folder, plugin_layout" in siimcovid("help")
    out = tmp_path / "prepared"
    settings = ["layout=plugin_layout", "sizes=64", "n_folds=2", "workers=1", f"data_yaml_dir={tmp_path / 'yaml'}"]
    siimcovid("prepare", f"data={tiny_root}", "name=plugin", f"out={out}", *settings)
    assert Prepared.read_cfg(out)["layout"] == "plugin_layout"
    meta = tables.META.read(out / "meta.csv")
    assert len(meta) and set(meta.split) == {"train"}  # the plugin's rule: train only


def test_a_plugin_that_fails_to_import_is_one_line_naming_it(tmp_path):
    """A SiimError (the command line prints it as one line), at every look-up, not only the first."""
    env = plugin_site(tmp_path / "site", "registry_plugin_broken", "raise RuntimeError('half installed')\n")
    code = (
        "from siimcovid import registry\n"
        "for _ in range(2):\n"
        "    try:\n        registry.names('layout')\n"
        "    except Exception as e:\n        print(type(e).__name__, e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    line = "SiimError siimcovid plugin 'registry_plugin_broken' (registry_plugin_broken): import failed: half installed"
    assert run.stdout.splitlines() == [line, line]


# ----------------------------------------------------------------------------- siimcovid help
def test_help_lists_every_stage_and_every_kind_with_its_names(capsys):
    registry.add("test-help-kind", "alpha", object())
    cli.main(["help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: siimcovid")
    stage_lines = [line.split()[0] for line in text.split("\n\n")[1].splitlines()[1:]]  # the block after usage
    assert stage_lines == list(stages.STAGES)
    head, _, rest = text.partition("registered names, by kind (siimcovid.registry):\n\n")
    blocks = {b.split(":")[0]: b for b in rest.strip().split("\n\n")}
    assert set(blocks) == set(registry.kinds()) - {"stage"}
    for kind in blocks:
        try:
            names = registry.names(kind)
        except SiimError as e:  # a built-in module not written yet: help says so
            assert "is missing" in str(e) and f"(not available: {e})" in blocks[kind]
            continue
        assert blocks[kind].splitlines()[1].strip() == ", ".join(names)
    assert "test-help-kind: registered outside siimcovid\n  alpha" in text
    cli.main([])  # no words: the short usage, which says where the rest is
    assert "`siimcovid help` also lists every registered name" in capsys.readouterr().out


# ----------------------------------------------------------------------------- __all__ and docstrings
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def top_level_names(module: ast.Module) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments, imports; inside if / try too)."""
    found, todo = set(), list(module.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [n for handler in getattr(node, "handlers", []) for n in handler.body]
    return found


def module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # imports the parent packages only (light: checked in test_package.py)
    assert spec is not None and spec.origin, f"{module} does not exist"
    return Path(spec.origin)


PACKAGES = sorted(p.parent for p in PACKAGE.rglob("__init__.py") if "cfg" not in p.parts)


def package_all(package: Path) -> list[str]:
    for node in parsed(package / "__init__.py").body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{package / '__init__.py'} has no __all__")


def package_modules(package: Path) -> set[str]:
    modules = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}  # not __init__, __main__, private
    return modules | {p.parent.name for p in package.glob("*/__init__.py")}


def docstring_lines(package: Path) -> dict[str, str]:
    """module or subpackage -> its line(s) in the package docstring (`    name.py  text`, continued by deeper lines)."""
    lines, current = {}, None
    for line in (ast.get_docstring(parsed(package / "__init__.py")) or "").splitlines():
        m = re.match(r" {4}(\w+)(?:\.py|/)\s", line)
        if m:
            current = m[1]
            lines[current] = line
        elif current and re.match(r" {5,}\S", line):
            lines[current] += " " + line.strip()
        else:
            current = None
    return lines


def dotted(package: Path) -> str:
    return ".".join(package.relative_to(ROOT).parts)


@pytest.mark.parametrize("package", PACKAGES, ids=dotted)
def test_each_package_all_and_docstring_name_every_module_and_real_functions(package):
    """`__all__` is every module of the package and what its __init__.py defines or re-exports (each exists), the
    docstring has a line for each module, and every `name(` on a module's line is defined in that module."""
    names, modules = package_all(package), package_modules(package)
    assert not modules - set(names), f"{dotted(package)}.__all__ lacks the modules {sorted(modules - set(names))}"
    unknown = set(names) - modules - top_level_names(parsed(package / "__init__.py"))
    assert not unknown, f"{dotted(package)}.__all__ names {sorted(unknown)}: not a module, not in __init__.py"
    lines = docstring_lines(package)
    assert sorted(lines) == sorted(package_modules(package)), f"{dotted(package)}'s docstring lists {sorted(lines)}"
    for module, line in lines.items():
        path = module_file(f"{dotted(package)}.{module}")
        if path.name == "__init__.py":
            continue
        unknown = set(re.findall(r"\b([A-Za-z_]\w*)\(", line)) - top_level_names(parsed(path))
        assert not unknown, f"{path} defines no {sorted(unknown)}, named in {dotted(package)}'s docstring: {line!r}"


def stage_targets() -> list[tuple[str, str]]:
    found = []
    for name, s in stages.STAGES.items():
        found += [(name, t) for t in [*s.modes.values(), s.describe, s.extra_keys, s.extra_check] if t]
    return found


@pytest.mark.parametrize("stage,target", stage_targets())
def test_every_stage_target_resolves_and_is_public(stage, target):
    """Every "module:function" of the stage registry: the module exists, defines the function, is named in its
    package's __all__ (every package above it too), and its docstring line names the function."""
    module, _, function = target.partition(":")
    assert function in top_level_names(parsed(module_file(module))), f"{stage}: {target}"
    parts = module.split(".")
    for depth in range(1, len(parts)):
        package = ROOT.joinpath(*parts[:depth])
        assert parts[depth] in package_all(package), f"{stage}: {parts[depth]} not in {'.'.join(parts[:depth])}.__all__"
    line = docstring_lines(ROOT.joinpath(*parts[:-1]))[parts[-1]]
    assert f"{function}(" in line, f"{stage}: the docstring of {'.'.join(parts[:-1])} does not name {function}()"


def test_the_tables_docstring_names_every_table():
    contracts = [name for name, value in vars(tables).items() if isinstance(value, tables.Table) and name[0] != "_"]
    assert len(contracts) >= 20
    missing = [name for name in contracts if not re.search(rf"\b{name}\b", tables.__doc__)]
    assert missing == [], f"siimcovid/tables.py's docstring does not name {missing}"


def test_no_docstring_cites_a_file_the_repository_does_not_hold():
    """The format documents of the task (../shared/SIIM_FORMAT.md, CONTRACT.md) are not in the repository: a
    docstring cites the file here that holds the contract (siimcovid/tables.py) or the README."""
    cited = []
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(parsed(path)) or ""
        found = re.findall(r"\.\./shared/\S*|\b(?:CONTRACT|SIIM_FORMAT)\.md", doc)
        cited += [f"{path.relative_to(ROOT)}: {m}" for m in found]
    assert cited == []
