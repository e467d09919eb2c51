"""The package's layers: lower layers never import higher ones, and no module imports form a circle.

Every import counts, including those inside functions and under ``TYPE_CHECKING``. The layers, lowest
first, are the ones the package docstring and the README's Layout section describe.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

import usfmae_hf

PACKAGE_DIR = Path(usfmae_hf.__file__).parent

#: lowest first; a module may import its own layer's modules and those of lower layers
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "usfmae_hf.errors",
        "usfmae_hf.failures",
        "usfmae_hf.version",
        "usfmae_hf.atomic",
        "usfmae_hf.launch",
        "usfmae_hf._moved",
        "usfmae_hf.precision",
        # The model's config field lists: plain data importing nothing, read by publishing's cards too.
        # Listed before ``usfmae_hf.model`` (the first matching layer counts), so it may import nothing above.
        "usfmae_hf.model.fields",
    ),
    ("usfmae_hf.io",),
    ("usfmae_hf.image",),
    ("usfmae_hf.ingest",),
    ("usfmae_hf.publishing",),
    ("usfmae_hf.model",),
    ("usfmae_hf.inference",),
    ("usfmae_hf.evaluation",),
    ("usfmae_hf.pretraining",),
    ("usfmae_hf.finetuning",),
    ("usfmae_hf.quickstart", "usfmae_hf.commands", "usfmae_hf.cli"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


#: (importer, imported) pairs allowed upward: deprecated re-exports kept for one release only
DEPRECATED_UPWARD = {("usfmae_hf.ingest", "usfmae_hf.publishing.hub")}

MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index of the layer holding ``module``; None for the root package (lazy re-exports only)."""
    for index, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    return None


def imported_modules(module: str, path: Path) -> set[str]:
    """Package modules that ``module`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` also imports a.b: keep the deepest name that is a package module
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("usfmae_hf") and target != module:
                found.add(target)
    return found


GRAPH = {module: imported_modules(module, path) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "usfmae_hf" and layer_of(m) is None] == []


def test_no_import_from_a_lower_layer_into_a_higher_one():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(module) is not None
        and layer_of(target) is not None
        and layer_of(target) > layer_of(module)
        and (module, target) not in DEPRECATED_UPWARD
    ]
    assert upward == []


def _is_parent_package(module: str, target: str) -> bool:
    # Importing a submodule runs its package's __init__ first; a package re-exporting its own
    # submodules is not a circle of the code's design.
    return module.startswith(target + ".") or target.startswith(module + ".")


def test_no_import_cycles():
    graph = {m: {t for t in ts if not _is_parent_package(m, t)} for m, ts in GRAPH.items()}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert [" -> ".join(cycle) for cycle in cycles] == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from usfmae_hf.io import load_frames\n    from .keys import original_to_current\n")
    found = imported_modules("usfmae_hf.model.probe", source)
    assert {"usfmae_hf.io", "usfmae_hf.model.keys"} <= found


@pytest.mark.parametrize("old, new", sorted(usfmae_hf._moved.MOVED_MODULES.items()))
def test_old_import_paths_still_work_with_a_deprecation_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the module keeps its own identity (resources, pickling)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
