"""The Julia code cannot rot unseen: every ``.jl`` file in ``julia/`` and every emitted snapshot in
``tests/snapshots/julia/`` parses with tree-sitter-julia without an ERROR or MISSING node.

Julia itself is not installed where pydso is built and tested; this parse is the check that always runs (the Julia
tests in ``julia/test/runtests.jl`` run only where Julia is installed).
"""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "julia").rglob("*.jl")) + sorted((ROOT / "tests" / "snapshots" / "julia").glob("*.jl"))


def _parser():
    tree_sitter = pytest.importorskip("tree_sitter", reason="tree-sitter is in the 'test' extra")
    tree_sitter_julia = pytest.importorskip("tree_sitter_julia", reason="tree-sitter-julia is in the 'test' extra")
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_julia.language()))


def parse_errors(source: bytes) -> list[str]:
    """``line:column kind text`` of every ERROR or MISSING node of the parse of ``source``."""
    tree = _parser().parse(source)
    bad, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            row, col = node.start_point
            kind = "MISSING" if node.is_missing else "ERROR"
            bad.append(f"{row + 1}:{col + 1} {kind} {node.text.decode(errors='replace')[:60]!r}")
        stack.extend(node.children)
    return sorted(bad)


def test_there_is_julia_code_to_check():
    names = {p.name for p in FILES}
    assert {"PyDSO.jl", "runtests.jl"} <= names
    assert {"lorenz.jl", "pendulum_mlp.jl", "ornstein_uhlenbeck.jl"} <= names


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_julia_file_parses(path):
    errors = parse_errors(path.read_bytes())
    assert not errors, f"{path.relative_to(ROOT)} does not parse as Julia:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    "source",
    [b"function f(x)\n    y = x .+ \nend\n", b"v1 = PyDSO.tensordot(x, (1,), \n", b"function f(x)\n  return x\n"],
    ids=["dangling-operator", "unclosed-call", "missing-end"],
)
def test_the_check_catches_broken_julia(source):
    assert parse_errors(source), "tree-sitter-julia accepted broken Julia: the syntax check could not fail"
