"""The pathwise (reparameterisation) gradient estimator."""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..backends import AbstractBackend, get_backend
from ..systems import Problem
from ._base import AbstractEstimator, Estimate

__all__ = ["Pathwise", "pathwise_gradient"]


class Pathwise(AbstractEstimator):
    r"""The pathwise (reparameterisation) gradient of DESIGN.md §1.2: with the noise held fixed,
    :math:`\nabla_\theta` of the simulated objective :math:`\hat J_i = \sum_t w_t L_{i,t} + w_{end}\Phi_i` by
    reverse-mode autodiff through the backend's simulation (the fast path's scan, a chain's ``lax.scan``, or
    :func:`diffrax.diffeqsolve` with the system's adjoint).

    **Batch means.** The ``n`` episodes are split into ``G`` groups of ``m = ceil(n / groups)`` consecutive episodes
    (``G = ceil(n / m)``; the last group may be smaller) and each group is ONE call of the backend on its ``m``
    episodes, vmapped over the groups, so the fast path differentiates struct-of-arrays kernels instead of ``n``
    one-episode kernels (measured: as fast as one whole-chunk gradient or faster, e.g. 1.50 s vs 1.90 s for 1e4
    Lorenz episodes of 1000 RK4 steps on 2 CPU cores). The gradient is the exact mean
    :math:`\bar g = \sum_g (n_g/n)\,\bar g_g` of the per-episode gradients (the same number as a per-episode vmap,
    to rounding); its standard error is the batch-means estimator

    .. math:: \widehat{\mathrm{se}}(\bar g)^2 = \frac{G}{G-1}\sum_g \Big(\frac{n_g}{n}\Big)^2 (\bar g_g - \bar g)^2,

    which for equal groups is :math:`\mathrm{std}(\bar g_g)/\sqrt G` (Law & Kelton, *Simulation Modeling and
    Analysis*, §9.5.3; the episodes are independent, so the group means are too). It is unbiased like the
    per-episode estimator but has only ``G - 1`` degrees of freedom: its relative error is about
    :math:`1/\sqrt{2(G-1)}` (13% for ``G = 32``). With ``groups >= n`` every episode is its own group and the
    per-episode standard error is recovered. The objective's standard error is always per episode.

    Needs reparameterised dynamics (:class:`~pydso.DeterministicMap`, :class:`~pydso.GaussianChain`,
    :class:`~pydso.ODESystem`, :class:`~pydso.SDESystem`, or a :class:`~pydso.MarkovChain` declared
    ``reparameterized=True``). Terminal sets of discrete-time chains make the objective discontinuous in
    :math:`\theta`: the pathwise gradient then ignores the change of the exit time (use :class:`Score`). ODE/SDE
    terminal sets are located by a diffrax event whose root find is differentiated, so there the gradient includes
    the exit-time term.

    **Arguments:**

    - `checkpoints`: ``k`` rematerialised segments of the time scan (chains and the fast path), so reverse-mode
      memory grows like ``k + H/k`` instead of ``H`` (long horizons); the gradient is unchanged.
    - `backend`: the simulation backend (name or instance, default ``"jax"``).
    - `groups`: the number of batch-means groups (at most ``n``). Default: the backend's choice
      (:meth:`~pydso.backends.AbstractBackend.gradient_groups`): 32 on the JAX fast path and for more than 64
      episodes, one per episode otherwise.
    - `mode`: ``"reverse"`` (default; the above) or ``"forward"``: the Jacobian of the per-episode objectives
      :math:`\partial \hat J_i / \partial\theta` by forward-mode autodiff (:func:`jax.jacfwd`, one tangent per
      parameter, carried through the time scan beside the state). That gives every episode's gradient in one pass
      over one simulation of all ``n`` episodes, so the standard error is the per-episode one (``groups`` is not
      used), with no stored trajectory (memory independent of the horizon). Its cost grows with the number of
      parameters :math:`p` (about :math:`1 + c\,p` forward passes), reverse mode's does not: use it for a few
      physical or design parameters (measured on Lorenz, :math:`p = 3`, 1e4 episodes: 2.4x faster than reverse
      mode, ``benchmarks/bench_user_jobs.py``), never for neural-network policies. The diffrax path supports it only
      with ``adjoint=diffrax.ForwardMode()`` or ``diffrax.DirectAdjoint()`` (a :class:`~pydso.ProblemError` says so).
    """

    checkpoints: int | None = eqx.field(static=True, default=None)
    backend: "str | AbstractBackend | None" = eqx.field(static=True, default=None)
    groups: int | None = eqx.field(static=True, default=None)
    mode: str = eqx.field(static=True, default="reverse")

    def __check_init__(self):
        if self.groups is not None:
            check_positive_int(self.groups, "Pathwise.groups")
        if self.mode not in ("reverse", "forward"):
            raise ProblemError(f"Pathwise.mode must be 'reverse' or 'forward', got {self.mode!r}")

    def check(self, problem):
        if not problem.system.reparameterized:
            raise ProblemError(
                f"the pathwise estimator needs reparameterised dynamics, but {type(problem.system).__name__} "
                "samples are not differentiable in theta; use estimator='score'"
            )
        get_backend(self.backend).check(problem)

    def _estimate(self, problem, theta, keys):
        if self.mode == "forward":
            return self._forward_estimate(problem, theta, keys)
        backend = get_backend(self.backend)
        n = keys.shape[0]
        groups = backend.gradient_groups(problem, n) if self.groups is None else self.groups
        m = -(-n // min(groups, n))  # episodes per group
        G = -(-n // m)  # groups (none empty)
        m = backend.group_size(problem, m, G)  # the backend may pad groups to a faster width (masked out below)
        pad = G * m - n
        if pad:  # the last group is filled up with copies of real episodes, masked out of every sum
            keys = jnp.concatenate([keys, keys[:pad]])
        keys = keys.reshape((G, m) + keys.shape[1:])
        mask = (jnp.arange(G * m) < n).reshape(G, m)
        sizes = mask.sum(axis=1)

        def group_mean(theta, keys_g, mask_g):
            values = self._episode_objectives(backend, problem, theta, keys_g)
            return jnp.sum(jnp.where(mask_g, values, 0.0)) / jnp.sum(mask_g, dtype=values.dtype), values

        value_and_grad = jax.value_and_grad(group_mean, has_aux=True)
        (_, values), grads = jax.vmap(value_and_grad, in_axes=(None, 0, 0))(theta, keys, mask)
        mean, stderr = combine_group_means(grads, sizes / n)
        values = values.reshape(-1)[:n]
        return Estimate(mean, stderr, jnp.mean(values), jnp.std(values, ddof=1) / jnp.sqrt(n))

    def _episode_objectives(self, backend, problem, theta, keys):
        r"""The simulated objectives :math:`\hat J_i = \sum_t w_t L_{i,t} + w_{end}\Phi_i` of one episode per key."""
        b = backend.simulate(problem, theta, keys, checkpoints=self.checkpoints)
        w = jnp.asarray(problem.setting.weights()[0], b.costs.dtype)
        return b.costs @ w + b.terminal_weights * b.terminal_costs

    def _forward_estimate(self, problem, theta, keys):
        backend = get_backend(self.backend)
        n = keys.shape[0]

        def values(theta):
            v = self._episode_objectives(backend, problem, theta, keys)
            return v, v

        try:
            per_episode, v = jax.jacfwd(values, has_aux=True)(theta)  # leaves (n, *leaf shape)
        except TypeError as err:
            if "custom_vjp" not in str(err) and "forward-mode" not in str(err):
                raise
            raise ProblemError(
                "Pathwise(mode='forward') cannot differentiate this simulation forwards: the diffrax path's "
                "adjoint supports reverse mode only; give the system adjoint=diffrax.ForwardMode() (or "
                "diffrax.DirectAdjoint()), or use Pathwise(mode='reverse')"
            ) from err
        root_n = jnp.sqrt(jnp.asarray(n, v.dtype))
        mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_episode)
        stderr = jax.tree.map(lambda g: jnp.std(g, axis=0, ddof=1) / root_n, per_episode)
        return Estimate(mean, stderr, jnp.mean(v), jnp.std(v, ddof=1) / root_n)


def combine_group_means(group_means: PyTree, fractions: jax.Array) -> tuple[PyTree, PyTree]:
    r"""Batch-means estimate from ``G`` group means :math:`g_j` (leaves of shape ``(G, ...)``) of groups holding the
    fractions :math:`f_j` of the episodes: the mean :math:`\sum_j f_j g_j` and its standard error
    :math:`\sqrt{G/(G-1)\,\sum_j f_j^2 (g_j - \bar g)^2}` (NaN for ``G = 1``). Returns ``(mean, stderr)`` pytrees."""
    G = fractions.shape[0]

    def combine(g):
        g = jnp.asarray(g)
        f = fractions.reshape((G,) + (1,) * (g.ndim - 1)).astype(g.dtype)
        mean = jnp.sum(f * g, axis=0)
        var = G / (G - 1) * jnp.sum(f**2 * (g - mean) ** 2, axis=0) if G > 1 else jnp.full_like(mean, jnp.nan)
        return mean, jnp.sqrt(var)

    pairs = jax.tree.map(combine, group_means)
    mean = jax.tree.map(lambda _, p: p[0], group_means, pairs)
    stderr = jax.tree.map(lambda _, p: p[1], group_means, pairs)
    return mean, stderr


def pathwise_gradient(problem: Problem, theta: PyTree, *, key: jax.Array, n: int) -> Estimate:
    """Pathwise estimate of :math:`\\nabla J` from ``n`` episodes; see :class:`Pathwise`."""
    return Pathwise().estimate(problem, theta, key=key, n=n)
