"""Type aliases used across pydso (defined once here)."""

from typing import Any, TypeAlias

import jax

PyTree: TypeAlias = Any
"""Any JAX pytree: nested tuples, lists, dicts, equinox modules, with array leaves."""

Array: TypeAlias = jax.Array
"""A JAX array."""

PRNGKey: TypeAlias = jax.Array
"""A typed JAX PRNG key, ``jax.random.key(seed)``."""

__all__ = ["PyTree", "Array", "PRNGKey"]
