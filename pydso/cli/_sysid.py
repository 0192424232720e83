"""``pydso sysid``: identify a model on many stored datasets (one fit per experiment on Dask, or one joint fit
with parameters shared across experiments: ``--joint --shared k1,k3``)."""

import argparse
import sys

import numpy as np

_LOSS_HELP = (
    "simulation: free-run output error (default); multiple-shooting: segments of --segment-length samples "
    "with their own initial states and continuity residuals (more robust from poor initial guesses); "
    "prediction: --k-step-ahead prediction error from states given by the data (a 'state' variable of the "
    "model's size, or the model's state_from_output); nll: Gaussian negative log-likelihood with estimated "
    "noise level"
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sysid",
        help="system identification: fit a model to many stored datasets",
        description=(
            "Fit a system-identification model to every experiment of the given datasets (pydso zarr stores, or "
            "CSV/NPZ/MAT records with --columns and --dt), "
            "one Levenberg-Marquardt fit per experiment on Dask (or, with --joint, one fit of all experiments with "
            "--shared parameters common to them), and write estimates, standard errors, 95% "
            "confidence intervals and fit metrics to a zarr store. Failing experiments are recorded with their "
            "error; re-running with the same --out skips experiments already done."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="the model: 'package.module:factory' or 'path/to/file.py:factory'; the factory is called with no "
        "arguments and returns a pydso.problems.sysid ContinuousModel or DiscreteModel (with its initial "
        "parameter guesses and transforms)",
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATHS_OR_GLOB",
        help="dataset store paths, glob patterns (quote them) or comma-separated lists. One path: each "
        "episode is an experiment; several: each dataset is an experiment (see --by)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="RESULTS.zarr",
        help="zarr store for the results table (created, or a previous pydso results store updated; any other "
        "existing file or directory there is refused, never overwritten)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="address of a running Dask scheduler (e.g. tcp://host:8786); default: a local cluster",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="local cluster size: N threads in-process (default 1), or N worker processes with --processes",
    )
    p.add_argument("--processes", action="store_true", help="local cluster of worker processes instead of threads")
    p.add_argument(
        "--loss",
        choices=["simulation", "multiple-shooting", "prediction", "nll"],
        default="simulation",
        help=_LOSS_HELP,
    )
    p.add_argument("--segment-length", type=int, default=50, help="samples per segment for multiple shooting")
    p.add_argument("--k", type=int, default=1, help="prediction horizon (steps) for --loss prediction")
    p.add_argument(
        "--by",
        choices=["auto", "episode", "dataset"],
        default="auto",
        help="what one experiment is: each episode, or each dataset (auto: episode for one path, else dataset)",
    )
    p.add_argument(
        "--joint",
        action="store_true",
        help="one joint fit of all experiments instead of one fit each: the --shared parameters are common to "
        "all experiments, the others (and the initial states) per experiment; experiments must have equal "
        "lengths. A joint fit is one optimisation and runs as a single Dask task",
    )
    p.add_argument(
        "--shared",
        default="",
        metavar="NAMES",
        help="comma-separated parameter names shared by all experiments in a --joint fit (e.g. k1,k3)",
    )
    p.add_argument("--max-steps", type=int, default=500, help="maximum Levenberg-Marquardt iterations per fit")
    p.add_argument("--rtol", type=float, default=1e-10, help="relative tolerance of the solver's termination test")
    p.add_argument("--atol", type=float, default=1e-10, help="absolute tolerance of the solver's termination test")
    p.add_argument(
        "--columns",
        nargs="+",
        default=None,
        metavar="ROLE=NAMES",
        help="for CSV/NPZ/MAT data: which columns (CSV) or variables (NPZ/MAT) hold the input and output, e.g. "
        "--columns input=V1 output=V2 (several names comma-separated)",
    )
    p.add_argument("--dt", type=float, default=None, help="for CSV/NPZ/MAT data: the sampling interval in seconds")
    p.add_argument("--skip-rows", type=int, default=0, help="for CSV data: lines to skip before the header")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="starting guess of a parameter (repeatable; overrides the model's guess)",
    )
    p.add_argument("--x0", default=None, metavar="V1,V2,...", help="starting guess of the initial state")
    p.add_argument(
        "--fix",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="hold a parameter (or x0, x0[i]) fixed, at VALUE or at its guess (repeatable)",
    )
    p.add_argument("--starts", type=int, default=1, help="multi-start: number of starting points (one vmapped solve)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the multi-start starting points")
    p.add_argument("--spread", type=float, default=0.5, help="multi-start: spread of the random starting points")
    p.add_argument(
        "--covariance",
        choices=["auto", "white", "ar"],
        default="auto",
        help="interval covariance: white residuals, AR residuals (sandwich), or auto (AR when the whiteness test "
        "fails)",
    )
    p.add_argument(
        "--validate",
        default=None,
        metavar="PATH",
        help="validation dataset (store or CSV/NPZ/MAT read like --data): each fit is scored on it with its "
        "initial state estimated from the first --n-init samples; prints RMSE and fit %%",
    )
    p.add_argument("--n-init", type=int, default=None, help="samples used to estimate the validation initial state")
    p.add_argument("--no-resume", action="store_true", help="re-run all experiments even if --out has them")
    p.add_argument("--retry-failed", action="store_true", help="when resuming, re-run experiments that failed")
    p.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="progress bar (auto: only on a terminal)",
    )
    p.set_defaults(func=run)
    return p


def _loss(args):
    from pydso.problems.sysid import MultipleShooting, Prediction

    if args.loss == "multiple-shooting":
        return MultipleShooting(segment_length=args.segment_length)
    if args.loss == "prediction":
        return Prediction(k=args.k)
    return args.loss


def _kv(items, what, parse=float):
    from pydso.problems.sysid import SysIdError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not name.strip() or (parse is float and not sep):
            raise SysIdError(f"{what} {item!r}: expected NAME=VALUE")
        try:
            out[name.strip()] = parse(value) if sep else None
        except ValueError:
            raise SysIdError(f"{what} {item!r}: {value!r} is not a number") from None
    return out


def _read_options(args):
    from pydso.problems.sysid import SysIdError

    if args.columns is None and args.dt is None:
        return None
    if args.columns is None or args.dt is None:
        raise SysIdError("reading CSV/NPZ/MAT data needs both --columns (e.g. input=V1 output=V2) and --dt")
    cols = {}
    for item in args.columns:
        role, sep, names = item.partition("=")
        if not sep or not names:
            raise SysIdError(f"--columns {item!r}: expected ROLE=NAME[,NAME...] with ROLE input, output or state")
        cols[role.strip()] = [n.strip() for n in names.split(",") if n.strip()]
    opts = {"columns": cols, "dt": args.dt}
    if args.skip_rows:
        opts["skip_rows"] = args.skip_rows
    return opts


def _fit_options(args) -> dict:
    opts = {"max_steps": args.max_steps, "rtol": args.rtol, "atol": args.atol, "covariance": args.covariance}
    params = _kv(args.param, "--param")
    if params:
        opts["params"] = params
    if args.x0 is not None:
        opts["x0"] = [float(v) for v in args.x0.split(",")]
    fixed = _kv(args.fix, "--fix", parse=lambda v: float(v))
    if fixed:
        opts["fixed"] = fixed  # None: held at its (possibly --param) guess
    if args.starts > 1:
        opts.update(n_starts=args.starts, seed=args.seed, spread=args.spread)
    if args.validate is not None:
        opts["validation"] = args.validate
        if args.n_init is not None:
            opts["validation_n_init"] = args.n_init
    return opts


def summary_table(res, max_rows: int = 20) -> str:
    """A plain-text summary of a results dataset from :func:`pydso.problems.sysid.fit_many`."""
    names = [str(n) for n in res["parameter"].values]
    status = [str(s) for s in res["status"].values]
    lines = []
    w = max([10] + [len(str(e)) for e in res["experiment"].values[:max_rows]])
    w = min(w, 48)
    has_val = "val_rmse" in res
    head = (
        f"{'experiment':<{w}} {'status':<13}"
        + "".join(f" {n:>12}" for n in names)
        + f" {'RMSE':>10} {'NRMSE':>9} {'fit%':>7}"
        + (f" {'val RMSE':>10} {'val fit%':>8}" if has_val else "")
    )
    lines.append(head)
    lines.append("-" * len(head))

    def cell(var, i, width, fmt):
        v = res[var].values[i] if var in res else np.array([])
        return f" {np.nanmean(v):{width}{fmt}}" if v.size and np.isfinite(v).any() else f" {'-':>{width}}"

    for i, eid in enumerate(res["experiment"].values[:max_rows]):
        est = res["estimate"].values[i]
        cells = cell("rmse", i, 10, ".4g") + cell("nrmse", i, 9, ".4f") + cell("fit_percent", i, 7, ".2f")
        if has_val:
            cells += cell("val_rmse", i, 10, ".4g") + cell("val_fit_percent", i, 8, ".2f")
        lines.append(f"{str(eid)[-w:]:<{w}} {status[i]:<13}" + "".join(f" {v:12.6g}" for v in est) + cells)
    if len(status) > max_rows:
        lines.append(f"... {len(status) - max_rows} more experiment(s)")
    ok = np.array([s == "ok" for s in status])
    if names and len(status) <= 5 and not res.attrs.get("joint"):
        for i, eid in enumerate(res["experiment"].values):
            if np.isnan(res["estimate"].values[i]).all():
                continue
            lines.append("")
            lines.append(f"{str(eid)}: 95% intervals")
            lines.append(f"  {'parameter':<14} {'estimate':>12} {'stderr':>11} {'95% CI':>27}")
            for j, n in enumerate(names):
                e, se = res["estimate"].values[i, j], res["stderr"].values[i, j]
                lo, hi = res["ci_low"].values[i, j], res["ci_high"].values[i, j]
                lines.append(f"  {n:<14} {e:12.6g} {se:11.3g}   [{lo:11.5g}, {hi:11.5g}]")
    if ok.any() and names:
        est = res["estimate"].values[ok]
        se = res["stderr"].values[ok]
        lines.append("")
        lines.append(f"{'parameter':<14} {'mean':>12} {'std':>12} {'median stderr':>14}")
        for j, n in enumerate(names):
            lines.append(
                f"{n:<14} {np.nanmean(est[:, j]):12.6g} {np.nanstd(est[:, j]):12.4g} {np.nanmedian(se[:, j]):14.4g}"
            )
    if res.attrs.get("joint") and "shared" in res.coords and ok.any():
        flags = np.asarray(res["shared"].values, bool)
        first = int(np.argmax(ok))
        lines.append("")
        lines.append(f"shared parameters (joint fit, sigma2={float(res.attrs.get('sigma2', np.nan)):.4g}):")
        lines.append(f"{'parameter':<14} {'estimate':>12} {'stderr':>12} {'95% CI':>27}")
        for j in np.flatnonzero(flags):
            lo, hi = res["ci_low"].values[first, j], res["ci_high"].values[first, j]
            lines.append(
                f"{names[j]:<14} {res['estimate'].values[first, j]:12.6g} {res['stderr'].values[first, j]:12.4g}"
                f"   [{lo:11.5g}, {hi:11.5g}]"
            )
    counts = {s: status.count(s) for s in sorted(set(status))}
    lines.append("")
    lines.append("experiments: " + ", ".join(f"{k}={v}" for k, v in counts.items()) + f" (total {len(status)})")
    stale = set(res.attrs.get("stale_failed", []) or [])
    for i, s in enumerate(status):
        if s == "failed":
            eid = str(res["experiment"].values[i])
            note = " [recorded in an earlier run, not re-run: use --retry-failed]" if eid in stale else ""
            lines.append(f"  failed {eid}{note}: {str(res['error'].values[i])[:200]}")
    if stale:
        lines.append(
            f"{len(stale)} failure(s) above are stale records from an earlier run on this --out; re-run them with "
            "--retry-failed (e.g. after fixing --model), or everything with --no-resume"
        )
    return "\n".join(lines)


def run(args) -> int:
    from pydso.problems.sysid import SysIdError, expand_paths, fit_many

    shared = [n.strip() for n in args.shared.split(",") if n.strip()]
    if shared and not args.joint:
        raise SysIdError("--shared needs --joint (shared parameters only exist in a joint fit)")
    paths = expand_paths(args.data)
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    res = fit_many(
        args.model,
        paths[0] if len(paths) == 1 else paths,
        loss=_loss(args),
        scheduler=args.scheduler,
        n_workers=args.workers,
        processes=args.processes,
        out=args.out,
        resume=not args.no_resume,
        retry_failed=args.retry_failed,
        by=None if args.by == "auto" else args.by,
        fit_options=_fit_options(args),
        progress=progress,
        joint=args.joint,
        shared=shared,
        read_options=_read_options(args),
    )
    print(summary_table(res))
    print(f"results written to {args.out}")
    failed = int(np.sum(res["status"].values == "failed"))
    return 1 if failed == res.sizes["experiment"] and failed > 0 else 0


if __name__ == "__main__":  # pragma: no cover
    from pydso.cli import main

    sys.exit(main(["sysid", *sys.argv[1:]]))
