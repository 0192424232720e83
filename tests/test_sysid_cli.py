"""``pydso sysid`` on the user's own files: CSV records read directly, starting guesses, tolerances, multi-start,
fixed parameters, a validation dataset, RMSE / fit % / intervals printed, and stale failure records that say how
to retry (issues 11 and 12)."""

import jax
import numpy as np
import pytest
import xarray as xr

import pydso  # noqa: F401  (float64)
from pydso.data import from_csv
from pydso.problems import sysid as S

MODEL = """
from pydso.problems.sysid import DiscreteModel

def f(x, u, th):
    return th["a"] * x + th["b"] * u

def make():
    return DiscreteModel(f, None, {"a": 0.5, "b": 0.5}, x0=[0.0], transforms={"a": (-1.0, 1.0)})

def broken():
    raise RuntimeError("parameter table not found")
"""


def write_csv(path, a, b, seed, T=60):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=T)
    x = np.zeros(T)
    for k in range(T - 1):
        x[k + 1] = a * x[k] + b * u[k]
    y = x + 0.01 * rng.normal(size=T)
    path.write_text("u,y,\n" + "".join(f"{ui:.17g},{yi:.17g},\n" for ui, yi in zip(u, y, strict=True)))


def test_cli_reads_csv_with_guesses_starts_fixed_parameters_and_validation(tmp_path, capsys):
    from pydso.cli import main

    (tmp_path / "cli_first_order.py").write_text(MODEL)
    spec = f"{tmp_path / 'cli_first_order.py'}"
    write_csv(tmp_path / "est.csv", 0.7, 1.3, 0)
    write_csv(tmp_path / "val.csv", 0.7, 1.3, 1)
    common = ["--data", str(tmp_path / "est.csv"), "--columns", "input=u", "output=y", "--dt", "1.0"]
    common += ["--progress", "off", "--rtol", "1e-9", "--atol", "1e-9", "--max-steps", "80", "--fix", "b=1.3"]
    common += ["--param", "a=0.2", "--starts", "3", "--seed", "1", "--validate", str(tmp_path / "val.csv")]
    # a broken model first: the experiment fails and is recorded
    rc = main(["sysid", "--model", f"{spec}:broken", *common, "--out", str(tmp_path / "r.zarr")])
    assert rc == 1
    assert "RuntimeError: parameter table not found" in capsys.readouterr().out
    # fixed model, same --out: the stale failure is shown with how to retry
    with pytest.warns(S.SysIdWarning, match="retry_failed=True"):
        rc = main(["sysid", "--model", f"{spec}:make", *common, "--out", str(tmp_path / "r.zarr")])
    text = capsys.readouterr().out
    assert "recorded in an earlier run, not re-run: use --retry-failed" in text and "--no-resume" in text
    # retry with guesses, a multi-start, a fixed parameter and a validation set
    assert main(["sysid", "--model", f"{spec}:make", *common, "--out", str(tmp_path / "r.zarr"), "--retry-failed"]) == 0
    text = capsys.readouterr().out
    for word in ("RMSE", "fit%", "val RMSE", "95% intervals", "experiments: ok=1"):
        assert word in text, word
    res = xr.open_zarr(tmp_path / "r.zarr").load()
    ds = from_csv(tmp_path / "est.csv", columns={"input": ["u"], "output": ["y"]}, dt=1.0)
    api = S.fit(
        S.load_model(f"{spec}:make"),
        ds,
        params={"a": 0.2},
        fixed={"b": 1.3},
        rtol=1e-9,
        atol=1e-9,
        n_starts=3,
        key=jax.random.PRNGKey(1),
    )
    np.testing.assert_allclose(res["estimate"].values[0], api.estimate, rtol=1e-7)
    np.testing.assert_allclose(res["ci_high"].values[0], api.ci_high, rtol=1e-6)
    assert res["estimate"].values[0][1] == 1.3 and abs(res["estimate"].values[0][0] - 0.7) < 0.01
    val = from_csv(tmp_path / "val.csv", columns={"input": ["u"], "output": ["y"]}, dt=1.0)
    np.testing.assert_allclose(res["val_rmse"].values[0], api.score(val).rmse, rtol=1e-6)
    assert float(res["val_fit_percent"].values[0, 0]) > 95.0


def test_cli_csv_without_columns_is_a_clear_error(tmp_path, capsys):
    from pydso.cli import main

    (tmp_path / "cli_first_order2.py").write_text(MODEL)
    write_csv(tmp_path / "d.csv", 0.5, 1.0, 2)
    rc = main(
        [
            "sysid",
            "--model",
            f"{tmp_path / 'cli_first_order2.py'}:make",
            "--data",
            str(tmp_path / "d.csv"),
            "--out",
            str(tmp_path / "o.zarr"),
            "--dt",
            "1.0",
        ]
    )
    assert rc == 2 and "needs both --columns" in capsys.readouterr().err
    with pytest.raises(S.SysIdError, match=r"reading it needs \['columns', 'dt'\]"):
        S.fit_many(f"{tmp_path / 'cli_first_order2.py'}:make", str(tmp_path / "d.csv"), progress=False)
