"""``pydso improve``: improve parameters from a stored trajectory dataset (off-policy), without simulation.

    pydso improve --data STORE --problem module:factory --theta FILE --method proximal|natural|api --out FILE

``factory()`` returns ``(problem, theta_template)``; ``--theta`` is an ``.npz`` of the template's leaves (named
``arr_0, arr_1, ...`` in ``jax.tree.leaves`` order, as ``numpy.savez(*leaves)`` writes them, or by their
``jax.tree_util.keystr`` paths); ``--out`` is written the same way (``arr_i``).
"""

import argparse
import os

from ._common import load_factory, load_theta, save_theta

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


def run(args) -> int:
    import jax
    import optax

    from .. import data as pdata
    from .._progress import progress_bar
    from ..estimators import as_batch, concatenate_batches, ess_report, iter_batches, offpolicy_objective

    problem, template = load_factory(args.problem)
    theta = load_theta(args.theta, template)
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"--data: no such store {args.data!r}")
    ds = pdata.open(args.data)
    if "behavior_logp" not in ds.data_vars:
        raise ValueError(
            f"--data: {args.data!r} has no 'behavior_logp' variable; off-policy improvement needs the behaviour "
            "log-density of each logged transition"
        )
    key = jax.random.key(args.seed)
    J0, se0 = offpolicy_objective(problem, theta, ds, episodes_per_chunk=args.episodes_per_chunk)
    if args.method == "proximal":
        from ..optimize import improve

        theta, _ = improve(
            problem,
            theta,
            ds,
            key=key,
            epochs=args.iterations,
            minibatch=args.minibatch,
            optimizer=optax.adam(args.learning_rate),
            episodes_per_chunk=args.episodes_per_chunk,
            progress=args.progress,
        )
    elif args.method == "natural":
        from ..estimators import NaturalGradient

        batch = concatenate_batches(list(iter_batches(ds, problem, args.episodes_per_chunk)))
        step = NaturalGradient(learning_rate=args.learning_rate)
        for _ in progress_bar(range(args.iterations), total=args.iterations, desc="natural", enable=args.progress):
            theta, _ = step(problem, theta, batch)
    else:
        import jax.numpy as jnp

        from ..optimize import policy_iteration
        from ..systems import TabularChain

        batch = as_batch(ds.compute(), problem)
        if isinstance(problem.system, TabularChain):
            n_states = problem.system.transition_fn(theta).shape[0]

            def feats(x):
                return jax.nn.one_hot(x, n_states)

        else:

            def feats(x):  # quadratic features: exact for linear-quadratic problems
                x = jnp.ravel(jnp.asarray(x, float))
                return jnp.concatenate([jnp.ones(1), x, jnp.outer(x, x).ravel()])

        theta, _ = policy_iteration(
            problem,
            theta,
            key=key,
            features=feats,
            iterations=args.iterations,
            data=batch,
            collect=0,
            improve="proximal",
            optimizer=optax.adam(args.learning_rate),
            progress=args.progress,
        )
    J1, se1 = offpolicy_objective(problem, theta, ds, episodes_per_chunk=args.episodes_per_chunk)
    ess = ess_report(problem, theta, ds, episodes_per_chunk=args.episodes_per_chunk)
    save_theta(args.out, theta)
    print(
        f"pydso improve: {args.method}: IS estimate of J {J0:.6g} +/- {se0:.2g} -> {J1:.6g} +/- {se1:.2g}; "
        f"ESS {ess['episode']:.1f} of {ess['n']} episodes; wrote {args.out}"
    )
    return 0
