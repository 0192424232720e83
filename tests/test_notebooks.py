"""The example notebooks (examples/*.ipynb): valid nbformat-4 JSON without committed outputs, and every code cell
runs, in order, in one fresh plain-Python namespace (no Jupyter needed) in quick mode (``PYDSO_NOTEBOOK_QUICK=1``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NOTEBOOKS = [
    "sysid_silverbox.ipynb",
    "offpolicy_from_logs.ipynb",
    "pendulum_swingup.ipynb",
    "state_estimation.ipynb",
    "generative_tuning.ipynb",
    "behavioural_cloning.ipynb",
    "mechanism_design.ipynb",
    "control_tasks.ipynb",
]
NEEDS = {"sysid_silverbox.ipynb": REPO / "data" / "silverbox.zarr"}
FAILED = "PYDSO-NOTEBOOK-CELL-FAILED"

# Executes the code cells of the notebook given as argv[1] in one namespace; on an exception prints the traceback
# and a marker line with the cell index, then exits with status 3.
RUNNER = f"""
import json, sys, traceback
nb = json.load(open(sys.argv[1], encoding="utf-8"))
ns = {{"__name__": "__main__"}}
for index, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
        continue
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    print(f"--- cell {{index}}", flush=True)
    try:
        exec(compile(source, f"<cell {{index}}>", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"{FAILED} {{index}}", file=sys.stderr, flush=True)
        sys.exit(3)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
"""


def load(name):
    with open(EXAMPLES / name, encoding="utf-8") as f:
        return json.load(f)


def source(cell):
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_structure(name):
    nb = load(name)
    assert nb["nbformat"] == 4, name
    assert isinstance(nb["nbformat_minor"], int), name
    assert isinstance(nb["metadata"], dict), name
    cells = nb["cells"]
    assert isinstance(cells, list) and cells, name
    ids = []
    for i, cell in enumerate(cells):
        where = f"{name} cell {i}"
        assert cell["cell_type"] in ("code", "markdown", "raw"), where
        assert isinstance(cell.get("metadata"), dict), where
        s = cell["source"]
        assert isinstance(s, str) or (isinstance(s, list) and all(isinstance(line, str) for line in s)), where
        if nb["nbformat_minor"] >= 5:
            assert isinstance(cell.get("id"), str) and cell["id"], where
            ids.append(cell["id"])
        if cell["cell_type"] == "code":
            # committed without outputs, and plain Python only (no IPython magics or shell escapes)
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{where}: clear the outputs"
            for line in source(cell).splitlines():
                assert not line.lstrip().startswith(("%", "!")), f"{where}: IPython magic {line!r}"
            compile(source(cell), where, "exec")
    assert len(ids) == len(set(ids)), f"{name}: duplicate cell ids"
    kinds = {cell["cell_type"] for cell in cells}
    assert {"code", "markdown"} <= kinds, name


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    needed = NEEDS.get(name)
    if needed is not None and not needed.exists():
        pytest.skip(f"{name} needs {needed.relative_to(REPO)} (build it with examples/silverbox_to_zarr.py)")
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "PYDSO_NOTEBOOK_QUICK": "1",
        "PYDSO_NOTEBOOK_OUT": str(tmp_path / "output"),
        "PYDSO_REPO": "",  # the notebook must find the repository from the working directory
    }
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(EXAMPLES / name)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        marker = [line for line in proc.stderr.splitlines() if line.startswith(FAILED)]
        where = f"cell {marker[-1].split()[-1]}" if marker else f"exit status {proc.returncode}"
        pytest.fail(
            f"{name}: {where} failed\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n"
            f"{proc.stderr[-6000:]}"
        )
