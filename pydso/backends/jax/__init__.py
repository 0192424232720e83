r"""The default backend: compiled JAX (diffrax, struct-of-arrays fast path, checkpointed scans)."""

import jax

from .._base import AbstractBackend, EpisodeBatch, register_backend
from ._simulate import simulate_episode
from ._solvers import RK4 as RK4
from ._solvers import RK4ThreeEighths as RK4ThreeEighths

__all__ = ["JaxBackend", "RK4", "RK4ThreeEighths"]


class JaxBackend(AbstractBackend):
    """Compiled JAX simulation: ``jax.vmap`` of one episode over the keys (see :mod:`pydso.backends`)."""

    name = "jax"

    def simulate(self, problem, theta, keys, *, checkpoints=None):
        out = jax.vmap(lambda k: simulate_episode(problem, theta, k, checkpoints))(keys)
        states, costs, lps, alive, tc, tw = out
        return EpisodeBatch(states, costs, lps, alive, tc, tw)


register_backend("jax", JaxBackend)
