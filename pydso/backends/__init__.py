r"""Simulation backends: where a :class:`~pydso.Problem`'s ensemble of episodes is actually computed.

The engine (:mod:`pydso.engine`) owns keys, chunks, sharding, finiteness checks and recording; a backend owns the
numerics of one call: given a problem, parameters and one PRNG key per episode, return every episode's states,
step costs, transition log-densities, alive flags and terminal costs, differentiably in ``theta``.

* ``"jax"`` (:class:`JaxBackend`, the default): compiled JAX — diffrax for adaptive ODE/SDE solves and adjoints,
  pydso's struct-of-arrays fast path for fixed-step explicit Runge–Kutta and Euler–Maruyama, one checkpointed
  ``lax.scan`` for discrete-time chains.
* ``"julia"`` (:class:`pydso.backends.julia.JuliaBackend`, optional): DifferentialEquations.jl ensembles and
  SciMLSensitivity adjoints through juliacall, for ODE/SDE problems; registered lazily (``import pydso`` never
  imports juliacall) and raising one clear error that says what to install when Julia is missing.

Backends are registered by name (:func:`register_backend`) and selected per call (``backend="jax"``) or given as
an instance. A backend that is not importable here (e.g. one that needs Julia) is registered lazily and raises a
clear error only when selected.
"""

from ._base import AbstractBackend as AbstractBackend
from ._base import EpisodeBatch as EpisodeBatch
from ._base import available_backends as available_backends
from ._base import get_backend as get_backend
from ._base import register_backend as register_backend
from .jax import JaxBackend as JaxBackend

register_backend("julia", "pydso.backends.julia:julia_backend")  # lazy: imported only when selected
