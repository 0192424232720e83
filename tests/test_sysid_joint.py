"""Joint system identification: parameters shared by all experiments plus per-experiment parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import pydso  # noqa: F401  (float64)
from pydso.data import make_dataset, save
from pydso.problems import JointSysIdResult, fit_joint
from pydso.problems import sysid as S
from pydso.problems.sysid import fit_many, load_model

MODEL_MODULE = """
import jax.numpy as jnp
from pydso.problems.sysid import ContinuousModel

def duffing(t, x, u, th):
    return jnp.array([x[1], -th["d"] * x[1] - th["k"] * x[0] - th["k3"] * x[0] ** 3 + th["g"] * u[0]])

def make():
    return ContinuousModel(duffing, lambda x, u, th: x[:1], {"d": 0.4, "k": 2.0, "k3": 1.0, "g": 1.5},
                           x0=[0.0, 0.0], transforms={"d": "positive", "k": "positive"})
"""
J, T, DT, K3 = 6, 100, 0.1, 0.8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The Duffing model (from a module file, so the CLI loads the same object) and 6 experiments with a
    shared cubic stiffness k3 = 0.8 and their own damping, stiffness, input gain and initial state."""
    d = tmp_path_factory.mktemp("joint")
    (d / "joint_model_mod.py").write_text(MODEL_MODULE)
    spec = f"{d / 'joint_model_mod.py'}:make"
    model = load_model(spec)
    rng = np.random.default_rng(11)
    truth = {
        "d": rng.uniform(0.2, 0.6, J),
        "k": rng.uniform(1.0, 3.0, J),
        "k3": np.full(J, K3),
        "g": rng.uniform(1.0, 2.0, J),
    }
    x0 = np.stack([rng.uniform(-0.5, 0.5, J), rng.uniform(-0.3, 0.3, J)], axis=1)
    u = rng.normal(size=(J, T, 1))
    sim = jax.vmap(lambda th, uu, x: S.simulate_outputs(model, th, x[None], uu[None], dt=DT)[0][0])
    y = np.asarray(sim({k: jnp.asarray(v) for k, v in truth.items()}, jnp.asarray(u), jnp.asarray(x0)))
    y_noisy = y + 0.03 * rng.normal(size=y.shape)
    return {
        "dir": d,
        "spec": spec,
        "model": model,
        "truth": truth,
        "x0": x0,
        "clean": make_dataset(y, input=u, output=y, dt=DT),
        "noisy": make_dataset(y_noisy, input=u, output=y_noisy, dt=DT),
    }


def test_noise_free_joint_fit_recovers_shared_and_local_parameters(setup):
    model, truth, ds = setup["model"], setup["truth"], setup["clean"]
    # one dataset per experiment (a list), as fit_many passes them
    res = fit_joint(model, [ds.isel(episode=[i]) for i in range(J)], shared=("k3",))
    assert isinstance(res, JointSysIdResult) and res.converged
    assert res.shared_names == ["k3"] and sorted(res.local_names) == ["d", "g", "k"]
    assert len(res.names) == 1 + 3 * J and res.cov.shape == (1 + 3 * J,) * 2
    assert res.shared_estimates()["k3"] == pytest.approx(K3, rel=1e-6)
    for name, v in res.local_estimates().items():
        np.testing.assert_allclose(v, truth[name], rtol=1e-6, err_msg=name)
    for i in range(J):
        ex = res.experiment(i)
        np.testing.assert_allclose(ex.x0, setup["x0"][i : i + 1], atol=1e-7)
        for name in ("d", "k", "k3", "g"):
            assert ex.as_dict()[name] == pytest.approx(truth[name][i], rel=1e-6)
        assert ex.fit_percent[0] > 99.999
    out = res.to_dataset()
    assert list(out["shared"].values) == [n == "k3" for n in out["parameter"].values]
    k3 = out["estimate"].sel(parameter="k3").values
    assert np.all(k3 == k3[0]) and (out["status"].values == "ok").all()
    assert out.attrs["joint"] and out.attrs["shared"] == ["k3"]


def test_noisy_joint_fit_pools_information_for_the_shared_parameter(setup):
    model, truth, ds = setup["model"], setup["truth"], setup["noisy"]
    res = fit_joint(model, ds, shared="k3")  # one dataset: each episode is one experiment
    assert res.converged and res.experiments == [f"episode{i}" for i in range(J)]
    lo, hi = res.ci_low[0], res.ci_high[0]
    assert lo <= K3 <= hi, (lo, hi)
    assert res.noise_std[0] == pytest.approx(0.03, rel=0.15)
    width = hi - lo
    singles = [S.fit(model, ds.isel(episode=[i])) for i in range(J)]
    single_widths = [r.ci_high[r.names.index("k3")] - r.ci_low[r.names.index("k3")] for r in singles]
    assert width < min(single_widths), (width, single_widths)
    # the per-experiment parameters are still estimated well and their intervals mostly cover the truth
    loc = res.local_estimates()
    for name in ("d", "k", "g"):
        np.testing.assert_allclose(loc[name], truth[name], rtol=0.15)
    inside = [
        ex.ci_low[j] <= truth[n][i] <= ex.ci_high[j]
        for i, ex in enumerate(res.per_experiment)
        for j, n in enumerate(ex.names)
        if n != "k3"
    ]
    assert np.mean(inside) >= 0.75
    # nothing shared: the problem decouples and the joint fit reproduces the separate fits' estimates
    none = fit_joint(model, ds, shared=())
    for i, r in enumerate(singles):
        np.testing.assert_allclose(none.experiment(i).estimate, r.estimate, rtol=1e-6)


def test_joint_fit_errors(setup):
    model, ds = setup["model"], setup["clean"]
    with pytest.raises(S.SysIdError, match=r"unknown shared parameter 'k9'.*\['d', 'g', 'k', 'k3'\]"):
        fit_joint(model, ds, shared=["k3", "k9"])
    short = ds.isel(episode=[1], time=slice(0, 80))
    with pytest.raises(S.SysIdError, match=r"equal shape.*'experiment1' has 1 episode\(s\) x 80 samples"):
        fit_joint(model, [ds.isel(episode=[0]), short], shared=["k3"])
    with pytest.raises(S.SysIdError, match="experiment_ids must be 2 unique ids"):
        fit_joint(model, [ds.isel(episode=[0]), ds.isel(episode=[1])], experiment_ids=["a", "a"])
    with pytest.raises(ValueError, match="needs joint=True"):
        fit_many(model, ds, shared=["k3"])
    # a failing joint fit in fit_many is recorded for every experiment
    res = fit_many(model, ds, joint=True, shared=["nope"], progress=False)
    assert (res["status"].values == "failed").all() and "unknown shared parameter 'nope'" in str(res["error"].values[0])


def test_cli_joint_matches_python_api(setup, capsys):
    from pydso.cli import main

    ds, path, out = setup["noisy"], setup["dir"] / "noisy.zarr", setup["dir"] / "joint_results.zarr"
    save(ds, path)
    argv = ["sysid", "--model", setup["spec"], "--data", str(path), "--out", str(out), "--progress", "off"]
    assert main([*argv, "--joint", "--shared", "k3"]) == 0
    text = capsys.readouterr().out
    assert "experiments: ok=6" in text and "shared parameters (joint fit" in text
    stored = xr.open_zarr(out).load()
    api = fit_joint(setup["model"], ds, shared=["k3"])
    assert stored.attrs["joint"] and list(stored["shared"].values) == [n == "k3" for n in stored["parameter"].values]
    for i in range(J):
        np.testing.assert_allclose(stored["estimate"].values[i], api.experiment(i).estimate, rtol=1e-10)
        np.testing.assert_allclose(stored["stderr"].values[i], api.experiment(i).stderr, rtol=1e-8)
    np.testing.assert_allclose(stored["cov"].values, api.cov, rtol=1e-8, atol=1e-300)
    # re-running resumes from the store (no new fit); --shared without --joint is refused
    seen = []
    again = fit_many(setup["spec"], str(path), out=str(out), joint=True, shared=["k3"], on_result=seen.append)
    assert seen == [] and np.array_equal(again["estimate"].values, stored["estimate"].values)
    assert main([*argv, "--shared", "k3"]) == 2
    assert "--shared needs --joint" in capsys.readouterr().err
