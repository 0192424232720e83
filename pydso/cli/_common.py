"""Loaders shared by the CLI subcommands: ``--problem MODULE:FACTORY`` and ``--theta FILE`` (.npz)."""

import os

from .._checks import check_positive_int
from .._errors import ProblemError
from .._io import atomic_write, check_writable_file, load_object


def load_factory(spec: str, what: str = "--problem"):
    """Call the factory named by ``spec`` (``package.module:factory`` or ``path/to/file.py:factory``); it must
    return ``(problem, theta_template)``."""
    factory = load_object(spec, what=what)
    if not callable(factory):
        raise ProblemError(f"{what}: {spec!r} is not callable")
    try:
        out = factory()
    except ProblemError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say which one, with its error
        raise ProblemError(f"{what}: calling {spec}() failed: {type(e).__name__}: {e}") from e
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ProblemError(f"{what}: {spec}() must return (problem, theta_template), got {type(out).__name__}")
    return out


def load_theta(path: str, template):
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not os.path.exists(path):
        raise FileNotFoundError(f"--theta: no such file {path!r}")
    if os.path.isdir(path):
        raise ProblemError(f"--theta: {path!r} is a directory; give the .npz file of the parameters")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001
        raise ProblemError(f"--theta: {path!r} is not a readable .npz file: {e}") from e
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(p) for p, _ in paths]
    if all(n in arrays for n in names):
        leaves = [arrays[n] for n in names]
    elif all(f"arr_{i}" in arrays for i in range(len(paths))):
        leaves = [arrays[f"arr_{i}"] for i in range(len(paths))]
    else:
        raise ProblemError(
            f"--theta: {path!r} has arrays {sorted(arrays)}; expected {len(paths)} leaves named "
            f"arr_0..arr_{len(paths) - 1} or {names}"
        )
    for (p, ref), leaf in zip(paths, leaves, strict=True):
        if np.shape(ref) != leaf.shape:
            raise ProblemError(
                f"--theta: leaf {jax.tree_util.keystr(p) or '<root>'} has shape {leaf.shape}, the template expects "
                f"{np.shape(ref)}"
            )
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])


def check_count(value, name: str, *, allow_none: bool = False) -> None:
    """Raise :class:`~pydso.ProblemError` naming the option ``name`` unless ``value`` is a positive integer (or
    ``None`` where allowed)."""
    if value is None and allow_none:
        return
    check_positive_int(value, name)


def check_output_file(path: str, name: str = "--out") -> str:
    """Check that the output file ``path`` can be written (before any work is done); see
    :func:`pydso._io.check_writable_file`."""
    return check_writable_file(path, name)


def save_theta(path: str, theta) -> None:
    import jax
    import numpy as np

    with atomic_write(path, suffix=".tmp.npz") as f:
        np.savez(f, *[np.asarray(x) for x in jax.tree.leaves(theta)])
