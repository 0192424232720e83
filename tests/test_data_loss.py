"""No acknowledged data is lost and no stray file of pydso's survives a crash: real processes, real SIGKILLs.

* two writers append to the same NEW store at the same moment (behind a barrier): both appends return, and the store
  holds exactly the union of their episodes, every time;
* a writer killed while creating a store leaves either no store or a complete one, and its staging directory
  (``.STORE.tmp-<pid>-<id>``) is removed by the next write, while a user's look-alike files survive;
* a process killed inside an atomic write (a checkpoint) leaves a temporary ``.NAME.pid<PID>.XXXXXXXX.tmp.npz`` that
  the next checkpoint write removes — and only that.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

from pydso import data

# Import pydso.data without pydso/__init__ (no JAX): the children start fast.
_PRELUDE = r"""
import importlib.util, os, sys, time, types
spec = importlib.util.find_spec("pydso")
pkg = types.ModuleType("pydso"); pkg.__path__ = list(spec.submodule_search_locations); sys.modules["pydso"] = pkg
import numpy as np
import pydso.data as data
"""

_WRITER = (
    _PRELUDE
    + r"""
writer = int(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    path, rep = line.split()
    rep = int(rep)
    state = (1000.0 * rep + 100.0 * writer + np.arange(6.0))[:, None, None] + np.zeros((1, 4, 2))
    n = data.append(path, data.make_dataset(state, system="race", parameters={"writer": writer}))
    print(f"done {n}", flush=True)
"""
)


def _writer_batch(rep: int, writer: int) -> np.ndarray:
    return (1000.0 * rep + 100.0 * writer + np.arange(6.0))[:, None, None] + np.zeros((1, 4, 2))


def _start(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()


def test_two_concurrent_first_appends_keep_both_writers_episodes(tmp_path):
    writers = [_start(_WRITER, str(w)) for w in (0, 1)]
    try:
        for rep in range(10):
            path = tmp_path / f"store-{rep}"
            for proc in writers:  # the barrier: both are blocked on stdin until both lines are sent
                proc.stdin.write(f"{path} {rep}\n")
            for proc in writers:
                proc.stdin.flush()
            counts = []
            for proc in writers:
                line = proc.stdout.readline()
                assert line.startswith("done"), proc.stderr.read()
                counts.append(int(line.split()[1]))
            assert sorted(counts) == [6, 12], f"rep {rep}: append returned {counts}"
            state = data.open(path, chunks=None)["state"].values
            order = np.argsort(state[:, 0, 0], kind="stable")
            expected = np.concatenate([_writer_batch(rep, 0), _writer_batch(rep, 1)])
            np.testing.assert_array_equal(state[order], expected)
            leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".store-{rep}"))
            assert leftovers == [], leftovers
    finally:
        for proc in writers:
            _stop(proc)


_SLOW_SAVER = (
    _PRELUDE
    + r"""
import pydso.data._store as store
_fsync_tree = store._fsync_tree
def slow(*a, **k):
    time.sleep(0.3); out = _fsync_tree(*a, **k); time.sleep(0.3); return out
store._fsync_tree = slow
print("ready", flush=True)
state = np.arange(24.0).reshape(3, 4, 2)
sys.stdin.readline()
print("saving", flush=True)
data.save(data.make_dataset(state, system="killed"), sys.argv[1])
print("saved", flush=True)
time.sleep(60)
"""
)


def test_killed_creation_leaves_no_store_and_its_staging_directory_is_removed(tmp_path):
    path = tmp_path / "s"
    # A user's files that look like pydso's staging names must survive every cleanup.
    lookalikes = {
        ".s.tmp-notapid": "dir",  # no pid in the name
        ".s.tmp-1-deadbeef": "file",  # the right pattern, but a regular file
        ".s.tmp-2-cafebabe": "userdir",  # the right pattern, a directory with a user's file in it
        f".s.tmp-{os.getpid()}-0badf00d": "emptydir",  # the right pattern, pid alive (this test process)
    }
    for name, kind in lookalikes.items():
        p = tmp_path / name
        if kind == "file":
            p.write_text("user data")
        else:
            p.mkdir()
            if kind != "emptydir":
                (p / "notes.txt").write_text("user data")
    proc = _start(_SLOW_SAVER, str(path))
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "saving"
        staging = []
        for _ in range(200):  # kill once the staging directory exists (inside the slowed fsync)
            staging = [p for p in tmp_path.iterdir() if p.name.startswith(f".s.tmp-{proc.pid}-")]
            if staging:
                break
            time.sleep(0.01)
        assert staging, "the child never created its staging directory"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        _stop(proc)
    assert not path.exists(), "a killed save made a partial store visible"
    assert [p.exists() for p in staging] == [True]
    # What a killed pydso.rollout(..., record=path) leaves: its staging store, named after its (dead) pid.
    recording = tmp_path / f".s.recording-{proc.pid}-0123456789ab"
    data.save(data.make_dataset(np.zeros((1, 4, 2)), system="killed"), recording)
    new = data.make_dataset(np.ones((2, 4, 2)), system="killed")
    assert data.append(path, new) == 2  # the next write removes the dead process's staging directories
    assert not staging[0].exists() and not recording.exists()
    xr.testing.assert_identical(data.open(path).load(), new)
    for name, kind in lookalikes.items():
        p = tmp_path / name
        assert p.exists(), f"pydso removed the user's {name}"
        if kind in ("file",):
            assert p.read_text() == "user data"
        elif kind != "emptydir":
            assert (p / "notes.txt").read_text() == "user data"


_KILLED_CHECKPOINT = r"""
import os, sys, time
from pydso._io import atomic_write
print("ready", flush=True)
with atomic_write(sys.argv[1], "wb", suffix=".tmp.npz") as f:
    f.write(b"partial checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_temporary_checkpoint_of_a_killed_run_is_removed_by_the_next_write(tmp_path):
    import jax
    import jax.numpy as jnp

    import pydso

    path = tmp_path / "run.npz"
    proc = _start(_KILLED_CHECKPOINT, str(path))
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        _stop(proc)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(f".run.npz.pid{proc.pid}.")]
    assert len(stale) == 1 and stale[0].read_bytes() == b"partial checkpoint"
    assert not path.exists()
    # Look-alikes that are not a dead pydso process's temporaries: they must survive.
    keep = {
        "tmpx1y2z3.tmp.npz": b"user 1",  # the old-style name: not pydso's pattern now
        f".run.npz.pid{os.getpid()}.abcdefgh.tmp.npz": b"alive",  # a live writer's temporary
        f".run.npz.pid{proc.pid}.abcdefgh.tmp": b"other suffix",  # another target's suffix
        f".other.npz.pid{proc.pid}.abcdefgh.tmp.npz": b"other target",
    }
    for name, content in keep.items():
        (tmp_path / name).write_bytes(content)
    theta = {"w": jnp.arange(3.0)}
    ckpt = pydso.optimize.Checkpoint(theta, (), theta, 1.5, {"objective": [1.5]}, 1)
    pydso.optimize.save_checkpoint(path, ckpt, key=jax.random.key(0), fingerprint={"method": "m"})
    assert not stale[0].exists()
    for name, content in keep.items():
        assert (tmp_path / name).read_bytes() == content, name
    loaded = pydso.optimize.load_checkpoint(
        path, theta=theta, state=(), key=jax.random.key(0), fingerprint={"method": "m"}
    )
    np.testing.assert_array_equal(loaded.theta["w"], np.arange(3.0))
    assert loaded.step == 1 and loaded.best_objective == 1.5


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage", "variable"])
def test_damaged_chunk_is_named_not_read_as_nan(tmp_path, damage):
    import shutil

    path = tmp_path / "s"
    state = np.arange(10 * 4 * 2, dtype=float).reshape(10, 4, 2)
    cost = np.arange(40.0).reshape(10, 4)
    data.save(data.make_dataset(state, cost=cost), path, episodes_per_chunk=4)
    manifest = json.loads((path / "pydso.json").read_text())
    part = path / manifest["parts"][0]["name"]
    chunk = part / "state" / "c" / "1" / "0" / "0"  # episodes 4..7
    assert chunk.exists()
    if damage == "delete":
        chunk.unlink()
        match = r"variable 'state', chunk \(1, 0, 0\).* is missing"
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:-3])
        match = r"variable 'state', chunk \(1, 0, 0\).* has \d+ bytes, the manifest recorded"
    elif damage == "garbage":  # same size, other bytes: only the hash can tell
        chunk.write_bytes(bytes(255 - b for b in chunk.read_bytes()))
        match = r"variable 'state', chunk \(1, 0, 0\).* does not match its recorded checksum"
    else:
        shutil.rmtree(part / "cost")
        match = r"variable 'cost', .*is missing"
    with pytest.raises(data.DatasetError, match=match) as info:
        if damage == "garbage":
            data.open(path)  # sizes agree: opening is fine, the hash check names the chunk
            data.validate(path)
        else:
            data.open(path)
    assert str(path) in str(info.value) and part.name in str(info.value)


_RUN_SPEC = """
import diffrax
import jax.numpy as jnp
import optax
import pydso

Q = jnp.diag(jnp.array([1.0, 0.1]))


def run():
    problem = pydso.Problem(
        pydso.ODESystem(
            lambda t, x, th: jnp.array([x[1], -th["k"] * x[0]]),
            dt=0.1,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        ),
        lambda x, th: x @ Q @ x,
        pydso.FiniteHorizon(5),
        pydso.Normal(jnp.zeros(2), 1.0),
        terminal_cost=lambda x, th: 10.0 * x @ x,
    )
    schedule = optax.exponential_decay(1e-2, 10, 0.9)
    method = pydso.Gradient(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule)), n=8)
    return problem, {"k": jnp.asarray(1.5)}, method
"""


def test_resume_fingerprint_is_the_same_in_a_fresh_process(tmp_path):
    """A killed run is resumed by ANOTHER process: its fingerprint (jaxprs, closed-over arrays, optimiser
    hyperparameters) must not depend on the process (object addresses, hash seeds), or resuming would be refused."""
    from pydso._io import load_object
    from pydso.optimize._checkpoint import run_fingerprint

    (tmp_path / "spec.py").write_text(_RUN_SPEC)
    child = (
        "import json, sys\n"
        "from pydso._io import load_object\n"
        "from pydso.optimize._checkpoint import run_fingerprint\n"
        "print(json.dumps(run_fingerprint(*load_object(sys.argv[1])())))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", child, f"{tmp_path / 'spec.py'}:run"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    here = run_fingerprint(*load_object(f"{tmp_path / 'spec.py'}:run")())
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    assert {"problem.system", "problem.cost", "problem.terminal_cost", "method.optimizer", "method.n"} <= set(here)
