r"""The Julia backend: DifferentialEquations.jl ensembles and SciMLSensitivity adjoints through juliacall.

Nothing here imports juliacall at import time. :func:`julia_unavailable_reason` looks for the ``juliacall`` package
and a Julia executable *without importing juliacall* (which would otherwise try to download Julia through juliapkg);
:func:`julia_backend`, the factory behind ``backend="julia"``, raises one :class:`~pydso.ProblemError` that says what
to install when either is missing. Julia itself starts on the first :meth:`JuliaBackend.simulate`.
"""

import functools
import importlib.util
import os
import pathlib
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ..._errors import ProblemError
from ...systems import ODESystem, Problem, SDESystem
from .._base import AbstractBackend, EpisodeBatch
from ._translate import JuliaModel, translate_problem

__all__ = ["JuliaBackend", "julia_backend", "julia_unavailable_reason", "require_julia", "default_project"]

INSTALL_HELP = (
    "To use backend='julia': (1) install Julia >= 1.10 (https://julialang.org/downloads, e.g. with juliaup) and put "
    "`julia` on PATH, or set JULIA (or PYTHON_JULIAPKG_EXE) to the julia executable; (2) `pip install "
    '"pydso[julia]"` (juliacall); (3) expect the first run to install and precompile DifferentialEquations.jl, '
    "SciMLSensitivity.jl and DiffEqGPU.jl, which takes several minutes (10-20 on a laptop) once. pydso never "
    "downloads Julia itself; the JAX backend (the default) needs none of this."
)

_SOLVERS = ("Tsit5", "Vern7", "Vern9", "DP5", "RK4", "Rodas5P", "KenCarp4", "QNDF")
_SENSEALGS = ("InterpolatingAdjoint", "QuadratureAdjoint", "GaussAdjoint", "BacksolveAdjoint")


def _julia_executable() -> str | None:
    for var in ("JULIA", "PYTHON_JULIAPKG_EXE"):
        path = os.environ.get(var)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("julia")


def julia_unavailable_reason() -> str | None:
    """Why the Julia backend cannot run here, or None when ``juliacall`` is importable and a Julia executable is
    found (``JULIA``, ``PYTHON_JULIAPKG_EXE`` or ``julia`` on ``PATH``). Imports nothing and starts nothing."""
    if importlib.util.find_spec("juliacall") is None:
        return "the Python package juliacall is not installed"
    if _julia_executable() is None:
        return (
            "no Julia executable was found (not on PATH, JULIA and PYTHON_JULIAPKG_EXE unset); juliacall would try "
            "to download one, which pydso does not allow"
        )
    return None


def require_julia() -> None:
    """Raise :class:`~pydso.ProblemError` with installation instructions unless Julia can be used here."""
    reason = julia_unavailable_reason()
    if reason is not None:
        raise ProblemError(f"the Julia backend is not available: {reason}. {INSTALL_HELP}")


def default_project() -> pathlib.Path:
    """The Julia package PyDSO.jl: ``PYDSO_JULIA_PROJECT`` if set, else the ``julia/`` folder of a source checkout."""
    env = os.environ.get("PYDSO_JULIA_PROJECT")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[3] / "julia"


@functools.lru_cache(maxsize=1)
def _session(project: str):
    """Start Julia once per process (juliacall), activate PyDSO.jl's project and load it; returns the module."""
    require_julia()
    if not (pathlib.Path(project) / "Project.toml").is_file():
        raise ProblemError(
            f"the Julia package PyDSO.jl was not found at {project!r}; set PYDSO_JULIA_PROJECT to the julia/ folder "
            "of a pydso source checkout"
        )
    exe = _julia_executable()
    if exe is not None:
        os.environ.setdefault("PYTHON_JULIAPKG_EXE", exe)  # juliapkg uses this executable and downloads nothing
    try:
        from juliacall import Main as jl  # lazily: `import pydso` never starts Julia
    except Exception as e:  # noqa: BLE001 - juliacall failed to start Julia: say why and what to do
        raise ProblemError(f"juliacall could not start Julia: {type(e).__name__}: {e}. {INSTALL_HELP}") from e
    jl.seval("import Pkg")
    jl.Pkg.activate(str(project))
    jl.Pkg.instantiate()
    jl.seval("using PyDSO")
    return jl.PyDSO


@functools.lru_cache(maxsize=32)
def _loaded_model(project: str, model: JuliaModel):
    pydso_jl = _session(project)
    return pydso_jl.load_model(model.source, model.kind, model.vector_field, model.running_cost, model.diffusion)


def _unit_noise(keys: jax.Array, horizon: int, d: int, dtype) -> jax.Array:
    """Standard normal draws ``(n, H, d)``: step ``k`` of episode ``i`` from ``fold_in(keys[i], k)``, the draws of
    the JAX backend's Euler-Maruyama fast path (so both backends simulate the same paths)."""
    steps = jnp.arange(horizon)
    return jax.vmap(lambda k: jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(k, s), (d,), dtype))(steps))(keys)


class JuliaBackend(AbstractBackend):
    r"""Simulate ODE/SDE problems with DifferentialEquations.jl through juliacall (PyDSO.jl in ``julia/``).

    The problem's vector field (or drift and diffusion) and running cost are translated to Julia
    (:func:`~pydso.backends.julia.translate_problem`) unless ``model`` gives Julia source. Julia solves the whole
    chunk as an ensemble — ``EnsembleThreads`` on the CPU, ``EnsembleGPUKernel`` (DiffEqGPU.jl) on a CUDA GPU — with
    the running cost as an augmented state component, and returns the states at the save times
    :math:`t_k = k\,\Delta t` and the interval costs. Pathwise gradients are vector-Jacobian products from
    SciMLSensitivity.jl (``InterpolatingAdjoint`` by default; ``QuadratureAdjoint``/``GaussAdjoint`` are known to be
    inaccurate when the right-hand side uses an interpolant), wired into JAX with :func:`jax.custom_vjp`. Initial
    states, SDE Brownian increments (the JAX fast path's draws), SDE transition log-densities and terminal costs
    are computed in JAX, so randomness per key is the same as with the JAX backend.

    **Arguments:**

    - `device`: ``"cpu"`` (``EnsembleThreads``) or ``"gpu"`` (``EnsembleGPUKernel``, CUDA; ODEs only, small models:
      ``theta`` becomes a static vector; the adjoint for gradients runs on CPU threads).
    - `precision`: ``"float64"`` or ``"float32"`` (the translated code and the Julia solve).
    - `solver`: a DifferentialEquations.jl ODE solver name (``"Tsit5"``, ``"Vern7"``, ``"Rodas5P"`` for stiff
      systems, ...); SDEs always use ``EM`` with step ``dt`` on the given increments.
    - `adaptive`, `abstol`, `reltol`: adaptive stepping and its tolerances (default: fixed step ``dt``, as the
      JAX backend's default).
    - `sensealg`: the SciMLSensitivity adjoint for gradients.
    - `model`: Julia source (:class:`~pydso.backends.julia.JuliaModel`) instead of translation.
    - `project`: the folder of PyDSO.jl (default :func:`default_project`).

    Do not use it for discrete-time chains (the JAX backend's scan is the right tool), or where Julia's first-run
    precompilation (minutes) outweighs the solve. It is tested in CI only by syntax (tree-sitter) and by the
    translator's numerical check; the conformance suite runs against it only where Julia is installed.
    """

    device: str = eqx.field(static=True, default="cpu")
    precision: str = eqx.field(static=True, default="float64")
    solver: str = eqx.field(static=True, default="Tsit5")
    adaptive: bool = eqx.field(static=True, default=False)
    abstol: float = eqx.field(static=True, default=1e-8)
    reltol: float = eqx.field(static=True, default=1e-6)
    sensealg: str = eqx.field(static=True, default="InterpolatingAdjoint")
    model: JuliaModel | None = eqx.field(static=True, default=None)
    project: str | None = eqx.field(static=True, default=None)
    name = "julia"

    def __check_init__(self):
        if self.device not in ("cpu", "gpu"):
            raise ProblemError(f"JuliaBackend.device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.precision not in ("float64", "float32"):
            raise ProblemError(f"JuliaBackend.precision must be 'float64' or 'float32', got {self.precision!r}")
        if self.solver not in _SOLVERS:
            raise ProblemError(f"JuliaBackend.solver must be one of {_SOLVERS}, got {self.solver!r}")
        if self.sensealg not in _SENSEALGS:
            raise ProblemError(f"JuliaBackend.sensealg must be one of {_SENSEALGS}, got {self.sensealg!r}")
        if self.model is not None and not isinstance(self.model, JuliaModel):
            raise ProblemError(f"JuliaBackend.model must be a JuliaModel or None, got {type(self.model)}")

    @property
    def dtype(self):
        return jnp.float64 if self.precision == "float64" else jnp.float32

    def check(self, problem: Problem) -> None:
        """Raise :class:`~pydso.ProblemError` unless ``problem`` is a vector-state ODE/SDE problem Julia can run."""
        if not isinstance(problem.system, ODESystem | SDESystem):
            raise ProblemError(
                f"the Julia backend simulates ODESystem and SDESystem problems, got a {type(problem.system).__name__}"
                "; use backend='jax' for discrete-time chains"
            )
        if len(problem.state_shape) != 1:
            raise ProblemError(f"the Julia backend needs a vector state, got the state shape {problem.state_shape}")
        if self.device == "gpu" and isinstance(problem.system, SDESystem):
            raise ProblemError(
                "JuliaBackend(device='gpu') runs ODE problems only (EnsembleGPUKernel draws its own noise, so its SDE "
                "paths could not be differentiated against pydso's increments); use device='cpu' for SDEs"
            )
        if self.model is not None and self.model.kind != ("ode" if isinstance(problem.system, ODESystem) else "sde"):
            raise ProblemError(f"JuliaBackend.model is of kind {self.model.kind!r}, the problem's system is not")

    def gradient_groups(self, problem, n: int) -> int:
        """8 groups (fewer for ``n < 8``): each group is one Julia ensemble solve and one adjoint pass (run one after
        the other), enough groups for a batch-means standard error without a Julia call per episode."""
        return min(n, 8)

    def simulate(self, problem, theta, keys, *, checkpoints=None) -> EpisodeBatch:
        """See :meth:`pydso.backends.AbstractBackend.simulate` (``checkpoints`` is ignored: the adjoint decides)."""
        self.check(problem)
        project = str(self.project or default_project())
        model = self.model if self.model is not None else translate_problem(problem, theta, dtype=self.dtype)
        system = problem.system
        horizon = problem.setting.horizon
        n = keys.shape[0]
        sde = isinstance(system, SDESystem)
        dtype = self.dtype
        if sde:
            k0, k_bm = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        else:
            k0 = keys
        x0 = jax.vmap(problem.initial.sample)(k0).astype(dtype)
        d = x0.shape[1]
        noise = _unit_noise(k_bm, horizon, d, dtype) * jnp.sqrt(jnp.asarray(system.dt, dtype)) if sde else None
        flat, unravel = ravel_pytree(theta)
        flat = flat.astype(dtype)
        options = dict(
            device=self.device,
            solver=self.solver,
            adaptive=self.adaptive,
            abstol=self.abstol,
            reltol=self.reltol,
            sensealg=self.sensealg,
            dt=float(system.dt),
            horizon=horizon,
        )
        out_shapes = (
            jax.ShapeDtypeStruct((n, horizon + 1, d), dtype),
            jax.ShapeDtypeStruct((n, horizon), dtype),
        )

        def host_solve(flat, x0, noise):
            jl_model = _loaded_model(project, model)
            states, costs = _session(project).solve_ensemble(
                jl_model, np.asarray(x0), np.asarray(flat), None if noise is None else np.asarray(noise), **options
            )
            return np.asarray(states, dtype=dtype), np.asarray(costs, dtype=dtype)

        def host_vjp(flat, x0, noise, states_bar, costs_bar):
            jl_model = _loaded_model(project, model)
            g = _session(project).vjp_ensemble(
                jl_model,
                np.asarray(x0),
                np.asarray(flat),
                None if noise is None else np.asarray(noise),
                np.asarray(states_bar),
                np.asarray(costs_bar),
                **options,
            )
            return np.asarray(g, dtype=dtype)

        @jax.custom_vjp
        def solve(flat, x0, noise):
            return jax.pure_callback(host_solve, out_shapes, flat, x0, noise, vmap_method="sequential")

        def solve_fwd(flat, x0, noise):
            return solve(flat, x0, noise), (flat, x0, noise)

        def solve_bwd(res, cotangents):
            flat, x0, noise = res
            states_bar, costs_bar = cotangents
            g = jax.pure_callback(
                host_vjp,
                jax.ShapeDtypeStruct(flat.shape, dtype),
                flat,
                x0,
                noise,
                states_bar,
                costs_bar,
                vmap_method="sequential",
            )
            # initial states and Brownian increments do not depend on theta: their cotangents are not propagated
            return g, jnp.zeros_like(x0), None if noise is None else jnp.zeros_like(noise)

        solve.defvjp(solve_fwd, solve_bwd)
        states, costs = solve(flat, x0, noise)
        theta_d = unravel(flat)
        if sde:
            lps = jax.vmap(system.path_log_prob, in_axes=(0, None))(states, theta_d)
        else:
            lps = jnp.zeros((n, horizon), dtype)
        if problem.terminal_cost is None:
            tc = tw = jnp.zeros((n,), dtype)
        else:
            _, w_end = problem.setting.weights()
            t_end = jnp.asarray(horizon * system.dt, dtype)
            final = jax.vmap(problem.final_cost, in_axes=(None, 0, None))
            tc = final(t_end, states[:, -1], theta_d).astype(dtype)
            tw = jnp.full((n,), w_end, dtype)
        return EpisodeBatch(states, costs, lps.astype(dtype), jnp.ones((n, horizon + 1), bool), tc, tw, None)


def julia_backend() -> JuliaBackend:
    """The factory behind ``backend="julia"``: checks that Julia can be used (one clear
    :class:`~pydso.ProblemError` saying what to install otherwise, before anything is imported) and returns
    ``JuliaBackend()``."""
    require_julia()
    return JuliaBackend()
