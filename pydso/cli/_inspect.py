"""``pydso inspect STORE``: summarise a trajectory store (episodes, time, variables, attributes, lengths)."""

import argparse
from typing import Any

import numpy as np

from .._errors import ProblemError
from ._common import load_factory, load_theta


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``inspect`` subcommand on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "inspect",
        help="summarise a trajectory store",
        description="Print the episodes, time axis, variables, attributes and episode lengths of a store.",
    )
    parser.add_argument("store", metavar="STORE", help="path of a pydso trajectory store (zarr)")
    parser.add_argument(
        "--problem",
        metavar="MODULE:FACTORY",
        help="factory returning (problem, theta_template), as for `pydso improve`: with --theta, prints the "
        "effective sample size of the stored transitions reweighted to theta (needs behavior_logp)",
    )
    parser.add_argument("--theta", metavar="FILE", help="target parameters: .npz of the template's leaves")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check every stored file against the checksum in the manifest (reads the whole store once); without "
        "it only the presence and size of every file are checked",
    )
    parser.set_defaults(func=run)
    return parser


def _short(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def run(args: argparse.Namespace) -> int:
    from .. import data

    ds = data.open(args.store, verify=args.verify)
    n, n_time = ds.sizes["episode"], ds.sizes["time"]
    time = np.asarray(ds["time"].values)
    print(f"store: {args.store}" + ("  (every file matches its checksum)" if args.verify else ""))
    print(f"episodes: {n}")
    print(f"time: {n_time} steps, from {time[0]} to {time[-1]} ({time.dtype})")
    print("variables:")
    order = [k for k in data.VARIABLE_DIMS if k in ds.data_vars]
    order += sorted(str(k) for k in ds.data_vars if k not in data.VARIABLE_DIMS)
    order += sorted(str(k) for k in ds.coords)
    width = max(len(k) for k in order)
    for name in order:
        var = ds[name].variable
        chunks = ""
        if var.chunks is not None and "episode" in var.dims:
            chunks = f"  chunks of {var.chunksizes['episode'][0]} episodes"
        print(f"  {name!s:<{width}}  ({', '.join(map(str, var.dims))})  {var.dtype}  shape {var.shape}{chunks}")
    print("attributes:")
    for key, value in ds.attrs.items():
        print(f"  {key}: {_short(value)}")
    lengths = data.episode_lengths(ds)
    how = "from mask" if "mask" in ds.data_vars else "no mask: all episodes complete"
    print(
        f"episode lengths ({how}): min {int(lengths.min())}, mean {float(lengths.mean()):.2f}, max {int(lengths.max())}"
    )
    if args.problem is not None or args.theta is not None:
        if args.problem is None or args.theta is None:
            raise ProblemError("--problem and --theta must be given together")
        from ..estimators import ess_report

        problem, template = load_factory(args.problem)
        report = ess_report(problem, load_theta(args.theta, template), ds, warn_below=None)
        n = report["n"]
        print(
            f"ESS under theta: {float(report['episode']):.1f} of {n} episodes (whole-trajectory weights); "
            f"smallest per-decision ESS {float(report['min_fraction']) * 100:.1f}% of {n}"
        )
    return 0
