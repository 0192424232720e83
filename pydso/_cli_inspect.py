"""``pydso inspect STORE``: summarise a trajectory store (episodes, time, variables, attributes, lengths)."""

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np


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
        help="a callable returning the target pydso.Problem (for the effective sample size of off-chain data)",
    )
    parser.add_argument("--theta", metavar="FILE", help="target parameters (JSON, or .npz of arrays)")
    parser.set_defaults(func=run)
    return parser


def _short(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _load_factory(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--problem must be MODULE:FACTORY, got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--problem {spec!r}: cannot load {attr!r} from module {module_name!r} ({e})") from None
    return obj() if callable(obj) else obj


def _load_theta(path: str) -> Any:
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as f:
            return {k: f[k] for k in f.files}

    def arrays(x):
        if isinstance(x, dict):
            return {k: arrays(v) for k, v in x.items()}
        if isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
            return [arrays(v) for v in x]
        return np.asarray(x) if isinstance(x, list | int | float) else x

    return arrays(json.loads(p.read_text()))


def run(args: argparse.Namespace) -> int:
    from . import data

    ds = data.open(args.store)
    n, n_time = ds.sizes["episode"], ds.sizes["time"]
    time = np.asarray(ds["time"].values)
    print(f"store: {args.store}")
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
            raise ValueError("--problem and --theta must be given together")
        try:
            estimators = importlib.import_module("pydso.estimators")
        except ModuleNotFoundError:
            estimators = None
        ess = getattr(estimators, "effective_sample_size", None)
        if ess is None:
            print("ESS: requires pydso.estimators.effective_sample_size")
        else:
            value = ess(_load_factory(args.problem), _load_theta(args.theta), ds)
            print(f"ESS: {_short(value)}")
    return 0
