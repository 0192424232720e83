"""System identification: problem constructor, losses, covariance, batch fits on Dask, CLI and readers."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import pydso  # noqa: F401  (float64)
from pydso.data import ReaderError, from_csv, from_mat, from_npz, make_dataset, save
from pydso.problems import sysid as S
from pydso.problems.sysid import fit_many, load_model

REPO = Path(__file__).resolve().parents[1]
SILVERBOX = REPO.parent / "shared" / "data" / "silverbox"


# ------------------------------------------------------------------------------------------------ models
def duffing(t, x, u, th):
    return jnp.array([x[1], -th["d"] * x[1] - th["k"] * x[0] - th["k3"] * x[0] ** 3 + th["g"] * u[0]])


def first_output(x, u, th):
    return x[:1]


DUFFING = S.ContinuousModel(
    duffing,
    first_output,
    {"d": 0.4, "k": 2.0, "k3": 1.0, "g": 1.5},
    x0=[0.0, 0.0],
    transforms={"d": "positive", "k": "positive"},
)
T_BATCH, DT = 100, 0.1


def simulate(model, theta, u, x0, dt):
    """Outputs (episode, time, output) with per-episode parameters (every leaf of ``theta`` has the episode axis)."""
    theta = jax.tree.map(jnp.asarray, theta)

    def one(th, uu):
        return S.simulate_outputs(model, th, jnp.asarray(x0, float)[None], uu[None], dt=dt)[0][0]

    return np.asarray(jax.vmap(one)(theta, jnp.asarray(u)))


def io_dataset(u, y, dt, state=None):
    return make_dataset(y if state is None else state, input=u, output=y, dt=dt)


# ------------------------------------------------------------------------------------------------ recovery
def test_noise_free_simulation_error_recovers_parameters_exactly():
    rng = np.random.default_rng(0)
    true = {"d": 0.3, "k": 1.7, "k3": 0.8, "g": 1.2}
    u = rng.normal(size=(2, T_BATCH, 1))
    th = {k: np.full(2, v) for k, v in true.items()}
    y = simulate(DUFFING, th, u, [0.5, -0.2], DT)
    res = S.fit(DUFFING, io_dataset(u, y, DT))
    assert res.converged
    for name, v in true.items():
        assert res.as_dict()[name] == pytest.approx(v, rel=1e-6), name
    np.testing.assert_allclose(res.x0, [[0.5, -0.2], [0.5, -0.2]], atol=1e-7)
    assert res.fit_percent[0] > 99.999 and res.rmse[0] < 1e-6


def test_discrete_model_one_step_prediction_with_measured_state_is_exact():
    def f(x, u, th):
        return th["A"] @ x + th["B"] * u[0]

    A = np.array([[0.9, 0.2], [-0.2, 0.8]])
    B = np.array([0.0, 0.5])
    rng = np.random.default_rng(1)
    u = rng.normal(size=(1, 60, 1))
    xs = [np.array([1.0, 0.0])]
    for t in range(59):
        xs.append(A @ xs[-1] + B * u[0, t, 0])
    x = np.stack(xs)[None]
    model = S.DiscreteModel(f, None, {"A": np.eye(2) * 0.5, "B": np.ones(2)}, x0=[0.0, 0.0], dt=1.0)
    ds = make_dataset(x, input=u, output=x, dt=1.0)
    res = S.fit(model, ds, loss="prediction")
    np.testing.assert_allclose(res.estimate, np.concatenate([A.ravel(), B]), rtol=1e-8, atol=1e-10)
    assert res.names[:2] == ["A[0]", "A[1]"]
    # the same model refuses data sampled at another rate
    with pytest.raises(S.SysIdError, match="mismatched sample times"):
        S.SysIdProblem(model, make_dataset(x, input=u, output=x, dt=0.5), loss="prediction")


def test_covariance_delta_method_nll_and_optax(batch_store):
    """One noisy experiment: (a) the delta-method covariance in physical parameters does not depend on the
    transform (log vs identity); (b) the Gaussian NLL has the same optimum as least squares for one output and
    estimates the noise std; (c) the optax path reaches the same optimum."""
    path, truth = batch_store
    ds = pydso.data.open(path).isel(episode=[7]).load()
    r_log = S.fit(DUFFING, ds, output_scale=1.0)
    ident = S.ContinuousModel(duffing, first_output, DUFFING.params, x0=[0.0, 0.0])
    r_id = S.fit(ident, ds, output_scale=1.0)
    np.testing.assert_allclose(r_id.estimate, r_log.estimate, rtol=1e-7)
    np.testing.assert_allclose(r_id.stderr, r_log.stderr, rtol=1e-5)
    assert r_log.noise_std[0] == pytest.approx(0.02, rel=0.2)
    r_nll = S.fit(DUFFING, ds, loss="nll", output_scale=1.0)
    np.testing.assert_allclose(r_nll.estimate, r_log.estimate, rtol=1e-4)
    assert r_nll.noise_std[0] == pytest.approx(r_log.noise_std[0], rel=0.05)
    np.testing.assert_allclose(r_nll.stderr, r_log.stderr, rtol=0.3)
    import optax

    r_adam = S.fit(DUFFING, ds, output_scale=1.0, solver="optax", optimizer=optax.adam(2e-2), steps=3000)
    assert np.all(np.abs(r_adam.estimate - r_log.estimate) < 0.1 * r_log.stderr)


def test_grey_box_with_equinox_network_fits():
    """Any callable works: physical linear part + an equinox MLP for the restoring-force nonlinearity."""
    import equinox as eqx

    rng = np.random.default_rng(4)
    u = rng.normal(size=(1, 100, 1))
    y = simulate(
        DUFFING, {k: np.array([v]) for k, v in {"d": 0.3, "k": 1.7, "k3": 0.8, "g": 1.2}.items()}, u, [0.5, 0.0], DT
    )
    ds = io_dataset(u, y, DT)
    net = eqx.nn.MLP(1, 1, 8, 1, key=jax.random.PRNGKey(0))
    net = jax.tree.map(lambda a: 0.1 * a if eqx.is_inexact_array(a) else a, net)

    def f(t, x, u, th):
        return jnp.array([x[1], -th["d"] * x[1] - th["k"] * x[0] - th["net"](x[:1])[0] + th["g"] * u[0]])

    model = S.ContinuousModel(f, first_output, {"d": 0.5, "k": 2.0, "g": 1.0, "net": net}, x0=[0.0, 0.0])
    prob = S.SysIdProblem(model, ds)
    cost0 = 0.5 * float(jnp.sum(prob.residuals(prob.z0) ** 2))
    res = prob.fit(max_steps=300)
    assert any(n.startswith("net.layers.0.weight") for n in res.names) and len(res.names) == 3 + 8 + 8 + 8 + 1
    assert res.cost < 0.2 * cost0 and np.all(np.isfinite(res.estimate))


def oscillator(t, x, u, th):
    w = th["omega"]
    return jnp.array([x[1], -2 * th["zeta"] * w * x[1] - w**2 * x[0] + w**2 * u[0]])


def test_multiple_shooting_converges_where_single_shooting_fails():
    """Lightly damped oscillator (15 s, 15 periods), frequency guessed 50% too high, damping bounded to
    (0, 0.05): the simulation error has a local minimum there; multiple shooting (segments of 10 samples,
    states initialised by finite differences of the output) reaches the true parameters."""
    T, dt = 300, 0.05
    rng = np.random.default_rng(1)
    u = 0.05 * rng.normal(size=(1, T, 1))
    true = {"omega": np.array([2 * np.pi]), "zeta": np.array([0.01])}
    y = simulate(S.ContinuousModel(oscillator, first_output, {}, x0=[0, 0]), true, u, [1.0, 0.0], dt)
    ds = io_dataset(u, y, dt)
    model = S.ContinuousModel(
        oscillator,
        first_output,
        {"omega": 2 * np.pi * 1.5, "zeta": 0.02},
        x0=[0.0, 0.0],
        transforms={"omega": "positive", "zeta": (0.0, 0.05)},
        state_from_output=S.finite_difference_states(2),
    )
    single = S.fit(model, ds, loss="simulation")
    assert abs(single.as_dict()["omega"] / (2 * np.pi) - 1) > 0.1 and single.fit_percent[0] < 50
    multi = S.fit(model, ds, loss=S.MultipleShooting(segment_length=10))
    assert multi.as_dict()["omega"] == pytest.approx(2 * np.pi, rel=1e-6)
    assert multi.as_dict()["zeta"] == pytest.approx(0.01, rel=1e-6)
    assert multi.fit_percent[0] > 99.99


# ------------------------------------------------------------------------------------------------ batch
@pytest.fixture(scope="module")
def batch_store(tmp_path_factory):
    """200 experiments of the Duffing oscillator, different true parameters, measurement noise 0.02."""
    rng = np.random.default_rng(42)
    E = 200
    truth = {
        "d": rng.uniform(0.2, 0.6, E),
        "k": rng.uniform(1.0, 3.0, E),
        "k3": rng.uniform(0.5, 2.0, E),
        "g": rng.uniform(1.0, 2.0, E),
    }
    u = rng.normal(size=(E, T_BATCH, 1))
    y = simulate(DUFFING, truth, u, [0.5, 0.0], DT) + 0.02 * rng.normal(size=(E, T_BATCH, 1))
    path = tmp_path_factory.mktemp("batch") / "experiments.zarr"
    save(make_dataset(y, input=u, output=y, dt=DT, system="duffing", parameters=truth), path)
    return path, truth


def test_fit_many_recovers_batch_with_calibrated_intervals(batch_store, tmp_path):
    path, truth = batch_store
    out = tmp_path / "results.zarr"
    res = fit_many(DUFFING, str(path), out=str(out), n_workers=2, fit_options={"output_scale": 1.0})
    assert res.sizes["experiment"] == 200
    assert (res["status"].values == "ok").all(), res["error"].values
    true = np.stack([truth[n] for n in res["parameter"].values], axis=1)
    est = res["estimate"].values
    assert np.median(np.abs(est - true) / true) < 0.05
    inside = (res["ci_low"].values <= true) & (true <= res["ci_high"].values)
    coverage = inside.mean()
    assert 0.88 <= coverage <= 0.99, coverage
    for j in range(true.shape[1]):
        assert 0.85 <= inside[:, j].mean() <= 1.0
    # stored, and a re-run skips everything already done (same results, no new fits)
    stored = xr.open_zarr(out).load()
    np.testing.assert_array_equal(stored["estimate"].values, est)
    seen = []
    again = fit_many(DUFFING, str(path), out=str(out), on_result=seen.append)
    assert seen == []
    np.testing.assert_array_equal(again["estimate"].values, est)


def test_failing_experiment_is_recorded_and_others_finish(batch_store):
    path, truth = batch_store
    ds = pydso.data.open(path).load()
    good = [ds.isel(episode=[i]) for i in range(3)]
    bad = good[1].copy(deep=True)
    bad["output"][0, 17, 0] = np.nan
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        res = fit_many(
            DUFFING, [good[0], bad, good[2]], scheduler=cluster.scheduler_address, fit_options={"output_scale": 1.0}
        )
    status = list(res["status"].values)
    assert status[0] == "ok" and status[2] == "ok" and status[1] == "failed"
    assert "NaN" in str(res["error"].values[1]) and "'output'" in str(res["error"].values[1])
    assert np.isnan(res["estimate"].values[1]).all()


# ------------------------------------------------------------------------------------------------ errors
def _raw(u=True, y=True, t=None, T=20):
    rng = np.random.default_rng(3)
    data = {}
    if u:
        data["input"] = (("episode", "time", "input_dim"), rng.normal(size=(1, T, 1)))
    if y:
        data["output"] = (("episode", "time", "output_dim"), rng.normal(size=(1, T, 1)))
    return xr.Dataset(data, coords={"time": np.arange(T) * 0.1 if t is None else t})


def test_bad_inputs_give_clear_errors():
    with pytest.raises(S.SysIdError, match="no 'input' variable"):
        S.SysIdProblem(DUFFING, _raw(u=False))
    with pytest.raises(S.SysIdError, match="no 'output' variable"):
        S.SysIdProblem(DUFFING, _raw(y=False))
    t = np.arange(20) * 0.1
    t[10:] += 0.05
    with pytest.raises(S.SysIdError, match="mismatched sample times"):
        S.SysIdProblem(DUFFING, _raw(t=t))
    ds = _raw()
    ds["input"][0, 5, 0] = np.nan
    with pytest.raises(S.SysIdError, match=r"'input' has 1 NaN.*time index 5"):
        S.SysIdProblem(DUFFING, ds)
    two_out = S.ContinuousModel(duffing, lambda x, u, th: x, DUFFING.params, x0=[0.0, 0.0])
    with pytest.raises(S.SysIdError, match="output dimension mismatch.*shape \\(2,\\).*1 channel"):
        S.SysIdProblem(two_out, _raw())
    with pytest.raises(S.SysIdError, match="parameter 'd'.*positive"):
        S.SysIdProblem(DUFFING, _raw(), params={"d": -1.0, "k": 1.0, "k3": 0.0, "g": 1.0})
    with pytest.raises(S.SysIdError, match="prediction loss needs states"):
        S.SysIdProblem(DUFFING, _raw(), loss="prediction")
    with pytest.raises(S.SysIdError, match="unknown loss"):
        S.SysIdProblem(DUFFING, _raw(), loss="bogus")


# ------------------------------------------------------------------------------------------------ CLI
MODEL_MODULE = """
import jax.numpy as jnp
from pydso.problems.sysid import ContinuousModel

def f(t, x, u, th):
    return jnp.array([x[1], -th["d"] * x[1] - th["k"] * x[0] + th["g"] * u[0]])

def make():
    return ContinuousModel(f, lambda x, u, th: x[:1], {"d": 0.5, "k": 2.0, "g": 1.0}, x0=[0.0, 0.0],
                           transforms={"d": "positive"})
"""


def test_cli_matches_python_api(tmp_path, capsys):
    from pydso.cli import main

    (tmp_path / "cli_model_mod.py").write_text(MODEL_MODULE)
    spec = f"{tmp_path / 'cli_model_mod.py'}:make"
    model = load_model(spec)
    rng = np.random.default_rng(5)
    u = rng.normal(size=(3, 80, 1))
    th = {"d": np.array([0.3, 0.5, 0.7]), "k": np.array([1.0, 2.0, 3.0]), "g": np.array([1.0, 1.5, 2.0])}
    y = simulate(model, th, u, [0.2, 0.0], 0.1) + 0.01 * rng.normal(size=(3, 80, 1))
    ds = make_dataset(y, input=u, output=y, dt=0.1)
    save(ds, tmp_path / "d.zarr")
    out = tmp_path / "r.zarr"
    rc = main(["sysid", "--model", spec, "--data", str(tmp_path / "d.zarr"), "--out", str(out), "--progress", "off"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "experiments: ok=3" in text and "median stderr" in text
    res = xr.open_zarr(out).load()
    for i in range(3):
        api = S.fit(model, ds.isel(episode=[i]))
        np.testing.assert_allclose(res["estimate"].values[i], api.estimate, rtol=1e-10)
        np.testing.assert_allclose(res["stderr"].values[i], api.stderr, rtol=1e-8)


def test_cli_help_documents_every_option(capsys):
    from pydso.cli import main

    with pytest.raises(SystemExit):
        main(["sysid", "--help"])
    text = capsys.readouterr().out
    for opt in ("--model", "--data", "--out", "--scheduler", "--workers", "--loss", "--processes", "--no-resume"):
        assert opt in text


# ------------------------------------------------------------------------------------------------ readers
def test_csv_reader_trailing_commas_and_header_quirks(tmp_path):
    p = tmp_path / "rec.csv"
    p.write_text('"flag", "V1" ,"V2",\n1,0.5,1.5,\n,0.25,-1.0,\n,0.125,2e-3,\n')
    ds = from_csv(p, columns={"input": ["V1"], "output": ["V2"]}, dt=0.01, units={"input": "V"})
    np.testing.assert_allclose(ds["input"].values[0, :, 0], [0.5, 0.25, 0.125])
    np.testing.assert_allclose(ds["output"].values[0, :, 0], [1.5, -1.0, 2e-3])
    np.testing.assert_allclose(ds["time"].values, [0.0, 0.01, 0.02])
    with pytest.raises(ReaderError, match="missing column 'V3'"):
        from_csv(p, columns={"input": ["V1"], "output": ["V3"]}, dt=0.01)
    with pytest.raises(ReaderError, match="column 'flag'.*NaN/missing"):
        from_csv(p, columns={"input": ["flag"], "output": ["V2"]}, dt=0.01)
    q = tmp_path / "bad.csv"
    q.write_text("# comment line\nu,y\n1,2\n1,abc\n")
    with pytest.raises(ReaderError, match="column 'y'.*non-numeric value 'abc'"):
        from_csv(q, columns={"input": ["u"], "output": ["y"]}, dt=1.0, skip_rows=1)
    assert isinstance(ReaderError("x"), ValueError)


def test_npz_and_mat_readers(tmp_path):
    import scipy.io

    u, y = np.linspace(0, 1, 50), np.cos(np.linspace(0, 1, 50))
    np.savez(tmp_path / "r.npz", u=u, y=np.stack([y, 2 * y], 1), Ts=0.1)
    ds = from_npz(tmp_path / "r.npz", columns={"input": ["u"], "output": ["y"]}, dt="Ts")
    assert ds["output"].shape == (1, 50, 2) and ds.attrs["dt"] == 0.1
    scipy.io.savemat(tmp_path / "r.mat", {"u": u[None, :], "y": y[:, None]})
    ds = from_mat(tmp_path / "r.mat", columns={"input": "u", "output": "y"}, dt=0.1)
    np.testing.assert_allclose(ds["input"].values[0, :, 0], u)
    with pytest.raises(ReaderError, match="missing variable 'z'"):
        from_mat(tmp_path / "r.mat", columns={"input": "u", "output": "z"}, dt=0.1)
    y_nan = y.copy()
    y_nan[3] = np.nan
    np.savez(tmp_path / "n.npz", u=u, y=y_nan)
    with pytest.raises(ReaderError, match="'y'.*NaN"):
        from_npz(tmp_path / "n.npz", columns={"input": ["u"], "output": ["y"]}, dt=0.1)


@pytest.mark.skipif(
    not (SILVERBOX / "SNLS80mV.csv").exists(),
    reason=f"Silverbox benchmark data not found at {SILVERBOX} (../shared/data/silverbox relative to the repo)",
)
def test_silverbox_csv_reads():
    ds = from_csv(SILVERBOX / "SNLS80mV.csv", columns={"input": ["V1"], "output": ["V2"]}, dt=2**14 / 1e7)
    assert ds["input"].shape == (1, 131072, 1)
    assert abs(float(ds["output"].std()) - 0.05) < 0.05
    ds2 = from_csv(SILVERBOX / "Schroeder80mV.csv", columns={"input": ["V1"], "output": ["V2"]}, dt=2**14 / 1e7)
    assert ds2["output"].shape == (1, 131072, 1)


def test_results_dir_is_clean():
    assert os.path.isdir(REPO / "pydso" / "problems")


def test_results_store_is_recovered_after_a_crash_during_the_swap(tmp_path):
    from pydso.problems.sysid import open_results
    from pydso.problems.sysid._batch import write_results

    out = str(tmp_path / "results.zarr")
    ds = xr.Dataset({"estimate": ("experiment", np.arange(3.0))}, coords={"experiment": ["a", "b", "c"]})
    write_results(ds, out)
    os.replace(out, f"{out}.old-12345")  # a crash between moving the old store aside and renaming the new one
    recovered = open_results(out)
    np.testing.assert_array_equal(recovered["estimate"].values, np.arange(3.0))
    # a second write replaces pydso's own store (and leaves nothing else behind)
    write_results(ds.assign(estimate=ds["estimate"] + 1), out)
    np.testing.assert_array_equal(open_results(out)["estimate"].values, np.arange(3.0) + 1)
    assert sorted(os.listdir(tmp_path)) == ["results.zarr"]


def test_results_path_that_is_not_a_pydso_store_is_never_touched(tmp_path, batch_store):
    """A directory of user files, a regular file, or a directory beside ``out`` named like a moved-aside store:
    pydso refuses to write there (SysIdError naming the path) and deletes or moves nothing."""
    from pydso.problems.sysid import open_results
    from pydso.problems.sysid._batch import write_results

    ds = xr.Dataset({"estimate": ("experiment", np.arange(2.0))}, coords={"experiment": ["a", "b"]})
    user_dir = tmp_path / "mine.zarr"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("precious")
    (user_dir / ".zattrs").write_text('{"created_by": "someone else"}')
    user_file = tmp_path / "notes.txt"
    user_file.write_text("also precious")
    path, _ = batch_store
    for target in (user_dir, user_file):
        with pytest.raises(S.SysIdError, match=f"{str(target)!r} exists and is a (directory|file) that is not a pydso"):
            write_results(ds, target)
        with pytest.raises(S.SysIdError, match=f"{str(target)!r} exists"):
            fit_many(DUFFING, str(path), out=str(target), progress=False)
        with pytest.raises(S.SysIdError, match=f"{str(target)!r} exists"):
            open_results(target)
    assert (user_dir / "thesis.tex").read_text() == "precious" and user_file.read_text() == "also precious"
    # a user's directory that merely looks like a moved-aside store is not "recovered" into place
    aside = tmp_path / "results.zarr.old-999"
    aside.mkdir()
    (aside / "data.bin").write_text("user data")
    with pytest.raises(FileNotFoundError, match="no results store"):
        open_results(tmp_path / "results.zarr")
    assert (aside / "data.bin").read_text() == "user data" and not (tmp_path / "results.zarr").exists()
    assert sorted(os.listdir(tmp_path)) == ["mine.zarr", "notes.txt", "results.zarr.old-999"]
    assert sorted(os.listdir(user_dir)) == [".zattrs", "thesis.tex"]


def test_load_model_from_package_module_on_sys_path(tmp_path, monkeypatch):
    """Regression: 'package.module:factory' used to fail with UnboundLocalError."""
    pkg = tmp_path / "sysid_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODEL_MODULE + "\n\ndef not_a_model():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("sysid_user_pkg.models:make")
    assert isinstance(model, S.ContinuousModel) and model.n_states == 2
    assert load_model("sysid_user_pkg.models:make") is model  # cached per process
    with pytest.raises(S.SysIdError, match="no attribute 'nope'"):
        load_model("sysid_user_pkg.models:nope")
    with pytest.raises(S.SysIdError, match="cannot import module 'sysid_user_pkg.missing'"):
        load_model("sysid_user_pkg.missing:make")
    with pytest.raises(S.SysIdError, match="expected a pydso.problems.sysid ContinuousModel.*got int"):
        load_model("sysid_user_pkg.models:not_a_model")
    with pytest.raises(S.SysIdError, match="calling the factory failed: TypeError"):
        load_model("sysid_user_pkg.models:f")  # f(t, x, u, th) needs arguments
