"""The package's import graph follows the layers of DESIGN.md §2 and its modules talk through public names only.

Layer order (an import may only point to a lower layer, or stay inside its own package):

    cli > problems > optimize > estimators > engine > backends > systems

``data`` sits below ``engine`` and ``estimators`` (which record to and read from stores) and imports none of them;
``exact`` is the independent reference and imports nothing of pydso but ``systems`` (and the shared leaf modules
``_errors``, ``_typing``, ``_checks``, ``_io``, ``_config``, ``_progress``, which import nothing above them).
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pydso"

LEAVES = {"_errors", "_typing", "_checks", "_io", "_config", "_progress"}
RANK = {
    **{name: 0 for name in LEAVES},
    "systems": 1,
    "exact": 2,
    "divergences": 2,
    "data": 2,
    "backends": 2,
    "engine": 3,
    "estimators": 4,
    "optimize": 5,
    "problems": 6,
    "cli": 7,
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def _component(module: str) -> str:
    """The layer a dotted module name belongs to: its first component below ``pydso``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: pathlib.Path, module: str):
    """``(lineno, imported module, imported names)`` of every pydso import in a file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            if target.startswith("pydso"):
                # ``from . import engine`` imports the module pydso.engine
                for name in names:
                    yield node.lineno, f"{target}.{name}" if not node.module and node.level else target, [name]
            else:
                yield node.lineno, target, names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


MODULES = list(_modules())


@pytest.mark.parametrize("path,module", MODULES, ids=[m for _, m in MODULES])
def test_imports_point_down_the_layers(path, module):
    here = _component(module)
    if module == "pydso":
        return  # the public namespace re-exports everything
    bad = []
    for line, target, _ in _imports(path, module):
        if not target.startswith("pydso."):
            continue
        there = _component(target)
        if there == here or (here in LEAVES and there in ("_errors", "_typing")):
            continue  # inside one package; the leaf helpers use pydso's errors and type aliases
        if there not in RANK or here not in RANK:
            bad.append(f"line {line}: {module} imports {target}, which is in no layer (add it to RANK)")
        elif RANK[there] >= RANK[here]:
            bad.append(f"line {line}: {module} ({here}) imports {target} ({there}): that points up or sideways")
        if here == "exact" and there not in LEAVES | {"systems"}:
            bad.append(f"line {line}: exact must import nothing of pydso but systems, got {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path,module", MODULES, ids=[m for _, m in MODULES])
def test_no_private_names_across_modules(path, module):
    """A module uses other modules' public names only (``from ._x import _y`` is the private toolkit smell), and
    no private module of a third-party library where a public name exists."""
    bad = []
    for line, target, names in _imports(path, module):
        if target.startswith("pydso"):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                bad.append(f"line {line}: {module} imports private {private} from {target}")
        else:
            top, *rest = target.split(".")
            if any(part.startswith("_") for part in rest) and top not in ("importlib",):
                bad.append(f"line {line}: {module} imports the private module {target}")
    assert not bad, "\n".join(bad)


def test_every_module_is_in_a_layer():
    assert {_component(m) for _, m in MODULES} - {""} <= set(RANK), "a new top-level module needs a layer in RANK"


def test_type_alias_defined_once():
    """``PyTree`` is defined in pydso._typing only."""
    defining = [str(p) for p, _ in MODULES if "PyTree = " in p.read_text() and p.name != "_typing.py"]
    assert not defining, defining
