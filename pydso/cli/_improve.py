"""``pydso improve``: improve parameters from a stored trajectory dataset (off-policy), without simulation.

    pydso improve --data STORE --problem module:factory --theta FILE --method proximal|natural|api --out FILE

``factory()`` returns ``(problem, theta_template)``; ``--theta`` is an ``.npz`` of the template's leaves (named
``arr_0, arr_1, ...`` in ``jax.tree.leaves`` order, as ``numpy.savez(*leaves)`` writes them, or by their
``jax.tree_util.keystr`` paths); ``--out`` is written the same way (``arr_i``).

The command builds the method object of the library — :class:`pydso.Proximal`, :class:`pydso.NaturalGradient` or
:class:`pydso.PolicyIteration` with ``n=0`` (no simulation) and ``data=`` the store — and runs it with
:func:`pydso.minimize`: ``proximal`` is one improvement of ``--iterations`` epochs (the store is streamed chunk by
chunk), ``natural`` takes ``--iterations`` steps and ``api`` ``--iterations`` evaluate/improve rounds (both read the
store into memory).
"""

import argparse
import os

from .._checks import check_positive_number
from ._common import (
    check_count,
    check_output_file,
    load_factory,
    load_theta,
    save_theta,
)

METHODS = ("proximal", "natural", "api")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "improve",
        help="improve parameters from a stored dataset (off-policy)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="zarr store of logged trajectories (needs behavior_logp)")
    p.add_argument("--problem", required=True, help="module:factory returning (problem, theta_template)")
    p.add_argument("--theta", required=True, help=".npz of the current parameters (leaves of the template)")
    p.add_argument("--method", choices=METHODS, default="proximal")
    p.add_argument("--out", required=True, help="output .npz of the improved parameters")
    p.add_argument("--iterations", type=int, default=10, help="epochs (proximal) / steps (natural) / rounds (api)")
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--minibatch", type=int, default=None, help="episodes per proximal update")
    p.add_argument("--episodes-per-chunk", type=int, default=None, help="streaming chunk size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=run)
    return p


def value_features(problem, theta):
    """Features of the value fit of ``--method api``: one-hot states for a tabular chain, else
    :math:`[1, x, x x^\\top]` (exact for linear-quadratic problems)."""
    import jax
    import jax.numpy as jnp

    from ..systems import TabularChain

    if isinstance(problem.system, TabularChain):
        n_states = problem.system.matrix(jnp.zeros(()), theta).shape[0]
        return lambda x: jax.nn.one_hot(x, n_states)

    def quadratic(x):
        x = jnp.ravel(jnp.asarray(x, float))
        return jnp.concatenate([jnp.ones(1), x, jnp.outer(x, x).ravel()])

    return quadratic


def build_method(args, problem, theta, data):
    """The library's method object for ``args.method`` (with ``n=0``: learn from ``data`` alone) and the number of
    :func:`pydso.minimize` steps to run."""
    import optax

    from .. import optimize
    from ..estimators import as_batch

    if args.method == "proximal":
        method = optimize.Proximal(
            n=0,
            data=data,
            epochs=args.iterations,
            minibatch=args.minibatch,
            learning_rate=args.learning_rate,
            episodes_per_chunk=args.episodes_per_chunk,
        )
        return method, 1
    batch = as_batch(data, problem)  # the natural gradient and the value fit need the log in memory
    if args.method == "natural":
        return optimize.NaturalGradient(n=0, data=batch, learning_rate=args.learning_rate), args.iterations
    method = optimize.PolicyIteration(
        features=value_features(problem, theta),
        n=0,
        data=batch,
        improve="proximal",
        optimizer=optax.adam(args.learning_rate),
    )
    return method, args.iterations


def run(args) -> int:
    import jax

    from .. import data as pdata
    from ..estimators import ess_report, offpolicy_objective
    from ..optimize import minimize

    check_count(args.iterations, "--iterations")
    check_count(args.minibatch, "--minibatch", allow_none=True)
    check_count(args.episodes_per_chunk, "--episodes-per-chunk", allow_none=True)
    check_positive_number(args.learning_rate, "--learning-rate")
    check_output_file(args.out, "--out")  # before the work: an unwritable --out must not waste a run
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"--data: no such store {args.data!r}")
    problem, template = load_factory(args.problem)
    theta = load_theta(args.theta, template)
    try:
        ds = pdata.open(args.data)
    except pdata.DatasetError as e:
        raise pdata.DatasetError(f"--data: {e}") from None
    if "behavior_logp" not in ds.data_vars:
        raise pdata.DatasetError(
            f"--data: {args.data!r} has no 'behavior_logp' variable; off-policy improvement needs the behaviour "
            "log-density of each logged transition"
        )
    J0, se0 = offpolicy_objective(problem, theta, ds, episodes_per_chunk=args.episodes_per_chunk)
    method, steps = build_method(args, problem, theta, ds)
    result = minimize(problem, theta, key=jax.random.key(args.seed), steps=steps, method=method, progress=args.progress)
    theta = result.theta
    J1, se1 = offpolicy_objective(problem, theta, ds, episodes_per_chunk=args.episodes_per_chunk)
    ess = ess_report(problem, theta, ds, episodes_per_chunk=args.episodes_per_chunk)
    save_theta(args.out, theta)
    print(
        f"pydso improve: {args.method}: IS estimate of J {J0:.6g} +/- {se0:.2g} -> {J1:.6g} +/- {se1:.2g}; "
        f"ESS {ess['episode']:.1f} of {ess['n']} episodes; wrote {args.out}"
    )
    return 0
