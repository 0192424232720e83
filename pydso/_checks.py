"""Argument checks shared by the whole package, each raising :class:`~pydso.ProblemError` (or the subclass the
caller passes) with a message that names the argument and says what was expected."""

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import ProblemError
from ._typing import PyTree

__all__ = [
    "check_key",
    "check_positive_int",
    "check_positive_number",
    "check_nonnegative_number",
    "check_finite_tree",
]


def check_positive_int(value, name: str, *, error: type[Exception] = ProblemError) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer (not a bool), else raise ``error`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _is_real_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def check_positive_number(value, name: str, *, error: type[Exception] = ProblemError) -> float:
    """Return ``value`` as a ``float`` if it is a finite number ``> 0`` (not a bool), else raise ``error`` naming
    it. A 0-d array is accepted."""
    if isinstance(value, np.ndarray | jax.Array) and np.ndim(value) == 0 and not isinstance(value, jax.core.Tracer):
        value = np.asarray(value).item()
    if not (_is_real_number(value) and np.isfinite(value) and value > 0):
        raise error(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_nonnegative_number(value, name: str, *, error: type[Exception] = ProblemError) -> float:
    """Return ``value`` as a ``float`` if it is a finite number ``>= 0`` (not a bool), else raise ``error``."""
    if isinstance(value, np.ndarray | jax.Array) and np.ndim(value) == 0 and not isinstance(value, jax.core.Tracer):
        value = np.asarray(value).item()
    if not (_is_real_number(value) and np.isfinite(value) and value >= 0):
        raise error(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def check_key(key, name: str = "key") -> jax.Array:
    """Return ``key`` as a typed PRNG key (raw ``uint32[2]`` key data is wrapped), or raise a clear error."""
    if key is None:
        raise ProblemError(f"a PRNG key is required: pass {name}=jax.random.key(seed)")
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ProblemError(f"{name} must be a single PRNG key, got a batch of shape {key.shape}")
        return key
    if isinstance(key, jax.Array | np.ndarray) and key.shape == (2,) and key.dtype == np.uint32:
        return jax.random.wrap_key_data(jnp.asarray(key))
    raise ProblemError(f"{name} must be a JAX PRNG key (jax.random.key(seed)), got {type(key).__name__} {key!r}")


def check_finite_tree(tree: PyTree, name: str) -> None:
    """Raise :class:`ProblemError` if a concrete pytree has a non-finite or non-numeric leaf (naming its path)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.core.Tracer):
            continue
        try:
            arr = np.asarray(leaf)
        except Exception as e:  # noqa: BLE001
            raise ProblemError(f"{name}{jax.tree_util.keystr(path)} is not an array: {type(leaf)}") from e
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise ProblemError(f"{name}{jax.tree_util.keystr(path)} is not numeric (dtype {arr.dtype})")
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            raise ProblemError(f"{name}{jax.tree_util.keystr(path)} contains non-finite values (NaN or inf)")
