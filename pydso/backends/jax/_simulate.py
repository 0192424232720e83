r"""The JAX backend's simulation of a chunk of episodes: the integrator choice and the three paths.

* **fast path** — fixed-step explicit Runge–Kutta ODEs and Euler–Maruyama SDEs with vector states run the *whole
  chunk* as one struct-of-arrays kernel (:mod:`._fastpath`): initial states ``(n, d)``, one ``lax.scan`` over time
  whose state is ``(d, n)``, running costs and SDE transition log-densities computed inside the kernel, the
  outputs written once, episode-major, in cache-sized blocks (:func:`~._scan.episode_major_scan`), and the
  terminal cost evaluated on the final ``(d, n)`` state;
* **diffrax** — the reference path: ``jax.vmap`` over episodes of :func:`diffrax.diffeqsolve` with the system's
  solver, step-size controller and adjoint (adaptive, implicit, continuous adjoints, non-vector states);
* **chains** — discrete-time chains: ``jax.vmap`` over episodes of one :func:`checkpointed_scan` over time.

Randomness is per episode: episode ``i`` uses only ``keys[i]`` (its initial state from the first half of
``split(keys[i])``, its Brownian increments from the second), so results do not depend on how many other episodes
share the chunk.
"""

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np
import optimistix as optx

from ..._errors import ProblemError
from ..._typing import PyTree
from ...systems import ODESystem, Problem, SDESystem
from .._base import EpisodeBatch
from ._fastpath import euler_maruyama_scan, fixed_step_scan
from ._scan import checkpointed_scan
from ._solvers import fixed_step_applies
from ._unroll import unroll_small_contractions

__all__ = ["INTEGRATORS", "choose_integrator", "simulate_batch"]

INTEGRATORS = ("auto", "fastpath", "diffrax")

_DTO_ADJOINTS = diffrax.RecursiveCheckpointAdjoint | diffrax.DirectAdjoint


def _fastpath_obstacle(problem: Problem) -> str | None:
    """Why the fast path cannot simulate ``problem`` (None when it can)."""
    system = problem.system
    if isinstance(system, ODESystem):
        if not fixed_step_applies(system.solver, system.stepsize_controller, system.adjoint):
            return (
                "the fixed-step fast path needs diffrax.ConstantStepSize, an explicit Runge-Kutta solver and "
                "RecursiveCheckpointAdjoint/DirectAdjoint"
            )
    elif isinstance(system, SDESystem):
        if type(system.solver) is not diffrax.Euler or not isinstance(system.adjoint, _DTO_ADJOINTS):
            return (
                "the Euler-Maruyama fast path needs solver=diffrax.Euler() and RecursiveCheckpointAdjoint/DirectAdjoint"
            )
    else:
        return "the fast path integrates ODESystem and SDESystem only (chains always run as a scan)"
    if problem.setting.terminal_set() is not None:
        return "a terminal set needs event detection (diffrax.Event), which the fixed-step fast path does not do"
    x = jax.eval_shape(problem.initial.sample, jax.random.key(0))
    if x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        return f"the fast path needs a floating-point vector state, got shape {x.shape} and dtype {x.dtype}"
    return None


def choose_integrator(problem: Problem, integrator: str) -> str:
    """The path that simulates ``problem``: ``"fastpath"``, ``"diffrax"`` or ``"chain"``.

    ``integrator="auto"`` takes the fast path wherever it computes the same discrete solution as diffrax (constant
    step, explicit tableau or Euler–Maruyama, discretise-then-optimise adjoint, vector state) and diffrax otherwise;
    ``"fastpath"`` raises :class:`~pydso.ProblemError` where that is not the case; ``"diffrax"`` always takes the
    reference path. Discrete-time chains always run as a scan.
    """
    if integrator not in INTEGRATORS:
        raise ProblemError(f"integrator must be one of {INTEGRATORS}, got {integrator!r}")
    if not isinstance(problem.system, ODESystem | SDESystem):
        return "chain"
    if integrator == "diffrax":
        return "diffrax"
    obstacle = _fastpath_obstacle(problem)
    if obstacle is None:
        return "fastpath"
    if integrator == "fastpath":
        raise ProblemError(
            f"JaxBackend(integrator='fastpath') cannot simulate this {type(problem.system).__name__}: {obstacle}; "
            "use integrator='auto' or 'diffrax'"
        )
    return "diffrax"


# ------------------------------------------------------------------------------------------- fast path
def _terminal(problem: Problem, t_end, x_end: jax.Array, theta, n: int, dtype):
    """Terminal costs and weights of ``n`` episodes ending at ``x_end`` (struct of arrays, ``(d, n)``) at time
    ``t_end``."""
    if problem.terminal_cost is None:
        zeros = jnp.zeros((n,), dtype)
        return zeros, zeros
    _, w_end = problem.setting.weights()
    final = jax.vmap(problem.final_cost, in_axes=(None, 1, None))
    tc = unroll_small_contractions(final)(jnp.asarray(t_end, dtype), x_end, theta).astype(dtype)
    return tc, jnp.full((n,), w_end, dtype)


def _fastpath_batch(problem: Problem, theta, keys, checkpoints) -> EpisodeBatch:
    system = problem.system
    horizon = problem.setting.horizon
    n = keys.shape[0]
    common = dict(
        n_steps=horizon,
        dt=system.dt,
        cost=problem.running_cost,
        checkpoints=checkpoints,
        finite_flags=True,
        cost_time=True,
        episode_major=True,
    )
    if isinstance(system, SDESystem):
        k0, k_bm = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        x0 = jax.vmap(problem.initial.sample)(k0)
        states, (cs, lps), finite = euler_maruyama_scan(
            system.drift, system.diffusion, x0, theta, key=k_bm, log_prob=system.log_prob, **common
        )
    else:
        x0 = jax.vmap(problem.initial.sample)(keys)
        states, cs, finite = fixed_step_scan(system.vector_field, x0, theta, solver=system.solver, **common)
        lps = jnp.zeros((n, horizon), states.dtype)
    dtype = states.dtype
    tc, tw = _terminal(problem, horizon * system.dt, states[:, -1].T, theta, n, dtype)
    return EpisodeBatch(states, cs, lps.astype(dtype), jnp.ones((n, horizon + 1), bool), tc, tw, finite)


# ------------------------------------------------------------------------------------------- chains
def _chain_episode(problem: Problem, theta, key, checkpoints=None):
    system = problem.system
    horizon = problem.setting.horizon
    terminal = problem.setting.terminal_set()
    key0, key_steps = jax.random.split(key)
    x0 = problem.initial.sample(key0)

    def is_terminal(x):
        return jnp.asarray(terminal(x), bool) if terminal is not None else jnp.asarray(False)

    alive0 = ~is_terminal(x0)

    def step(carry, inputs):
        x, alive = carry
        t, k = inputs
        cost = jnp.where(alive, problem.running_cost(t, x, theta), 0.0)
        x_new = system.sample(k, t, x, theta)
        x_new = jnp.where(alive, x_new, x)
        if system.has_log_prob:
            lp = system.log_prob(t, jax.lax.stop_gradient(x), jax.lax.stop_gradient(x_new), theta)
            lp = jnp.where(alive, lp, 0.0)
        else:
            lp = jnp.zeros(())
        alive_new = alive & ~is_terminal(x_new)
        return (x_new, alive_new), (x_new, cost, lp, alive_new)

    _, (xs, costs, lps, alives) = checkpointed_scan(
        step,
        (x0, alive0),
        (jnp.arange(horizon, dtype=jnp.result_type(float)), jax.random.split(key_steps, horizon)),
        checkpoints=checkpoints,
    )
    states = jnp.concatenate([x0[None], xs], axis=0)
    alive = jnp.concatenate([alive0[None], alives], axis=0)
    return states, costs, lps, alive


# ------------------------------------------------------------------------------------------- diffrax
_SOLVE_OK = (diffrax.RESULTS.successful, diffrax.RESULTS.event_occurred)


def _exit_event(problem: Problem, dtype):
    """The ``diffrax.Event`` of the setting's terminal set (the zero-crossing of its scalar condition), or None."""
    if problem.setting.terminal_set() is None:
        return None
    tol = 1e-12 if dtype == jnp.float64 else 1e-5

    def cond(t, y, args, **kwargs):
        x = y[0] if isinstance(y, tuple) else y
        return jnp.asarray(problem.setting.exit_condition(t, x, args), dtype)

    return diffrax.Event(cond, root_finder=optx.Newton(rtol=tol, atol=tol))


def _saveat(ts, event):
    if event is None:
        return diffrax.SaveAt(ts=ts)
    return diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=ts), diffrax.SubSaveAt(t1=True)])


def _absorb(sol, ts, event, ys, end_ys):
    """After an exit event: hold the recorded values after the crossing at their crossing values (``end_ys``), and
    return them with ``alive`` and the crossing time (``ts[-1]`` when there is no event)."""
    if event is None:
        return ys, jnp.ones(ts.shape, bool), ts[-1], sol.result == diffrax.RESULTS.successful
    saved_ts = sol.ts[0]
    after = ~jnp.isfinite(saved_ts)
    t_end = sol.ts[1][0]
    hit = sol.result == diffrax.RESULTS.event_occurred
    out = jax.tree.map(lambda y, e: jnp.where(after.reshape((-1,) + (1,) * (y.ndim - 1)), e, y), ys, end_ys)
    alive = ~hit | (ts < t_end)
    ok = (sol.result == _SOLVE_OK[0]) | (sol.result == _SOLVE_OK[1])
    return out, alive, jnp.where(hit, t_end, ts[-1]), ok


def _ode_diffrax_episode(problem: Problem, theta, key):
    system = problem.system
    horizon = problem.setting.horizon
    x0 = problem.initial.sample(key)
    t1 = horizon * system.dt
    ts = jnp.linspace(0.0, t1, horizon + 1)
    event = _exit_event(problem, x0.dtype)

    # theta goes in through ``args`` (not a closure) so that every diffrax adjoint, BacksolveAdjoint's
    # custom VJP included, differentiates with respect to it.
    def field(t, y, theta):
        x, _ = y
        return system.vector_field(t, x, theta), problem.running_cost(t, x, theta)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        system.solver,
        t0=0.0,
        t1=t1,
        dt0=system.dt,
        y0=(x0, jnp.zeros((), x0.dtype)),
        args=theta,
        saveat=_saveat(ts, event),
        stepsize_controller=system.stepsize_controller,
        adjoint=system.adjoint,
        event=event,
        max_steps=system.max_steps,
        throw=False,
    )
    if event is None:
        ys, end_ys = sol.ys, None
    else:
        ys, end_ys = sol.ys[0], jax.tree.map(lambda e: e[0], sol.ys[1])
    (states, running), alive, t_end, ok = _absorb(sol, ts, event, ys, end_ys)
    costs = jnp.diff(running)
    states = jnp.where(ok, states, jnp.nan)
    return states, costs, jnp.zeros((horizon,), costs.dtype), alive, t_end


def _sde_diffrax_episode(problem: Problem, theta, key):
    """The reference path: :func:`diffrax.diffeqsolve` on a virtual Brownian tree (NaN states on failure)."""
    system = problem.system
    horizon = problem.setting.horizon
    key0, key_bm = jax.random.split(key)
    x0 = problem.initial.sample(key0)
    t1 = horizon * system.dt
    ts = jnp.linspace(0.0, t1, horizon + 1)
    bm = diffrax.VirtualBrownianTree(0.0, t1, tol=system.dt / 4, shape=x0.shape, key=key_bm)
    event = _exit_event(problem, x0.dtype)

    def diffusion(t, x, theta):
        return lineax.DiagonalLinearOperator(jnp.broadcast_to(system.diffusion(t, x, theta), x.shape))

    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, x, theta: system.drift(t, x, theta)), diffrax.ControlTerm(diffusion, bm)
    )
    sol = diffrax.diffeqsolve(
        terms,
        system.solver,
        t0=0.0,
        t1=t1,
        dt0=system.dt,
        y0=x0,
        args=theta,
        saveat=_saveat(ts, event),
        adjoint=system.adjoint,
        event=event,
        max_steps=horizon + 16,
        throw=False,
    )
    if event is None:
        ys, end_ys = sol.ys, None
    else:
        ys, end_ys = sol.ys[0], sol.ys[1][0]
    states, alive, t_end, ok = _absorb(sol, ts, event, ys, end_ys)
    states = jnp.where(ok, states, jnp.nan)
    # Left-point (Euler) rule for the running cost: the Euler-Maruyama discretisation of the cost integral. After an
    # exit the cost and log-density are zero; the crossing interval is charged up to the crossing time (so the
    # pathwise gradient sees the exit time) and scored as a full Euler-Maruyama step.
    if event is None:
        costs = jax.vmap(problem.step_cost, in_axes=(0, 0, None))(ts[:-1], states[:-1], theta)
    else:
        rates = jax.vmap(problem.running_cost, in_axes=(0, 0, None))(ts[:-1], states[:-1], theta)
        costs = rates * jnp.clip(t_end - ts[:-1], 0.0, system.dt)
    lps = system.path_log_prob(states, theta)
    lps = jnp.where(alive[:-1], lps, 0.0)
    return states, costs, lps, alive, t_end


def _with_terminal(problem: Problem, theta, states, costs, lps, alive, t_end=None):
    """Add the terminal cost, paid once at the first absorbed state (or at x_H for episodes that never end), at
    time ``t_end`` (default: the recorded time of that state; ODE/SDE exits pass their crossing time)."""
    w, w_end = problem.setting.weights()
    w_full = jnp.asarray(np.append(w, w_end), costs.dtype)
    ended = ~alive
    end_index = jnp.where(jnp.any(ended), jnp.argmax(ended), problem.setting.horizon)
    if problem.terminal_cost is not None:
        if t_end is None:
            t_end = end_index.astype(costs.dtype) * problem.system.time_step
        terminal_cost = problem.final_cost(t_end, states[end_index], theta)
        end_weight = w_full[end_index]
    else:
        terminal_cost = end_weight = jnp.zeros((), costs.dtype)
    return states, costs, lps, alive, terminal_cost, end_weight


def _episode(problem: Problem, theta, key, path: str, checkpoints):
    if path == "chain":
        out = _chain_episode(problem, theta, key, checkpoints)
    elif isinstance(problem.system, SDESystem):
        out = _sde_diffrax_episode(problem, theta, key)
    else:
        out = _ode_diffrax_episode(problem, theta, key)
    return _with_terminal(problem, theta, *out)


def simulate_batch(
    problem: Problem, theta: PyTree, keys: jax.Array, *, integrator: str = "auto", checkpoints: int | None = None
) -> EpisodeBatch:
    """Simulate one episode per key (``keys`` of shape ``(n,)``) on the path :func:`choose_integrator` picks.

    Traceable and differentiable in ``theta``; episode ``i`` depends on ``keys[i]`` only. ``checkpoints`` splits the
    time scan of chains and of the fast path into that many rematerialised segments (see
    :func:`~pydso.backends.jax._scan.checkpointed_scan`); on the diffrax path the system's adjoint decides
    (``diffrax.RecursiveCheckpointAdjoint(checkpoints=...)``).
    """
    path = choose_integrator(problem, integrator)
    if path == "fastpath":
        return _fastpath_batch(problem, theta, keys, checkpoints)
    out = jax.vmap(lambda k: _episode(problem, theta, k, path, checkpoints))(keys)
    return EpisodeBatch(*out)
