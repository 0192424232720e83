r"""Fast path for ensembles of fixed-step ODEs (explicit Runge–Kutta) and diagonal-noise SDEs (Euler–Maruyama).

``jax.vmap`` of :func:`diffrax.diffeqsolve` keeps one solver state per trajectory and runs diffrax's generic
stage loop for each of them; for a fixed step and an explicit tableau all of that machinery is unnecessary.
Here the whole ensemble is one state in *struct-of-arrays* layout, shape ``(d, N)`` (component ``i`` of every
trajectory is one contiguous length-``N`` vector), the horizon is one ``lax.scan`` over time, and the user's
single-trajectory vector field ``f(t, x, theta)`` is applied with
``jax.vmap(f, in_axes=(None, 1, None), out_axes=1)``, which XLA lowers to elementwise kernels over
length-``N`` rows. The Butcher tableau is data read from the diffrax solver, so the fast path and diffrax
compute the same discrete solution (to rounding): see ``tests/test_backends.py``.

Public (exported from :mod:`pydso.backends.jax`):

* :func:`fixed_step_ensemble` — fixed-step explicit RK ensemble with an optional running cost integrated as
  an augmented state component, and optional driving inputs (zero-order hold or linear interpolation).
* :func:`euler_maruyama_ensemble` — Euler–Maruyama for diagonal-noise Itô SDEs (own Gaussian increments).

:func:`fixed_step_scan` and :func:`euler_maruyama_scan` are the same kernels with the output layout as an option:
time-major struct-of-arrays ``(n_save, d, N)``, or episode-major ``(N, n_save + 1, d)`` written once, in blocks
that are transposed in cache (:func:`~pydso.backends.jax._scan.episode_major_scan`), which the ensembles and
:class:`~pydso.backends.JaxBackend` use; they are internal to the backend.

Gradients are reverse-mode through the scan (discretise-then-optimise, the same discrete gradient as diffrax's
``RecursiveCheckpointAdjoint``). ``checkpoints=k`` runs the horizon as ``k`` segments of
:func:`~pydso.backends.jax._scan.checkpointed_scan`, so the stored residuals grow like ``k + n_steps / k`` instead
of ``n_steps``.
"""

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from ..._checks import check_positive_int
from ..._errors import ProblemError
from ..._typing import PyTree
from ._scan import checkpointed_scan, episode_major_scan
from ._solvers import tableau_of
from ._unroll import unroll_small_contractions

__all__ = ["fixed_step_ensemble", "euler_maruyama_ensemble", "fixed_step_scan", "euler_maruyama_scan"]


# Rematerialise each RK step on the backward pass: reverse mode then stores only the state at each step
# (d*N numbers) instead of every stage and intermediate of the vector field; measured ~10x less memory, faster
# compilation and no slower gradients (benchmarks/bench_gradient.py).
_REMAT_STEP = True

_INTERPOLATIONS = ("zoh", "linear")

# Cache aliasing: when N is a multiple of 512, every (d, N) float64 temporary is a multiple of 4 KiB long, so XLA's
# buffers start at addresses that map to the same L1 sets, and the fused reverse-mode kernels (which read many such
# buffers at the same index) thrash. Measured on the Lorenz gradient: 2.6x slower per trajectory at N = 1024 and 3.7x
# at N = 4096 than at N = 1000 or 4104 (forward passes are unaffected). The kernels then run ALIAS_PAD extra copies
# of the first trajectories and drop them; results are unchanged.
ALIAS_PERIOD = 512
ALIAS_PAD = 8


def alias_pad(N: int) -> int:
    """How many trajectories to add to an ensemble of ``N`` so that its width avoids the aliasing above."""
    return ALIAS_PAD if N % ALIAS_PERIOD == 0 else 0


# ----------------------------------------------------------------------------------------- scan helpers
def _batched(fn, in_axes, out_axes):
    """``jax.vmap(fn)`` over the trajectories, with small reductions/contractions over the state kept elementwise
    (:func:`~pydso.backends.jax._unroll.unroll_small_contractions`), so that XLA fuses each stage into one loop."""
    return unroll_small_contractions(jax.vmap(fn, in_axes=in_axes, out_axes=out_axes))


def _split_checkpoints(checkpoints, n_save):
    """Place ``checkpoints`` segments on the save intervals (outer) or, when there are fewer save intervals than
    segments, inside each save interval (inner), so that long unsaved stretches are checkpointed too."""
    if not checkpoints or checkpoints <= 1:
        return None, None
    if n_save >= checkpoints:
        return int(checkpoints), None
    return None, -(-int(checkpoints) // n_save)


def _run_steps(step, y, n, count, aux, checkpoints):
    """Apply ``y = step(y, n + j, aux)`` for ``j < count`` (a scan, optionally in checkpointed segments)."""
    if count == 1:
        return step(y, n, aux)

    def body(carry, _):
        y, j = carry
        return (step(y, n + j, aux), j + 1), None

    (y, _), _ = checkpointed_scan(body, (y, jnp.asarray(0, jnp.int32)), length=count, checkpoints=checkpoints)
    return y


def _rows_finite(x, axis):
    """Per trajectory, whether all components are finite (``x`` of shape ``(d, N)`` for ``axis=1``, ``(N, d)`` for
    ``axis=0``), as elementwise ands of rows so that XLA fuses it into the step's loop."""
    d = x.shape[1 - axis]
    rows = [x[i] if axis == 1 else x[:, i] for i in range(d)]
    ok = jnp.isfinite(rows[0])
    for r in rows[1:]:
        ok = ok & jnp.isfinite(r)
    return ok


def _check_steps(n_steps, save_every):
    n_steps = check_positive_int(n_steps, "n_steps")
    save_every = check_positive_int(save_every, "save_every")
    if n_steps % save_every:
        raise ProblemError(f"n_steps ({n_steps}) must be a multiple of save_every ({save_every})")
    return n_steps, save_every


def _check_x0(x0):
    x0 = jnp.asarray(x0)
    if x0.ndim != 2:
        raise ProblemError(f"x0 must have shape (N, d), got {x0.shape}")
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ProblemError(f"x0 must be a floating-point array, got dtype {x0.dtype}")
    return x0


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


def _prepare_inputs(inputs, interpolation, N, n_save, axis, dtype, pad):
    """Check ``inputs`` and lay them out for the scan: ``(u_lo, u_hi)`` of shape ``(n_save, ...)`` (the samples at
    the start and end of each save interval) and the ``vmap`` axis of one sample (None when shared); per-trajectory
    inputs get ``pad`` copies of their first rows, like ``x0``."""
    if interpolation not in _INTERPOLATIONS:
        raise ProblemError(f"input_interpolation must be 'zoh' or 'linear', got {interpolation!r}")
    u = jnp.asarray(inputs)
    if not jnp.issubdtype(u.dtype, jnp.floating):
        u = u.astype(dtype)
    if u.ndim >= 2 and u.shape[:2] == (N, n_save + 1):  # per trajectory: (N, n_save + 1, *u_shape)
        per_traj = True
    elif u.ndim >= 1 and u.shape[0] == n_save + 1:  # shared: (n_save + 1, *u_shape)
        per_traj = False
    else:
        raise ProblemError(
            f"inputs must have shape (n_save + 1, *u_shape) = ({n_save + 1}, ...) shared by all trajectories or "
            f"(N, n_save + 1, *u_shape) = ({N}, {n_save + 1}, ...) per trajectory, got {u.shape}"
        )
    if not per_traj:
        return (u[:-1], u[1:]), None
    if pad:
        u = jnp.concatenate([u, u[:pad]])
    if axis == 1:  # soa: the trajectory axis last, contiguous rows of length N
        u = jnp.moveaxis(u, 0, -1)  # (n_save + 1, *u_shape, N)
        u_axis = u.ndim - 2
    else:  # aos: (n_save + 1, N, *u_shape)
        u = jnp.swapaxes(u, 0, 1)
        u_axis = 0
    return (u[:-1], u[1:]), u_axis


# ------------------------------------------------------------------------------------------- ODE ensemble
def fixed_step_scan(
    vector_field: Callable,
    x0: jax.Array,
    theta: PyTree,
    *,
    dt,
    n_steps: int,
    solver=None,
    cost: Callable | None = None,
    save_every: int = 1,
    t0=0.0,
    checkpoints: int | None = None,
    layout: str = "soa",
    inputs: jax.Array | None = None,
    input_interpolation: str = "zoh",
    finite_flags: bool = False,
    cost_time: bool = False,
    episode_major: bool = False,
):
    """:func:`fixed_step_ensemble` without the final re-layout: returns ``(xs, cs)`` with ``xs`` the saved states
    after ``x0``, time-major, ``(n_save, d, N)`` for ``layout="soa"`` or ``(n_save, N, d)`` for ``"aos"``, and
    ``cs`` of shape ``(n_save, N)`` (None without a cost). With ``finite_flags=True``, ``(xs, cs, ok)`` where ``ok``
    (shape ``(N,)``) says whether every saved state of a trajectory (``x0`` included) is finite, tracked in the scan's
    carry at no extra pass over the states. With ``cost_time=True`` the cost receives the time first,
    ``cost(t, x, theta)`` (``cost(t, x, u, theta)`` with inputs), evaluated at each Runge–Kutta stage's time.
    With ``episode_major=True`` (struct-of-arrays layout only) the outputs come episode-major instead, written once
    in blocks by :func:`~pydso.backends.jax._scan.episode_major_scan`: ``xs`` of shape ``(N, n_save + 1, d)``
    *including* ``x0`` and ``cs`` of shape ``(N, n_save)``."""
    n_steps, save_every = _check_steps(n_steps, save_every)
    a, b, c = tableau_of(diffrax.Tsit5() if solver is None else solver)
    if layout not in ("soa", "aos"):
        raise ProblemError(f"layout must be 'soa' or 'aos', got {layout!r}")
    x0 = _check_x0(x0)
    N = x0.shape[0]
    pad = alias_pad(N)
    if pad:
        x0 = jnp.concatenate([x0, x0[:pad]])
    dtype = x0.dtype
    axis = 1 if layout == "soa" else 0
    n_save = n_steps // save_every
    dt = jnp.asarray(dt, dtype)
    t0 = jnp.asarray(t0, dtype)

    if inputs is None:
        f_b = _batched(vector_field, (None, axis, None), axis)
        if cost is not None and not cost_time:
            cost_t = cost
            cost = lambda t, x, th: cost_t(x, th)  # noqa: E731
        L_b = None if cost is None else _batched(cost, (None, axis, None), 0)
        us = None

        def fields(t, x, u):
            return f_b(t, x, theta), (None if L_b is None else L_b(t, x, theta).astype(dtype))

    else:
        us, u_axis = _prepare_inputs(inputs, input_interpolation, N, n_save, axis, dtype, pad)
        f_b = _batched(vector_field, (None, axis, u_axis, None), axis)
        if cost is not None and not cost_time:
            cost_u = cost
            cost = lambda t, x, u, th: cost_u(x, u, th)  # noqa: E731
        L_b = None if cost is None else _batched(cost, (None, axis, u_axis, None), 0)

        def fields(t, x, u):
            return f_b(t, x, u, theta), (None if L_b is None else L_b(t, x, u, theta).astype(dtype))

    linear = inputs is not None and input_interpolation == "linear"

    def stage_input(aux, n, ci):
        if aux is None:
            return None
        u_lo, u_hi, n_start = aux
        if not linear:
            return u_lo
        # fraction of the save interval elapsed at this stage: (j + c_i) / save_every, exact in integers and c_i
        s = ((n - n_start).astype(dtype) + ci) / save_every
        return u_lo + (u_hi - u_lo) * s

    def rk_step(y, n, aux):
        tn = t0 + n.astype(dt.dtype) * dt
        ks = []
        for i in range(len(b)):
            zi = _axpy_sum(y, dt, a[i], ks)
            ks.append(fields(tn + c[i] * dt, zi[0], stage_input(aux, n, c[i])))
        return _axpy_sum(y, dt, b, ks)

    if _REMAT_STEP:
        rk_step = jax.checkpoint(rk_step, prevent_cse=False)

    def interval(carry, u_pair):
        x, n, ok = carry
        aux = None if u_pair is None else (u_pair[0], u_pair[1], n)
        y = (x, None if L_b is None else jnp.zeros(x.shape[axis], dtype))
        x1, c1 = _run_steps(rk_step, y, n, save_every, aux, inner_ck)
        ok = None if ok is None else ok & _rows_finite(x1, axis)
        return (x1, n + save_every, ok), (x1, c1)

    outer_ck, inner_ck = _split_checkpoints(checkpoints, n_save)
    x_init = x0.T if layout == "soa" else x0
    ok0 = _rows_finite(x_init, axis) if finite_flags else None
    init = (x_init, jnp.asarray(0, jnp.int32), ok0)
    if episode_major and layout != "soa":
        raise ProblemError("episode_major=True needs layout='soa'")
    xs, cs, ok = _scan_outputs(interval, init, us, n_save, outer_ck, x0 if episode_major else None)
    if pad:
        xs = xs[:N] if episode_major else (xs[:, :, :N] if layout == "soa" else xs[:, :N])
        cs = None if cs is None else (cs[:N] if episode_major else cs[:, :N])
        ok = None if ok is None else ok[:N]
    return (xs, cs, ok) if finite_flags else (xs, cs)


def _scan_outputs(interval, init, us, n_save, outer_ck, first):
    """Run ``interval`` over the save intervals: time-major ``(xs (n_save, d, N), extras (n_save, N))`` when
    ``first`` is None, else episode-major ``(states (N, n_save + 1, d) from first, extras (N, n_save))``; with the
    final finiteness flags. Segment checkpoints take the time-major scan (then transposed once)."""
    if first is None or outer_ck is not None:
        (_, _, ok), (xs, ex) = checkpointed_scan(interval, init, us, length=n_save, checkpoints=outer_ck)
        if first is None:
            return xs, ex, ok
        states = jnp.transpose(jnp.concatenate([first.T[None].astype(xs.dtype), xs], axis=0), (2, 0, 1))
        return states, jax.tree.map(lambda e: e.T, ex), ok
    (_, _, ok), states, ex = episode_major_scan(interval, init, us, n_save, first=first)
    return states, ex, ok


def fixed_step_ensemble(
    vector_field: Callable,
    x0: jax.Array,
    theta: PyTree,
    *,
    dt,
    n_steps: int,
    solver=None,
    cost: Callable | None = None,
    save_every: int = 1,
    t0=0.0,
    checkpoints: int | None = None,
    layout: str = "soa",
    inputs: jax.Array | None = None,
    input_interpolation: str = "zoh",
) -> tuple[jax.Array, jax.Array | None]:
    r"""Integrate ``N`` trajectories of :math:`\dot x = f(t, x, \theta)` (or :math:`\dot x = f(t, x, u(t), \theta)`
    with driving inputs) with a fixed-step explicit Runge–Kutta method, the whole ensemble as one state.

    Step :math:`n` (time :math:`t_n = t_0 + n\,\Delta t`) evaluates stage :math:`i` at
    :math:`t_n + c_i \Delta t` and updates :math:`x_{n+1} = x_n + \Delta t \sum_i b_i k_i` with the solver's Butcher
    tableau ``(a, b, c)``: the same discrete solution as :func:`diffrax.diffeqsolve` with
    ``diffrax.ConstantStepSize()`` and that solver, to rounding.

    **Inputs.** Save time :math:`t_k = t_0 + k\,s\,\Delta t` (``s = save_every``) carries the input sample
    :math:`u_k`. Over :math:`[t_k, t_{k+1})`, ``input_interpolation="zoh"`` (zero-order hold) feeds :math:`u_k` to
    every stage; ``"linear"`` feeds :math:`u_k + (u_{k+1} - u_k)(t - t_k)/(s\,\Delta t)` at stage time :math:`t`
    (the last sample :math:`u_{n_{save}}` is used only by ``"linear"``).

    **Arguments:**

    - `vector_field`: ``f(t, x, theta)`` for ONE trajectory, ``x`` of shape ``(d,)``, returning shape ``(d,)``;
      with ``inputs``, ``f(t, x, u, theta)`` with ``u`` of shape ``u_shape``.
    - `x0`: initial states, shape ``(N, d)``.
    - `theta`: parameters (any pytree), shared by all trajectories; differentiable.
    - `dt`: the step (may be a traced scalar).
    - `n_steps`: number of steps (static); a multiple of ``save_every``.
    - `solver`: a diffrax explicit RK solver whose tableau is used (default :class:`diffrax.Tsit5`), e.g.
      ``diffrax.Dopri5()``, ``diffrax.Bosh3()``, ``diffrax.Heun()``, ``diffrax.Euler()``,
      :class:`~pydso.backends.jax.RK4`, :class:`~pydso.backends.jax.RK4ThreeEighths`.
    - `cost`: optional running cost ``L(x, theta) -> scalar`` for one trajectory (``L(x, u, theta)`` with
      ``inputs``). Its integral over each save interval is computed with the same tableau as an augmented state
      component :math:`\dot c = L`, reset to zero at the start of each save interval.
    - `save_every`: save the state every ``save_every`` steps (``n_save = n_steps // save_every``).
    - `t0`: initial time.
    - `checkpoints`: if ``k > 1``, split the save intervals into ``k`` segments rematerialised on the backward pass
      (:func:`jax.checkpoint`): memory ~ ``k + n_steps/k`` steps instead of ``n_steps``; results unchanged.
    - `layout`: ``"soa"`` (state ``(d, N)``, default and faster) or ``"aos"`` (state ``(N, d)``); for benchmarks.
    - `inputs`: optional input samples, ``(n_save + 1, *u_shape)`` shared by all trajectories or
      ``(N, n_save + 1, *u_shape)`` per trajectory (recognised by its leading ``(N, n_save + 1)``); differentiable.
    - `input_interpolation`: ``"zoh"`` (default) or ``"linear"``, see above.

    **Returns:**

    ``(states, costs)``: ``states`` of shape ``(N, n_save + 1, d)`` (including ``x0``) and ``costs`` of shape
    ``(N, n_save)``, or None when ``cost`` is None.

    **Raises:** :class:`~pydso.ProblemError` for a solver without an explicit tableau, non-integer or
    incompatible ``n_steps``/``save_every``, or inputs of the wrong shape.

    Not for adaptive step sizes, implicit/stiff solvers or continuous adjoints: use :func:`diffrax.diffeqsolve`
    (``JaxBackend(integrator="diffrax")``).
    """
    x0 = _check_x0(x0)
    xs, cs = fixed_step_scan(
        vector_field,
        x0,
        theta,
        dt=dt,
        n_steps=n_steps,
        solver=solver,
        cost=cost,
        save_every=save_every,
        t0=t0,
        checkpoints=checkpoints,
        layout=layout,
        inputs=inputs,
        input_interpolation=input_interpolation,
        episode_major=layout == "soa",  # written once, episode-major, in blocks
    )
    if layout == "soa":
        return xs, cs
    states = jnp.transpose(jnp.concatenate([x0[None], xs], axis=0), (1, 0, 2))
    return states, (None if cs is None else cs.T)


# ------------------------------------------------------------------------------------------- SDE ensemble
def euler_maruyama_scan(
    drift: Callable,
    diffusion: Callable,
    x0: jax.Array,
    theta: PyTree,
    *,
    dt,
    n_steps: int,
    key: jax.Array,
    cost: Callable | None = None,
    save_every: int = 1,
    t0=0.0,
    checkpoints: int | None = None,
    finite_flags: bool = False,
    cost_time: bool = False,
    episode_major: bool = False,
    log_prob: Callable | None = None,
):
    """:func:`euler_maruyama_ensemble` without the final re-layout: returns ``(xs (n_save, d, N), cs (n_save, N) or
    None)``, the saved states after ``x0`` time-major in struct-of-arrays layout, and with ``finite_flags=True`` the
    per-trajectory flags ``ok (N,)`` of :func:`fixed_step_scan`. With ``cost_time=True`` the cost is
    ``cost(t, x, theta)``. With ``episode_major=True`` the outputs are episode-major as in :func:`fixed_step_scan`.
    ``log_prob(t, x, x_next, theta)`` (one transition, e.g. :meth:`pydso.SDESystem.log_prob`), if given, is
    evaluated inside the kernel on every step (states behind ``stop_gradient``: a score, not a pathwise term), summed
    over each save interval, and returned as ``cs = (costs or None, log_probs)``."""
    n_steps, save_every = _check_steps(n_steps, save_every)
    x0 = _check_x0(x0)
    N, d = x0.shape
    dtype = x0.dtype
    f_b = _batched(drift, (None, 1, None), 1)

    def g_one(t, x, th):
        return jnp.broadcast_to(diffusion(t, x, th), x.shape)

    g_b = _batched(g_one, (None, 1, None), 1)
    if cost is not None and not cost_time:
        cost_x = cost
        cost = lambda t, x, th: cost_x(x, th)  # noqa: E731
    L_b = None if cost is None else _batched(cost, (None, 1, None), 0)
    lp_b = None if log_prob is None else _batched(log_prob, (None, 1, 1, None), 0)
    dt = jnp.asarray(dt, dtype)
    t0 = jnp.asarray(t0, dtype)
    sqdt = jnp.sqrt(dt)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key))  # raw uint32 key data, shape (2,) or (N, 2)
    per_path = jnp.ndim(key) == 1
    if per_path and key.shape[0] != N:
        raise ProblemError(f"got {key.shape[0]} keys for {N} trajectories")
    if jnp.ndim(key) > 1:
        raise ProblemError(f"key must be one PRNG key or N keys, got shape {key.shape}")
    N_out = N
    pad = alias_pad(N) if per_path else 0  # one key draws (d, N) at once: padding would change every path
    if pad:
        x0 = jnp.concatenate([x0, x0[:pad]])
        key = jnp.concatenate([key, key[:pad]])
        N = N + pad

    def noise(n):
        if per_path:
            ks = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, n)
            return jax.vmap(lambda k: jax.random.normal(k, (d,), dtype), out_axes=1)(ks)
        return jax.random.normal(jax.random.fold_in(key, n), (d, N), dtype)

    def em_step(y, n, aux):
        x, c, lp = y
        tn = t0 + n.astype(dt.dtype) * dt
        xi = noise(n)
        x1 = x + f_b(tn, x, theta) * dt + g_b(tn, x, theta) * (sqdt * xi)
        c1 = None if L_b is None else c + L_b(tn, x, theta).astype(dtype) * dt
        if lp_b is not None:
            x_sg, x1_sg = jax.lax.stop_gradient(x), jax.lax.stop_gradient(x1)
            lp = lp + lp_b(tn, x_sg, x1_sg, theta).astype(dtype)
        return x1, c1, lp

    def interval(carry, _):
        x, n, ok = carry
        zeros = jnp.zeros((N,), dtype)
        y = (x, None if L_b is None else zeros, None if lp_b is None else zeros)
        x1, c1, lp1 = _run_steps(em_step, y, n, save_every, None, inner_ck)
        ok = None if ok is None else ok & _rows_finite(x1, 1)
        return (x1, n + save_every, ok), (x1, c1 if lp_b is None else (c1, lp1))

    n_save = n_steps // save_every
    outer_ck, inner_ck = _split_checkpoints(checkpoints, n_save)
    ok0 = _rows_finite(x0.T, 1) if finite_flags else None
    init = (x0.T, jnp.asarray(0, jnp.int32), ok0)
    xs, cs, ok = _scan_outputs(interval, init, None, n_save, outer_ck, x0 if episode_major else None)
    if pad:
        xs = xs[:N_out] if episode_major else xs[:, :, :N_out]
        ok = None if ok is None else ok[:N_out]
        cs = jax.tree.map(lambda e: e[:N_out] if episode_major else e[:, :N_out], cs)
    return (xs, cs, ok) if finite_flags else (xs, cs)


def euler_maruyama_ensemble(
    drift: Callable,
    diffusion: Callable,
    x0: jax.Array,
    theta: PyTree,
    *,
    dt,
    n_steps: int,
    key: jax.Array,
    cost: Callable | None = None,
    save_every: int = 1,
    t0=0.0,
    checkpoints: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    r"""Euler–Maruyama for ``N`` trajectories of the Itô SDE :math:`dx = f(t,x,\theta)dt + g(t,x,\theta)\odot dW`.

    :math:`x_{n+1} = x_n + f(t_n, x_n)\,\Delta t + g(t_n, x_n)\odot\sqrt{\Delta t}\,\xi_n` with standard normal
    :math:`\xi_n`, in the same ``(d, N)`` layout as :func:`fixed_step_ensemble` (Kloeden & Platen, *Numerical
    Solution of Stochastic Differential Equations*, 1992, §9.1).

    **Noise source.** The increments are drawn here with :func:`jax.random.normal`, *not* from a
    ``diffrax.VirtualBrownianTree``: the same ``key`` gives different sample paths than diffrax, and agreement with
    diffrax is in distribution only (or exact when diffrax is driven by the same increments). With ONE key, step
    ``n`` draws one ``(d, N)`` array from ``fold_in(key, n)``; with ``N`` keys (shape ``(N,)``), trajectory ``i``
    draws ``(d,)`` from ``fold_in(key[i], n)``, so a trajectory does not depend on the rest of the ensemble (this is
    what :class:`~pydso.backends.JaxBackend` uses, so that chunking does not change results).

    **Arguments:**

    - `drift`: ``f(t, x, theta)`` for one trajectory, ``x`` of shape ``(d,)``.
    - `diffusion`: ``g(t, x, theta)``, broadcastable to ``(d,)`` (diagonal noise).
    - `x0`: ``(N, d)`` initial states.
    - `theta`: parameters (differentiable; the pathwise gradient flows through the reparameterised noise).
    - `dt`, `n_steps`, `save_every`, `t0`, `checkpoints`: as in :func:`fixed_step_ensemble`.
    - `key`: a PRNG key, or ``N`` keys.
    - `cost`: optional running cost ``L(x, theta)``, integrated with the left-point rule :math:`\sum L(x_n)\Delta t`
      over each save interval (the Euler–Maruyama discretisation of the integral).

    **Returns:**

    ``(states (N, n_save + 1, d), costs (N, n_save) or None)``.

    Not for non-diagonal noise or higher strong order (Milstein, SRK): use diffrax (``JaxBackend(integrator=
    "diffrax")`` with the system's ``solver``).
    """
    x0 = _check_x0(x0)
    xs, cs = euler_maruyama_scan(
        drift,
        diffusion,
        x0,
        theta,
        dt=dt,
        n_steps=n_steps,
        key=key,
        cost=cost,
        save_every=save_every,
        t0=t0,
        checkpoints=checkpoints,
        episode_major=True,
    )
    return xs, cs
