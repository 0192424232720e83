"""Tests of pydso.data: schema validation, zarr stores (round trip, append, crash safety, lazy reading), CLI."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
import zarr.storage

import pydso
import pydso.cli
from pydso import data
from pydso.data import DatasetError

# ------------------------------------------------------------------------------------------- fixtures


def ragged_dataset(n=7, n_time=6, d=2, seed=0, **kwargs):
    """A dataset with every schema variable, ragged episodes (NaN padding) and float time."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n_time + 1, n)
    lengths[0] = n_time
    mask = np.arange(n_time)[None, :] < lengths[:, None]
    state = rng.normal(size=(n, n_time, d))
    state[~mask] = np.nan
    step = mask[:, :-1] & mask[:, 1:]
    cost = np.full((n, n_time), np.nan)
    cost[:, :-1] = np.where(step, rng.random((n, n_time - 1)), np.nan)
    logp = np.full((n, n_time), np.nan)
    logp[:, :-1] = np.where(step, -rng.random((n, n_time - 1)), np.nan)
    args = dict(
        input=rng.normal(size=(n, n_time, 1)),
        output=rng.normal(size=(n, n_time, 3)),
        cost=cost,
        behavior_logp=logp,
        mask=mask,
        terminal_cost=rng.random(n),
        dt=0.1,
        system="toy",
        parameters={"k": np.array([1.0, 2.0]), "b": 0.5},
        units={"state": "m", "time": "s"},
    )
    args.update(kwargs)
    return data.make_dataset(state, **args)


def batch(start, n, n_time=8, d=3, system="counter", parameters=None):
    """Episodes whose values encode their global index, so a prefix can be checked exactly."""
    e = np.arange(start, start + n, dtype=float)[:, None, None]
    state = e + np.arange(n_time)[None, :, None] / 100 + np.arange(d)[None, None, :] / 1000
    cost = state[..., 0].copy()
    cost[:, -1] = np.nan
    return data.make_dataset(state, cost=cost, system=system, parameters=parameters or {"a": 1})


def gaussian_problem(horizon=12):
    system = pydso.GaussianChain(lambda x, th: th["a"] * x + th["b"], scale=0.2)
    setting = pydso.Episodic(gamma=0.95, horizon=horizon, terminal=lambda x: x[0] > 0.8)
    return pydso.Problem(
        system,
        lambda x, th: jnp.sum(x**2),
        setting,
        pydso.Normal(jnp.zeros(2), 0.4),
        terminal_cost=lambda x, th: 10.0 * x[1] ** 2,
        name="gauss2",
    )


THETA = {"a": jnp.array([1.05, 0.9]), "b": jnp.array(0.02)}


# ------------------------------------------------------------------------------------------- round trips


def test_save_open_roundtrip_identical(tmp_path):
    ds = ragged_dataset()
    data.save(ds, tmp_path / "s")
    opened = data.open(tmp_path / "s")
    assert opened["state"].chunks is not None
    xr.testing.assert_identical(opened.load(), ds)
    assert json.loads(opened.attrs["parameters"]) == {"k": [1.0, 2.0], "b": 0.5}
    assert json.loads(opened.attrs["units"]) == {"state": "m", "time": "s"}
    assert opened.attrs["dt"] == 0.1
    np.testing.assert_allclose(opened["time"].values, np.arange(6) * 0.1)


def test_integer_state_roundtrip(tmp_path):
    state = np.random.default_rng(1).integers(0, 5, (4, 9, 1)).astype(np.int32)
    ds = data.make_dataset(state, system="tab")
    data.save(ds, tmp_path / "s")
    opened = data.open(tmp_path / "s", chunks=None)
    assert opened["state"].dtype == np.int32
    xr.testing.assert_identical(opened, ds)


def test_to_dataset_from_rollout_roundtrip(tmp_path):
    problem = gaussian_problem()
    traj = pydso.rollout(problem, THETA, key=jax.random.key(3), n=40)
    ds = data.to_dataset(traj, problem, THETA)
    n, horizon = 40, 12
    assert ds["state"].dims == ("episode", "time", "state_dim")
    assert ds["state"].shape == (n, horizon + 1, 2)
    np.testing.assert_array_equal(ds["state"].values, np.asarray(traj.states))
    np.testing.assert_array_equal(ds["cost"].values[:, :horizon], np.asarray(traj.costs))
    assert np.isnan(ds["cost"].values[:, horizon]).all()
    np.testing.assert_array_equal(ds["behavior_logp"].values[:, :horizon], np.asarray(traj.log_probs))
    assert np.isnan(ds["behavior_logp"].values[:, horizon]).all()
    np.testing.assert_array_equal(ds["terminal_cost"].values, np.asarray(traj.terminal_costs))
    alive = np.asarray(traj.alive)
    assert not alive.all(), "the test problem should have episodes that end in the terminal set"
    np.testing.assert_array_equal(ds["mask"].values[:, 1:], alive[:, :-1])
    assert ds["mask"].values[:, 0].all()
    assert ds.attrs["system"] == "gauss2"
    assert json.loads(ds.attrs["parameters"]) == {"a": [1.05, 0.9], "b": 0.02}
    assert "dt" not in ds.attrs and np.issubdtype(ds["time"].dtype, np.integer)
    data.save(ds, tmp_path / "roll")
    xr.testing.assert_identical(data.open(tmp_path / "roll").load(), ds)


def fake_trajectories(states, alive=None):
    """A duck-typed stand-in for pydso.Trajectories (no compilation needed)."""
    states = np.asarray(states)
    n, steps = states.shape[:2]
    return types.SimpleNamespace(
        states=states,
        costs=np.arange(n * (steps - 1), dtype=float).reshape(n, steps - 1),
        log_probs=-np.ones((n, steps - 1)),
        alive=np.ones((n, steps), bool) if alive is None else alive,
        terminal_costs=np.zeros(n),
    )


def test_to_dataset_integer_scalar_state():
    states = np.random.default_rng(0).integers(0, 3, (6, 6)).astype(np.int32)
    problem = types.SimpleNamespace(name="tab3", system=types.SimpleNamespace(has_log_prob=True), terminal_cost=None)
    ds = data.to_dataset(fake_trajectories(states), problem, {"p": np.eye(2)})
    assert ds["state"].shape == (6, 6, 1)
    assert ds["state"].dtype == np.int32
    np.testing.assert_array_equal(ds["state"].values[..., 0], states)
    assert json.loads(ds.attrs["state_shape"]) == []
    assert json.loads(ds.attrs["parameters"]) == {"p": [[1.0, 0.0], [0.0, 1.0]]}
    assert "terminal_cost" not in ds


def test_to_dataset_continuous_time_uses_system_dt_and_no_density():
    states = np.random.default_rng(0).normal(size=(3, 5, 2, 2))
    system = types.SimpleNamespace(dt=0.05, has_log_prob=False)
    problem = types.SimpleNamespace(name="ode", system=system, terminal_cost=None)
    ds = data.to_dataset(fake_trajectories(states), problem, jnp.array(1.0))
    assert ds.attrs["dt"] == 0.05
    np.testing.assert_allclose(ds["time"].values, 0.05 * np.arange(5))
    assert "behavior_logp" not in ds
    assert ds["state"].shape == (3, 5, 4) and json.loads(ds.attrs["state_shape"]) == [2, 2]
    assert data.to_dataset(fake_trajectories(states), problem, 1.0, dt=0.2).attrs["dt"] == 0.2


# ------------------------------------------------------------------------------------------- append


def test_append_two_batches_equals_concatenation(tmp_path):
    a, b = batch(0, 23), batch(23, 17)
    path = tmp_path / "s"
    data.save(a, path, episodes_per_chunk=5)
    assert data.append(path, b, episodes_per_chunk=4) == 40
    opened = data.open(path)
    assert opened.sizes["episode"] == 40
    xr.testing.assert_identical(opened.load(), xr.concat([a, b], "episode"))
    assert "parameters_by_part" not in opened.attrs


def test_save_of_opened_store_rechunks_and_open_chunks_argument(tmp_path):
    data.save(batch(0, 23), tmp_path / "a", episodes_per_chunk=5)
    data.append(tmp_path / "a", batch(23, 17), episodes_per_chunk=4)
    lazy = data.open(tmp_path / "a")
    assert lazy["state"].chunks[0] == (5, 5, 5, 5, 3, 4, 4, 4, 4, 1)
    data.save(lazy, tmp_path / "b", episodes_per_chunk=7)
    copy = data.open(tmp_path / "b")
    assert copy["state"].chunks[0] == (7, 7, 7, 7, 7, 5)
    xr.testing.assert_identical(copy.load(), lazy.load())
    assert data.open(tmp_path / "a", chunks=10)["state"].chunks[0] == (10, 10, 10, 10)
    in_memory = data.open(tmp_path / "a", chunks=None)
    assert isinstance(in_memory["state"].variable._data, np.ndarray)


def test_append_creates_missing_store_and_records_parameters(tmp_path):
    path = tmp_path / "new"
    data.append(path, batch(0, 3, parameters={"a": 1}))
    data.append(path, batch(3, 2, parameters={"a": 2}))
    opened = data.open(path)
    assert opened.sizes["episode"] == 5
    by_part = json.loads(opened.attrs["parameters_by_part"])
    assert by_part == [{"episodes": [0, 3], "parameters": {"a": 1}}, {"episodes": [3, 5], "parameters": {"a": 2}}]


def _other_version(ds):
    ds = ds.copy()
    ds.attrs["pydso_schema_version"] = 2
    return ds


def _other_dtype(ds):
    return ds.assign(state=ds["state"].astype(np.float32))


@pytest.mark.parametrize(
    "make_new, match",
    [
        (lambda: batch(5, 3, system="other"), r"'system' differs"),
        (lambda: batch(5, 3, d=4), r"'state'.*'state_dim' has size 4"),
        (lambda: _other_version(batch(5, 3)), r"pydso_schema_version 2"),
        (lambda: _other_dtype(batch(5, 3)), r"'state' has dtype float32"),
        (lambda: batch(5, 3).drop_vars("cost"), r"variables differ: missing \['cost'\]"),
        (lambda: batch(5, 3, n_time=9), r"'time' has size 9"),
    ],
    ids=["system", "state_dim", "schema_version", "dtype", "variables", "time"],
)
def test_append_refuses_incompatible(tmp_path, make_new, match):
    path = tmp_path / "s"
    data.save(batch(0, 5), path)
    with pytest.raises(DatasetError, match=match):
        data.append(path, make_new())
    assert data.open(path).sizes["episode"] == 5
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("part-")).__len__() == 1


def test_append_interrupted_before_commit_keeps_old_episodes(tmp_path, monkeypatch):
    """A crash after the new part is complete but before the manifest is replaced: old episodes only."""
    import pydso.data._store as store

    path = tmp_path / "s"
    data.save(batch(0, 4), path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(store, "_write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        data.append(path, batch(4, 3))
    monkeypatch.undo()
    assert len([p for p in path.iterdir() if p.name.startswith("part-")]) == 2  # an orphan part
    xr.testing.assert_identical(data.open(path).load(), batch(0, 4))
    data.append(path, batch(4, 3))
    xr.testing.assert_identical(data.open(path).load(), xr.concat([batch(0, 4), batch(4, 3)], "episode"))
    assert len([p for p in path.iterdir() if p.name.startswith("part-")]) == 2  # the orphan was collected


_KILL_CHILD = r"""
import importlib.util, os, sys, time, types
# Import pydso.data without pydso/__init__ (no JAX): fast start, and proves pydso.data needs no engine.
spec = importlib.util.find_spec("pydso")
pkg = types.ModuleType("pydso"); pkg.__path__ = list(spec.submodule_search_locations); sys.modules["pydso"] = pkg
import numpy as np
import pydso.data as data
import pydso.data._store as store

B, T, D = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
_fsync_tree, _replace, _rename = store._fsync_tree, os.replace, os.rename
def slow(f, s):
    def g(*a, **k):
        time.sleep(s); out = f(*a, **k); time.sleep(s); return out
    return g
# Widen the critical windows: part complete but not renamed, renamed but not committed, mid-commit.
store._fsync_tree = slow(_fsync_tree, 0.02)
os.replace = slow(_replace, 0.01)
os.rename = slow(_rename, 0.01)
data.open(sys.argv[1]).sizes["episode"]  # warm up lazy imports
print("ready", flush=True)
while True:
    n = data.open(sys.argv[1]).sizes["episode"]
    e = np.arange(n, n + B, dtype=float)[:, None, None]
    state = e + np.arange(T)[None, :, None] / 100 + np.arange(D)[None, None, :] / 1000
    cost = state[..., 0].copy(); cost[:, -1] = np.nan
    data.append(sys.argv[1], data.make_dataset(state, cost=cost, system="counter", parameters={"a": 1}),
                episodes_per_chunk=B // 4)
    print("committed", flush=True)
"""


def test_append_survives_sigkill(tmp_path):
    B, T, D, n0 = 1500, 8, 3, 10
    path = tmp_path / "s"
    data.save(batch(0, n0, n_time=T, d=D), path)
    rng = np.random.default_rng(12345)
    counts, leftovers = [], 0
    rounds = 4
    for r in range(rounds):
        # Let 0 or 1 appends commit first (at least 1 in the last round), then kill at a random moment.
        wait_commits = 1 if r == rounds - 1 else int(rng.integers(0, 2))
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD, str(path), str(B), str(T), str(D)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline()
            assert line.strip() == "ready", proc.stderr.read()
            for _ in range(wait_commits):
                line = proc.stdout.readline()
                assert line.strip() == "committed", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.4))
            assert proc.poll() is None, f"child died early: {proc.stderr.read()}"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        names = {p.name for p in path.iterdir()}
        manifest = json.loads((path / "pydso.json").read_text())
        committed = {p["name"] for p in manifest["parts"]}
        leftovers += bool(names - committed - {"pydso.json", ".lock"})
        ds = data.open(path)
        n = ds.sizes["episode"]
        assert (n - n0) % B == 0, f"store holds {n} episodes: a partial append became visible"
        counts.append(n)
        expected = batch(0, n, n_time=T, d=D)
        np.testing.assert_array_equal(ds["state"].values, expected["state"].values)
        np.testing.assert_array_equal(ds["cost"].values, expected["cost"].values)
    assert counts == sorted(counts) and counts[-1] > n0, counts
    assert leftovers >= 1, "no kill landed in the middle of an append"
    n = data.append(path, batch(counts[-1], 5, n_time=T, d=D))
    names = {p.name for p in path.iterdir()}
    assert names == {"pydso.json", ".lock"} | {
        p["name"] for p in json.loads((path / "pydso.json").read_text())["parts"]
    }
    xr.testing.assert_identical(data.open(path).load(), batch(0, n, n_time=T, d=D))


# ------------------------------------------------------------------------------------------- save / open errors


def test_save_refuses_existing_store_unless_overwrite(tmp_path):
    path = tmp_path / "s"
    data.save(batch(0, 3), path)
    with pytest.raises(DatasetError, match="already exists.*overwrite=True"):
        data.save(batch(0, 4), path)
    data.save(batch(0, 4), path, overwrite=True)
    assert data.open(path).sizes["episode"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary directories left
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a pydso trajectory store"):
        data.save(batch(0, 3), other, overwrite=True)
    assert (other / "precious.txt").exists()


def test_open_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        data.open(tmp_path / "nope")


def test_open_not_a_store(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a zarr store"):
        data.open(tmp_path / "dir")
    with pytest.raises(DatasetError, match="is a file"):
        data.open(tmp_path / "file.txt")


def test_open_foreign_zarr_store(tmp_path):
    xr.Dataset({"x": (("a", "b"), np.ones((3, 2)))}).to_zarr(tmp_path / "foreign", consolidated=False)
    with pytest.raises(DatasetError, match="zarr store not written by pydso"):
        data.open(tmp_path / "foreign")
    with pytest.raises(DatasetError, match="zarr store not written by pydso"):
        data.append(tmp_path / "foreign", batch(0, 2))


def test_open_plain_zarr_with_schema_attrs(tmp_path):
    ds = batch(0, 6)
    ds.to_zarr(tmp_path / "plain", consolidated=False)
    xr.testing.assert_identical(data.open(tmp_path / "plain").load(), ds)


@pytest.mark.parametrize(
    "target, match",
    [
        ("pydso.json", r"manifest pydso\.json is not valid JSON"),
        ("part/zarr.json", r"corrupt store: part .* could not be opened"),
        ("part/state/zarr.json", r"corrupt store: part .* could not be opened"),
    ],
)
def test_open_corrupt_store(tmp_path, target, match):
    path = tmp_path / "s"
    data.save(batch(0, 5), path)
    part = next(p for p in path.iterdir() if p.name.startswith("part-"))
    file = path / target.replace("part", part.name, 1) if target.startswith("part") else path / target
    assert file.exists()
    file.write_bytes(b"\x00garbage{{{")
    with pytest.raises(DatasetError, match=match):
        data.open(path)


def test_open_store_with_missing_part(tmp_path):
    import shutil

    path = tmp_path / "s"
    data.save(batch(0, 5), path)
    shutil.rmtree(next(p for p in path.iterdir() if p.name.startswith("part-")))
    with pytest.raises(DatasetError, match="listed in pydso.json is missing"):
        data.open(path)


# ------------------------------------------------------------------------------------------- validation


def _valid():
    return batch(0, 4)


def _with(**changes):
    def make():
        ds = _valid()
        for fn in changes.values():
            ds = fn(ds)
        return ds

    return make


def _set_state(values):
    def fn(ds):
        return ds.assign(state=(ds["state"].dims, values(ds["state"].values.copy())))

    return fn


def _nan_at(e, t):
    def f(a):
        a[e, t] = np.nan
        return a

    return f


def _nan_tail(a):
    a[1, 5:] = np.nan
    return a


def _attrs(**kv):
    def fn(ds):
        ds = ds.copy()
        ds.attrs.update(kv)
        return ds

    return fn


def _del_attr(name):
    def fn(ds):
        ds = ds.copy()
        del ds.attrs[name]
        return ds

    return fn


def _mask(values):
    def fn(ds):
        m = np.ones((ds.sizes["episode"], ds.sizes["time"]), bool)
        return ds.assign(mask=(("episode", "time"), values(m)))

    return fn


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _valid().drop_vars("state"), r"variable 'state' .* is missing"),
        (lambda: _valid().transpose("time", "episode", "state_dim"), r"variable 'state' has dims \('time'"),
        (lambda: _valid().assign(state=_valid()["state"] > 0), r"variable 'state' has dtype bool"),
        (lambda: _valid().assign(mask=_valid()["cost"].fillna(0)), r"variable 'mask' has dtype float64"),
        (_with(s=_set_state(_nan_at(2, 3))), r"variable 'state' has NaN/inf at episode 2, time index 3"),
        (_with(s=_set_state(_nan_tail)), r"variable 'state' ends in NaN in episode\(s\) \[1\].*'mask'"),
        (
            _with(s=_set_state(_nan_tail), m=_mask(lambda m: m)),
            r"variable 'state' has NaN/inf where 'mask' is True: episode 1, time index 5",
        ),
        (_with(m=_mask(lambda m: (m.__setitem__((2, 3), False), m)[1])), r"variable 'mask' of episode 2 is not"),
        (_with(a=_attrs(pydso_schema_version=7)), r"'pydso_schema_version' is 7"),
        (_with(a=_del_attr("pydso_schema_version")), r"'pydso_schema_version' is missing"),
        (
            lambda: _valid().assign_coords(time=np.array([0, 1, 2, 2, 4, 5, 6, 7])),
            r"coordinate 'time' is not strictly increasing: time\[2\]",
        ),
        (_with(a=_attrs(parameters="{not json")), r"attribute 'parameters' is not valid JSON"),
        (_with(a=_attrs(units='{"nothere": "m"}')), r"attribute 'units' names unknown variable"),
        (
            lambda: _valid().assign(cost=_valid()["cost"].where(_valid()["time"] != 2)),
            r"variable 'cost' has NaN/inf at episode 0, time index 2",
        ),
        (
            lambda: _valid().assign(extra=(("time",), np.zeros(8))),
            r"variable 'extra' .* 'episode' as its first dimension",
        ),
    ],
    ids=[
        "missing_state",
        "dim_order",
        "state_dtype",
        "mask_dtype",
        "nan_state",
        "ragged_without_mask",
        "nan_under_mask",
        "mask_not_prefix",
        "unknown_version",
        "missing_version",
        "time_not_increasing",
        "parameters_json",
        "units_unknown",
        "nan_cost_on_step",
        "extra_variable_dims",
    ],
)
def test_validate_errors(make, match):
    with pytest.raises(DatasetError, match=match):
        data.validate(make())


def test_validate_accepts_masked_nan_and_errors_are_value_errors():
    ds = ragged_dataset()
    assert data.validate(ds) is ds
    assert np.isnan(ds["state"].values).any()
    assert issubclass(DatasetError, ValueError)


def test_make_dataset_shape_errors():
    with pytest.raises(DatasetError, match=r"variable 'state' must have 3 dimensions"):
        data.make_dataset(np.zeros((3, 4)))
    with pytest.raises(DatasetError, match=r"variable 'cost' has shape \(3, 5\)"):
        data.make_dataset(np.zeros((3, 4, 1)), cost=np.zeros((3, 5)))


def test_save_validates(tmp_path):
    bad = _with(s=_set_state(_nan_at(0, 0)))()
    with pytest.raises(DatasetError, match="variable 'state'"):
        data.save(bad, tmp_path / "s")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------- laziness


def test_open_is_lazy_and_iter_chunks_reads_one_chunk_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "s"
    n, k = 600, 40
    data.save(batch(0, n), path, episodes_per_chunk=k)
    reads = []
    original_get = zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):
        reads.append(key)
        return await original_get(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    ds = data.open(path)
    for name in ("state", "cost"):
        assert ds[name].chunks[0] == (k,) * (n // k)
        assert type(ds[name].data).__module__.startswith("dask")
    assert not any("/c/" in key for key in reads if not key.startswith("time/")), "open read data chunks"
    reads.clear()
    total = 0
    for i, chunk in enumerate(data.iter_chunks(ds, k)):
        assert chunk.sizes["episode"] <= k
        assert isinstance(chunk["state"].variable._data, np.ndarray)
        chunk_reads = sorted(key for key in reads if "/c/" in key)
        assert chunk_reads == [f"cost/c/{i}/0", f"state/c/{i}/0/0"], chunk_reads
        np.testing.assert_array_equal(chunk["state"].values[:, 0, 0], np.arange(i * k, (i + 1) * k))
        total += chunk.sizes["episode"]
        reads.clear()
    assert total == n
    sizes = [c.sizes["episode"] for c in data.iter_chunks(ds, 70)]
    assert sizes == [70] * 8 + [40]
    assert [c.sizes["episode"] for c in data.iter_chunks(ds)] == [k] * (n // k)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_inspect(tmp_path, capsys):
    path = tmp_path / "s"
    data.save(ragged_dataset(n=7), path)
    data.append(path, ragged_dataset(n=5, seed=3))
    assert pydso.cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    lengths = np.concatenate(
        [data.episode_lengths(ragged_dataset(n=7)), data.episode_lengths(ragged_dataset(5, seed=3))]
    )
    assert "episodes: 12" in out
    assert "time: 6 steps" in out
    assert "state" in out and "(episode, time, state_dim)" in out and "float64" in out
    assert "system: toy" in out
    assert f"min {lengths.min()}, mean {lengths.mean():.2f}, max {lengths.max()}" in out


def test_cli_inspect_ess_option_and_errors(tmp_path, capsys, monkeypatch):
    import jax
    import jax.numpy as jnp

    from pydso.estimators import ess_report

    # A real log: a Gaussian chain x' = a x + noise recorded under a = 0.5, then reweighted to a = 0.6.
    (tmp_path / "my_problem_mod.py").write_text(
        "import jax.numpy as jnp, pydso\n"
        "def factory():\n"
        "    problem = pydso.Problem(pydso.GaussianChain(lambda x, a: a * x, 0.3), lambda x, a: jnp.sum(x**2),\n"
        "                            pydso.Episodic(0.9, 8), pydso.Normal(jnp.zeros(1), 1.0), name='ar1')\n"
        "    return problem, jnp.asarray(0.5)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_problem_mod

    problem, _ = my_problem_mod.factory()
    path = tmp_path / "log.zarr"
    pydso.rollout(problem, jnp.asarray(0.5), key=jax.random.key(0), n=64, record=path)
    theta = tmp_path / "theta.npz"
    np.savez(theta, np.asarray(0.6))
    argv = ["inspect", str(path), "--problem", "my_problem_mod:factory", "--theta", str(theta)]
    assert pydso.cli.main(argv) == 0
    expected = ess_report(problem, jnp.asarray(0.6), data.open(path), warn_below=None)
    assert 1.0 < expected["episode"] < 64.0
    assert f"ESS under theta: {expected['episode']:.1f} of 64 episodes" in capsys.readouterr().out
    np.savez(theta, np.asarray(0.5))  # the behaviour parameters: every weight is 1
    assert pydso.cli.main(argv) == 0
    assert "ESS under theta: 64.0 of 64 episodes" in capsys.readouterr().out

    assert pydso.cli.main(["inspect", str(path), "--problem", "no_such_mod:f", "--theta", str(theta)]) == 2
    assert "cannot import module 'no_such_mod'" in capsys.readouterr().err
    assert pydso.cli.main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_iter_chunks_never_yields_a_lone_trailing_episode_and_errors_are_problem_errors():
    ds = batch(0, 5)
    sizes = [c.sizes["episode"] for c in data.iter_chunks(ds, np.int64(4))]
    assert sizes == [5]
    assert [c.sizes["episode"] for c in data.iter_chunks(ds, 2)] == [2, 3]
    assert issubclass(data.DatasetError, pydso.ProblemError) and pydso.DatasetError is data.DatasetError
    with pytest.raises(pydso.ProblemError, match="episodes_per_chunk must be a positive integer"):
        list(data.iter_chunks(ds, 0))
