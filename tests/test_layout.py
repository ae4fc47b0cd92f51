"""The repository's layout: no import cycles, data code free of model code, and the names pip installs.

Reads the source with ``ast`` (nothing is imported, so no TensorFlow), except the last test, which
builds a wheel of a copy of the repository.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what pip installs: the CLIs and the reader engine as top-level modules, and three packages
PACKAGES = {"enki_seg", "models", "launch"}
INSTALLED_NAMES = PACKAGES | {"build_lmdb", "train_unet", "train_maskrcnn", "inference", "evaluate",
                              "imagereader", "augment"}
# data code never imports model code (nor the framework the models are written in)
DATA_CODE = ["enki_seg.data", "imagereader", "augment"]
MODEL_IMPORTS = {"models", "tensorflow", "keras"}


def project_modules() -> dict[str, Path]:
    """Module name -> file, for the root modules and every module of the project's packages."""
    modules = {name: ROOT / f"{name}.py" for name in sorted(INSTALLED_NAMES - PACKAGES)}
    for package in sorted(PACKAGES):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(module: str, path: Path, module_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(module name, names imported from it, line) of every import statement in the file: ``import a.b``
    gives ("a.b", [], line), ``from ..c import d`` ("pkg.c", ["d"], line). With ``module_level_only``,
    imports inside functions are left out (they run when the function is called)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and module_level_only:
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, [], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from . import x, from ..common import y
                    anchor = package[: len(package) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((base, [alias.name for alias in child.names], child.lineno))
            visit(child)

    visit(tree)
    return found


def import_graph(modules: dict[str, Path], module_level_only: bool = False) -> dict[str, dict[str, int]]:
    """Project module -> {project module it imports: line}. ``from a import b`` imports the module
    ``a.b`` when there is one, else ``a``; ``import a.b`` imports ``a.b`` (or its longest prefix
    that is a project module). Other projects' modules are left out."""

    def longest_project_prefix(name):
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    graph = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for base, names, line in imports_of(module, path, module_level_only):
            targets = [f"{base}.{name}" if f"{base}.{name}" in modules else longest_project_prefix(base)
                       for name in names] or [longest_project_prefix(base)]
            for target in targets:
                if target is not None and target != module:
                    edges.setdefault(target, line)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    """Imports inside functions count too: a lazy import hides a cycle, it does not remove it."""
    modules = project_modules()
    graph = import_graph(modules)
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} ({modules[a].relative_to(ROOT)}:{graph[a][b]}) imports {b}"
                 for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle among project modules:\n  " + "\n  ".join(steps))


def test_data_code_never_imports_model_code():
    """What importing a data module runs (its module-level imports, followed through the project,
    parent packages included) never imports models, tensorflow or keras."""
    modules = project_modules()
    graph = import_graph(modules, module_level_only=True)
    problems: dict[tuple[str, str, int], list[str]] = {}  # (module, what it imports, line) -> chain to it
    for start in sorted(m for m in modules if any(m == d or m.startswith(d + ".") for d in DATA_CODE)):
        chain_to = {start: [start]}
        todo = [start]
        while todo:  # breadth first: the shortest chain to each module
            module = todo.pop(0)
            for base, _, line in imports_of(module, modules[module], module_level_only=True):
                top = base.split(".")[0]
                if top in MODEL_IMPORTS:
                    problems.setdefault((module, top, line), chain_to[module])
            parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
            for target in [*graph[module], *(p for p in parents if p in modules)]:
                if target not in chain_to and target.split(".")[0] not in MODEL_IMPORTS:
                    chain_to[target] = chain_to[module] + [target]
                    todo.append(target)
    lines = [f"{' -> '.join(chain)} imports {top} at module level "
             f"({modules[module].relative_to(ROOT)}:{line})"
             for (module, top, line), chain in sorted(problems.items())]
    assert not lines, "data code imports model code:\n  " + "\n  ".join(lines)


def test_installed_top_level_names(tmp_path):
    """pip installs exactly INSTALLED_NAMES at the top level of site-packages."""
    source = tmp_path / "src"
    # a copy, so the build's build/ and *.egg-info folders never appear in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "demo_run"))
    # --no-build-isolation: the environment's own setuptools and wheel (TensorFlow's dependencies bring
    # both), so no network; about 2-5 s on 2 CPU cores
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = {Path(name).parts[0] for name in archive.namelist()}
    installed = {name.removesuffix(".py") for name in names if not name.endswith((".dist-info", ".data"))}
    assert installed == INSTALLED_NAMES
