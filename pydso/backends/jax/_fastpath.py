r"""Fast path for ensembles of fixed-step ODEs (explicit Runge–Kutta) and diagonal-noise SDEs (Euler–Maruyama).

``jax.vmap`` of :func:`diffrax.diffeqsolve` keeps one solver state per trajectory and runs diffrax's generic
stage loop for each of them; for a fixed step and an explicit tableau all of that machinery is unnecessary.
Here the whole ensemble is one state in *struct-of-arrays* layout, shape ``(d, N)`` (component ``i`` of every
trajectory is one contiguous length-``N`` vector), the horizon is one ``lax.scan`` over time, and the user's
single-trajectory vector field ``f(t, x, theta)`` is applied with
``jax.vmap(f, in_axes=(None, 1, None), out_axes=1)``, which XLA lowers to elementwise kernels over
length-``N`` rows. The Butcher tableau is data read from the diffrax solver, so the fast path and diffrax
compute the same discrete solution (to rounding): see ``tests/test_fastpath.py``.

Public API:

* :func:`fixed_step_ensemble` — fixed-step explicit RK ensemble with an optional running cost integrated as
  an augmented state component (as :func:`pydso.engine._ode_episode` does with diffrax).
* :func:`euler_maruyama_ensemble` — Euler–Maruyama for diagonal-noise Itô SDEs (own Gaussian increments).
* :func:`supports` — whether an :class:`~pydso.ODESystem` can use the fast path.
* :func:`tableau_of` — the ``(a, b, c)`` of a supported diffrax solver.
* :class:`RK4` and :class:`RK4ThreeEighths` — classic RK4 and Kutta's 3/8 rule as diffrax solvers.

Gradients are reverse-mode through the scan (discretise-then-optimise, the same discrete gradient as diffrax's
``RecursiveCheckpointAdjoint``). ``checkpoints=k`` wraps ``k`` segments of the horizon in
:func:`jax.checkpoint`, so the stored residuals grow like ``k + n_steps / k`` instead of ``n_steps``.
"""

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from ...systems import ODESystem
from ._solvers import RK4, RK4ThreeEighths, fixed_step_applies, tableau_of

PyTree = Any

__all__ = [
    "RK4",
    "RK4ThreeEighths",
    "fixed_step_ensemble",
    "euler_maruyama_ensemble",
    "supports",
    "tableau_of",
]


def supports(system) -> bool:
    """True when ``system`` can be simulated by :func:`fixed_step_ensemble` with the same discrete solution.

    That is: a :class:`~pydso.ODESystem` with ``diffrax.ConstantStepSize``, an explicit Runge–Kutta solver whose
    Butcher tableau is readable (``diffrax.Euler`` or any ``diffrax.AbstractERK`` with a ``ButcherTableau``:
    Tsit5, Dopri5, Bosh3, Heun, Midpoint, Ralston, :class:`RK4`, ...), and a discretise-then-optimise adjoint
    (``RecursiveCheckpointAdjoint`` or ``DirectAdjoint``, whose gradients reverse-mode through the scan
    reproduces). False for adaptive controllers, implicit/IMEX solvers, ``BacksolveAdjoint`` and SDEs.
    """
    return isinstance(system, ODESystem) and fixed_step_applies(
        system.solver, system.stepsize_controller, system.adjoint
    )


# Rematerialise each RK step on the backward pass: reverse mode then stores only the state at each step
# (d*N numbers) instead of every stage and intermediate of the vector field; measured ~10x less memory, faster
# compilation and no slower gradients (benchmarks/bench_gradient.py).
_REMAT_STEP = True


# ----------------------------------------------------------------------------------------- scan helpers
def _segmented_scan(body, carry, n: int, checkpoints: int | None):
    """``lax.scan(body, carry, length=n)``, optionally as ``checkpoints`` rematerialised segments.

    With ``checkpoints=k``, an outer scan runs over ``k`` segments of ``n // k`` iterations, each segment a
    ``jax.checkpoint``-ed inner scan (plus one checkpointed remainder segment when ``k`` does not divide ``n``):
    reverse mode stores ``k`` segment carries and the residuals of one segment at a time.
    """
    if not checkpoints or checkpoints <= 1 or n <= 1:
        return jax.lax.scan(body, carry, length=n)
    k = min(int(checkpoints), n)
    m, rem = divmod(n, k)

    @jax.checkpoint
    def segment(c, _):
        return jax.lax.scan(body, c, length=m)

    carry, ys = jax.lax.scan(segment, carry, length=k)
    ys = jax.tree.map(lambda y: y.reshape((k * m,) + y.shape[2:]), ys)
    if rem:
        carry, ys_rem = jax.checkpoint(lambda c: jax.lax.scan(body, c, length=rem))(carry)
        ys = jax.tree.map(lambda a, r: jnp.concatenate([a, r]), ys, ys_rem)
    return carry, ys


def _split_checkpoints(checkpoints, n_save):
    """Place ``checkpoints`` segments on the save intervals (outer) or, when there are fewer save intervals than
    segments, inside each save interval (inner), so that long unsaved stretches are checkpointed too."""
    if not checkpoints or checkpoints <= 1:
        return None, None
    if n_save >= checkpoints:
        return int(checkpoints), None
    return None, -(-int(checkpoints) // n_save)


def _run_steps(step, y, n, count, checkpoints):
    """Apply ``y = step(y, n + j)`` for ``j < count`` (a scan, optionally in checkpointed segments)."""
    if count == 1:
        return step(y, n)

    def body(carry, _):
        y, j = carry
        return (step(y, n + j), j + 1), None

    (y, _), _ = _segmented_scan(body, (y, jnp.asarray(0, jnp.int32)), count, checkpoints)
    return y


def _check_steps(n_steps, save_every):
    for name, v in (("n_steps", n_steps), ("save_every", save_every)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if n_steps % save_every:
        raise ValueError(f"n_steps ({n_steps}) must be a multiple of save_every ({save_every})")
    return int(n_steps), int(save_every)


def _axpy_sum(y0, dt, coeffs, ks):
    """``y0 + dt * sum_j coeffs[j] * ks[j]`` over pytrees, skipping zero coefficients (tableaux are data)."""
    terms = [(cj, kj) for cj, kj in zip(coeffs, ks, strict=False) if cj != 0.0]
    if not terms:
        return y0

    def leaf(y, *kl):
        acc = terms[0][0] * kl[0]
        for (cj, _), kj in zip(terms[1:], kl[1:], strict=True):
            acc = acc + cj * kj
        return y + dt * acc

    return jax.tree.map(leaf, y0, *[kj for _, kj in terms])


# ------------------------------------------------------------------------------------------- ODE ensemble
def fixed_step_ensemble(
    vector_field: Callable,
    x0: jax.Array,
    theta: PyTree,
    *,
    dt: float,
    n_steps: int,
    solver=None,
    cost: Callable | None = None,
    save_every: int = 1,
    t0: float = 0.0,
    checkpoints: int | None = None,
    layout: str = "soa",
):
    r"""Integrate ``N`` trajectories of :math:`\dot x = f(t, x, \theta)` with a fixed-step explicit RK method.

    Args:
        vector_field: ``f(t, x, theta)`` for ONE trajectory, ``x`` of shape ``(d,)``, returning shape ``(d,)``.
        x0: initial states, shape ``(N, d)``.
        theta: parameters (any pytree), shared by all trajectories; differentiable.
        dt: the step (may be a traced scalar).
        n_steps: number of steps (static); must be a multiple of ``save_every``.
        solver: a diffrax explicit RK solver whose tableau is used (default :class:`diffrax.Tsit5`), e.g.
            ``diffrax.Dopri5()``, ``diffrax.Bosh3()``, ``diffrax.Heun()``, ``diffrax.Euler()``, :class:`RK4`.
        cost: optional running cost ``L(x, theta) -> scalar`` for one trajectory. Its integral over each save
            interval is integrated with the same tableau as an augmented state component ``c`` with
            :math:`\dot c = L(x, \theta)` (reset to zero at the start of each save interval).
        save_every: save the state every ``save_every`` steps.
        t0: initial time (the vector field sees ``t0 + n*dt + c_i*dt`` at stage ``i`` of step ``n``).
        checkpoints: if ``k > 1``, split the save intervals into ``k`` segments, each rematerialised on the
            backward pass (:func:`jax.checkpoint`): memory ~ ``k + n_steps/k`` steps instead of ``n_steps``.
        layout: ``"soa"`` (state ``(d, N)``, default and faster) or ``"aos"`` (state ``(N, d)``); for benchmarks.

    Returns:
        ``(states, costs)``: ``states`` of shape ``(N, n_steps // save_every + 1, d)`` (including ``x0``),
        ``costs`` of shape ``(N, n_steps // save_every)``, or None when ``cost`` is None.
    """
    n_steps, save_every = _check_steps(n_steps, save_every)
    a, b, c = tableau_of(diffrax.Tsit5() if solver is None else solver)
    if layout not in ("soa", "aos"):
        raise ValueError(f"layout must be 'soa' or 'aos', got {layout!r}")
    x0 = jnp.asarray(x0)
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (N, d), got {x0.shape}")
    dtype = x0.dtype
    axis = 1 if layout == "soa" else 0
    f_b = jax.vmap(vector_field, in_axes=(None, axis, None), out_axes=axis)
    L_b = None if cost is None else jax.vmap(cost, in_axes=(axis, None))
    dt = jnp.asarray(dt, dtype)
    t0 = jnp.asarray(t0, dtype)
    n_save = n_steps // save_every

    def rhs(t, y):
        x, _ = y
        fx = f_b(t, x, theta)
        return (fx, None) if L_b is None else (fx, L_b(x, theta).astype(dtype))

    def rk_step(y, n):
        tn = t0 + n * dt
        ks = []
        for i in range(len(b)):
            zi = _axpy_sum(y, dt, a[i], ks)
            ks.append(rhs(tn + c[i] * dt, zi))
        return _axpy_sum(y, dt, b, ks)

    if _REMAT_STEP:
        rk_step = jax.checkpoint(rk_step, prevent_cse=False)

    def interval(carry, _):
        x, n = carry
        y = (x, None if L_b is None else jnp.zeros(x.shape[axis], dtype))
        y = _run_steps(rk_step, y, n, save_every, inner_ck)
        x1, c1 = y
        return (x1, n + save_every), (x1, c1)

    outer_ck, inner_ck = _split_checkpoints(checkpoints, n_save)
    x_init = x0.T if layout == "soa" else x0
    (_, _), (xs, cs) = _segmented_scan(interval, (x_init, jnp.asarray(0, jnp.int32)), n_save, outer_ck)
    if layout == "soa":
        states = jnp.concatenate([x0[:, None, :], jnp.transpose(xs, (2, 0, 1))], axis=1)
    else:
        states = jnp.concatenate([x0[:, None, :], jnp.transpose(xs, (1, 0, 2))], axis=1)
    costs = None if L_b is None else cs.T
    return states, costs


# ------------------------------------------------------------------------------------------- SDE ensemble
def euler_maruyama_ensemble(
    drift: Callable,
    diffusion: Callable,
    x0: jax.Array,
    theta: PyTree,
    *,
    dt: float,
    n_steps: int,
    key: jax.Array,
    cost: Callable | None = None,
    save_every: int = 1,
    t0: float = 0.0,
    checkpoints: int | None = None,
):
    r"""Euler–Maruyama for ``N`` trajectories of the Itô SDE :math:`dx = f(t,x,\theta)dt + g(t,x,\theta)\odot dW`.

    ``x_{n+1} = x_n + f(t_n, x_n) dt + g(t_n, x_n) * sqrt(dt) * xi_n`` with standard normal ``xi_n``, in the
    same ``(d, N)`` layout as :func:`fixed_step_ensemble`.

    **Noise source.** The increments are drawn here with :func:`jax.random.normal` (one ``(d, N)`` draw per step
    from ``jax.random.fold_in(key, step)``), *not* from the per-trajectory ``diffrax.VirtualBrownianTree`` that
    ``pydso.engine`` uses for :class:`~pydso.SDESystem`: the same ``key`` gives different sample paths than the
    engine, and agreement with diffrax is in distribution only. If ``key`` is a batch of ``N`` keys, each
    trajectory gets its own stream (``fold_in(key[i], step)``), so results do not depend on how an ensemble is
    chunked (slower: one generator call per trajectory).

    Args:
        drift: ``f(t, x, theta)`` for one trajectory, ``x`` of shape ``(d,)``.
        diffusion: ``g(t, x, theta)``, broadcastable to ``(d,)`` (diagonal noise).
        x0: ``(N, d)`` initial states.
        theta: parameters (differentiable; the pathwise gradient flows through the reparameterised noise).
        dt, n_steps, save_every, t0, checkpoints: as in :func:`fixed_step_ensemble`.
        key: a PRNG key, or ``N`` keys.
        cost: optional running cost ``L(x, theta)``, integrated with the left-point rule ``sum L(x_n) dt`` over
            each save interval (the Euler–Maruyama discretisation of the integral, as in the engine).

    Returns:
        ``(states (N, n_steps // save_every + 1, d), costs (N, n_steps // save_every) or None)``.
    """
    n_steps, save_every = _check_steps(n_steps, save_every)
    x0 = jnp.asarray(x0)
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (N, d), got {x0.shape}")
    N, d = x0.shape
    dtype = x0.dtype
    f_b = jax.vmap(drift, in_axes=(None, 1, None), out_axes=1)

    def g_one(t, x, th):
        return jnp.broadcast_to(diffusion(t, x, th), x.shape)

    g_b = jax.vmap(g_one, in_axes=(None, 1, None), out_axes=1)
    L_b = None if cost is None else jax.vmap(cost, in_axes=(1, None))
    dt = jnp.asarray(dt, dtype)
    t0 = jnp.asarray(t0, dtype)
    sqdt = jnp.sqrt(dt)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key))  # raw uint32 key data, shape (2,) or (N, 2)
    per_path = jnp.ndim(key) == 1
    if per_path and key.shape[0] != N:
        raise ValueError(f"got {key.shape[0]} keys for {N} trajectories")

    def noise(n):
        if per_path:
            ks = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, n)
            return jax.vmap(lambda k: jax.random.normal(k, (d,), dtype), out_axes=1)(ks)
        return jax.random.normal(jax.random.fold_in(key, n), (d, N), dtype)

    def em_step(y, n):
        x, c = y
        tn = t0 + n * dt
        xi = noise(n)
        x1 = x + f_b(tn, x, theta) * dt + g_b(tn, x, theta) * (sqdt * xi)
        c1 = None if L_b is None else c + L_b(x, theta).astype(dtype) * dt
        return x1, c1

    def interval(carry, _):
        x, n = carry
        y = (x, None if L_b is None else jnp.zeros((N,), dtype))
        y = _run_steps(em_step, y, n, save_every, inner_ck)
        x1, c1 = y
        return (x1, n + save_every), (x1, c1)

    n_save = n_steps // save_every
    outer_ck, inner_ck = _split_checkpoints(checkpoints, n_save)
    (_, _), (xs, cs) = _segmented_scan(interval, (x0.T, jnp.asarray(0, jnp.int32)), n_save, outer_ck)
    states = jnp.concatenate([x0[:, None, :], jnp.transpose(xs, (2, 0, 1))], axis=1)
    return states, (None if L_b is None else cs.T)
