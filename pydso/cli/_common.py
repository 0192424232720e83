"""Loaders shared by the CLI subcommands: ``--problem MODULE:FACTORY`` and ``--theta FILE`` (.npz)."""

import importlib
import os
import sys


def load_factory(spec: str):
    if ":" not in spec:
        raise ValueError(f"--problem must be 'module:factory', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--problem: cannot import module {module_name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--problem: {module_name!r} has no callable {attr!r}")
    out = factory()
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"--problem: {spec}() must return (problem, theta_template), got {type(out).__name__}")
    return out


def load_theta(path: str, template):
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not os.path.exists(path):
        raise FileNotFoundError(f"--theta: no such file {path!r}")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--theta: {path!r} is not a readable .npz file: {e}") from e
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(p) for p, _ in paths]
    if all(n in arrays for n in names):
        leaves = [arrays[n] for n in names]
    elif all(f"arr_{i}" in arrays for i in range(len(paths))):
        leaves = [arrays[f"arr_{i}"] for i in range(len(paths))]
    else:
        raise ValueError(
            f"--theta: {path!r} has arrays {sorted(arrays)}; expected {len(paths)} leaves named "
            f"arr_0..arr_{len(paths) - 1} or {names}"
        )
    for (p, ref), leaf in zip(paths, leaves, strict=True):
        if np.shape(ref) != leaf.shape:
            raise ValueError(
                f"--theta: leaf {jax.tree_util.keystr(p) or '<root>'} has shape {leaf.shape}, the template expects "
                f"{np.shape(ref)}"
            )
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])


def save_theta(path: str, theta) -> None:
    import jax
    import numpy as np

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    np.savez(path, *[np.asarray(x) for x in jax.tree.leaves(theta)])
