r"""Generative-model tuning as a DSO problem constructor (the contract of :mod:`pydso.problems`).

A pretrained denoising chain (a DDPM sampler) is a finite-horizon, time-varying Gaussian chain

.. math::
    x_0 \sim N(0, I), \qquad x_{t+1} = m_t(x_t; \phi) + \sigma_t \varepsilon_t, \quad t = 0, \dots, H-1,

whose last state :math:`x_H` is the sample. Tuning it towards a reward :math:`r(x)` while staying close to the
pretrained parameters :math:`\phi_0` is the DSO problem with :math:`\theta = \phi` (initialised at :math:`\phi_0`),
the per-step cost :math:`L_t(x, \theta) = \beta\, \mathrm{KL}(P_{t,\theta}(\cdot\mid x) \,\|\, P_{t,\phi_0}(\cdot\mid
x)) = \beta \lVert m_t(x;\theta) - m_t(x;\phi_0)\rVert^2 / (2\sigma_t^2)` (closed form,
:func:`pydso.divergences.transition_kl`) and the terminal cost :math:`-r(x_H)`:

.. math::
    J(\theta) = \mathbb E_\theta\Big[\sum_{t<H} \beta\,\mathrm{KL}_t(x_t) - r(x_H)\Big]
    = \beta\,\mathrm{KL}(Q_\theta \,\|\, P_{\phi_0}) - \mathbb E_\theta[r(x_H)],

with :math:`Q_\theta, P_{\phi_0}` the path laws (same initial distribution). Over all path laws its minimiser is
:math:`Q^*(\text{path}) \propto P_{\phi_0}(\text{path})\, e^{r(x_H)/\beta}`, whose final marginal is the **tilted**
distribution :math:`p_0(x)e^{r(x)/\beta}/Z`, and :math:`\min J = -\beta\log Z`. Time enters through the chain's
time-varying transition and the problem's time-varying cost (the step index ``t``), never through the state.

Chains: :class:`DDPM` (an equinox noise-prediction network with a variance schedule, trained by
:func:`pretrain_ddpm`), or :class:`DenoisingChain` from any mean function. :class:`GaussianMixture` is the 2-D toy
data of the examples.

References: J. Ho, A. Jain and P. Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020; M. Uehara et
al., "Fine-tuning of continuous-time diffusion models as entropy-regularized control", 2024 (the tilted optimum);
H. J. Kappen, "Path integrals and symmetry breaking for optimal control theory", 2005.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._checks import check_key, check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..divergences import transition_kl
from ..engine import rollout
from ..systems import AbstractInitial, FiniteHorizon, GaussianChain, Normal, Problem
from ._contract import AbstractConstructedProblem

__all__ = [
    "AbstractDenoisingChain",
    "DenoisingChain",
    "DDPM",
    "GaussianMixture",
    "pretrain_ddpm",
    "tilted_weights",
    "GenerativeProblem",
    "GenerativeResult",
    "generative",
]


def _step_index(t: jax.Array) -> jax.Array:
    """The integer step of a chain time ``t`` (a float ``k * 1.0``)."""
    return jnp.round(jnp.asarray(t)).astype(jnp.int32)


# --------------------------------------------------------------------------------------------- chains
class AbstractDenoisingChain(eqx.Module):
    r"""A pretrained Gaussian sampling chain :math:`x_{t+1} = m_t(x_t;\phi) + \sigma_t\varepsilon`,
    :math:`t = 0..H-1`, from :math:`x_0 \sim` :attr:`initial`, with pretrained parameters :attr:`params`.

    Subclasses provide :attr:`params`, :attr:`horizon`, :attr:`initial`, :meth:`mean` and :meth:`scale` (the
    noise scale must not depend on the parameters: the KL to the pretrained chain is then a mean difference)."""

    params: eqx.AbstractVar[PyTree]
    horizon: eqx.AbstractVar[int]
    initial: eqx.AbstractVar[AbstractInitial]

    @abc.abstractmethod
    def mean(self, t: jax.Array, x: jax.Array, params: PyTree) -> jax.Array:
        """The mean :math:`m_t(x;\\phi)` of the step from time ``t`` (the step index, a float)."""

    @abc.abstractmethod
    def scale(self, t: jax.Array) -> jax.Array:
        """The noise standard deviation :math:`\\sigma_t` of the step from time ``t`` (scalar or ``(d,)``)."""

    def sample(self, params: PyTree | None = None, *, key: jax.Array, n: int) -> jax.Array:
        """``n`` samples :math:`x_H` of the chain with ``params`` (default: the pretrained ones), ``(n, d)``."""
        params = self.params if params is None else params
        return _sample_chain(self, params, check_key(key), check_positive_int(n, "n"))


@eqx.filter_jit
def _sample_chain(chain, params, key, n):
    def one(k):
        k0, ks = jax.random.split(k)
        x0 = chain.initial.sample(k0)

        def step(x, inp):
            t, kt = inp
            t = t.astype(x.dtype)
            return chain.mean(t, x, params) + chain.scale(t) * jax.random.normal(kt, x.shape, x.dtype), None

        ts = jnp.arange(chain.horizon)
        x, _ = jax.lax.scan(step, x0, (ts, jax.random.split(ks, chain.horizon)))
        return x

    return jax.vmap(one)(jax.random.split(key, n))


class DenoisingChain(AbstractDenoisingChain):
    r"""A denoising chain from callables: ``mean_fn(t, x, params)``, noise scales ``scale`` ``(H,)`` or ``(H, d)``
    (one per step), pretrained ``params``, and the initial distribution (default :math:`N(0, I)` in dimension
    ``dim``). Use it for hand-made chains (e.g. a linear-Gaussian one with a closed-form optimum); for a learned
    sampler use :class:`DDPM`.
    """

    mean_fn: Callable = eqx.field(static=True)
    scales: jax.Array
    params: PyTree
    initial: AbstractInitial
    horizon: int = eqx.field(static=True)

    def __init__(self, mean_fn: Callable, scale, params: PyTree, *, dim: int | None = None, initial=None):
        if not callable(mean_fn):
            raise ProblemError(f"mean_fn must be a callable mean_fn(t, x, params) -> x_next, got {type(mean_fn)}")
        s = np.asarray(scale, dtype=np.float64)
        if s.ndim not in (1, 2) or s.shape[0] == 0:
            raise ProblemError(f"scale must hold one noise scale per step, shape (H,) or (H, d), got {s.shape}")
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ProblemError("scale must be positive and finite at every step (a zero scale has no density)")
        if initial is None:
            if dim is None:
                raise ProblemError("pass dim (the state dimension) or an initial distribution")
            initial = Normal(np.zeros(check_positive_int(dim, "dim")), np.ones(dim))
        if not isinstance(initial, AbstractInitial):
            raise ProblemError(f"initial must be a pydso initial distribution, got {type(initial).__name__}")
        self.mean_fn = mean_fn
        self.scales = jnp.asarray(s)
        self.params = params
        self.initial = initial
        self.horizon = int(s.shape[0])

    def mean(self, t, x, params):
        return self.mean_fn(t, x, params)

    def scale(self, t):
        return self.scales[_step_index(t)]


class DDPM(AbstractDenoisingChain):
    r"""A DDPM sampler (Ho et al. 2020) with a noise-prediction network :math:`\varepsilon_\phi(x, k)`.

    The forward process :math:`q(x_k\mid x_{k-1}) = N(\sqrt{1-\beta_k}x_{k-1}, \beta_k I)`, :math:`k = 1..K`,
    :math:`\bar\alpha_k = \prod_{j\le k}(1-\beta_j)`, is reversed by
    :math:`x_{k-1} = \big(x_k - \tfrac{\beta_k}{\sqrt{1-\bar\alpha_k}}\varepsilon_\phi(x_k, k)\big)/\sqrt{1-\beta_k}
    + \sqrt{\beta_k}\,\varepsilon`. As a chain, step ``t`` (from time ``t``) is the reverse step :math:`k = K - t`,
    so :math:`x_0 \sim N(0, I)` is pure noise and :math:`x_K` the sample.

    ``params`` holds the network's arrays (``eqx.filter(network, eqx.is_inexact_array)``), ``static`` the rest;
    ``betas`` is the schedule ``(K,)``. Build one with :func:`pretrain_ddpm`. When not to use it: for data of more
    than a few dimensions (a small MLP is meant for 2-D toys and tests).
    """

    params: PyTree
    static: Any = eqx.field(static=True)
    betas: jax.Array
    initial: AbstractInitial
    horizon: int = eqx.field(static=True)

    def __init__(self, network: eqx.Module, betas, *, dim: int):
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or b.size == 0 or np.any(b <= 0) or np.any(b >= 1):
            raise ProblemError(f"betas must be a 1-D schedule with entries in (0, 1), got shape {b.shape}")
        self.params, self.static = eqx.partition(network, eqx.is_inexact_array)
        self.betas = jnp.asarray(b)
        self.initial = Normal(np.zeros(check_positive_int(dim, "dim")), np.ones(dim))
        self.horizon = int(b.size)

    def epsilon(self, x: jax.Array, k: jax.Array, params: PyTree) -> jax.Array:
        """The network's noise prediction :math:`\\varepsilon_\\phi(x, k)` at diffusion step ``k`` (1..K)."""
        net = eqx.combine(params, self.static)
        return net(_features(x, k, self.horizon))

    def _k(self, t):
        return self.horizon - _step_index(t)

    def mean(self, t, x, params):
        k = self._k(t)
        beta = self.betas[k - 1]
        abar = jnp.prod(jnp.where(jnp.arange(self.horizon, dtype=k.dtype) < k, 1.0 - self.betas, 1.0))
        eps = self.epsilon(x, k, params)
        return (x - beta / jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(1.0 - beta)

    def scale(self, t):
        return jnp.sqrt(self.betas[self._k(t) - 1])


def _features(x, k, K):
    """Network input: the state and a sinusoidal embedding of the diffusion time ``k / K``."""
    s = jnp.asarray(k, x.dtype) / K
    freqs = jnp.asarray([1.0, 2.0, 4.0, 8.0], x.dtype) * jnp.pi
    return jnp.concatenate([x, jnp.sin(freqs * s), jnp.cos(freqs * s)])


def cosine_schedule(steps: int, s: float = 0.008, max_beta: float = 0.5) -> np.ndarray:
    r"""The cosine variance schedule of Nichol and Dhariwal (2021): :math:`\bar\alpha_k = \cos^2\big(\tfrac{k/K + s}
    {1+s}\tfrac\pi2\big)/\cos^2\big(\tfrac{s}{1+s}\tfrac\pi2\big)`, :math:`\beta_k = 1 - \bar\alpha_k/\bar\alpha_{k-1}`,
    clipped to ``max_beta``."""
    k = np.arange(steps + 1) / steps
    f = np.cos((k + s) / (1 + s) * np.pi / 2) ** 2
    abar = f / f[0]
    return np.clip(1 - abar[1:] / abar[:-1], 1e-5, max_beta)


# --------------------------------------------------------------------------------------------- data
class GaussianMixture(eqx.Module):
    r"""A mixture :math:`\sum_i w_i N(\mu_i, s^2 I)` (the toy data of the examples).

    **Arguments:**

    - `means`: ``(c, d)`` component means; `std`: the common standard deviation :math:`s`;
      `weights`: ``(c,)`` (default uniform).
    """

    means: jax.Array
    std: float = eqx.field(static=True)
    weights: jax.Array

    def __init__(self, means, std: float, weights=None):
        mu = np.asarray(means, dtype=np.float64)
        if mu.ndim != 2 or mu.shape[0] == 0:
            raise ProblemError(f"means must have shape (components, d), got {mu.shape}")
        if not (isinstance(std, int | float) and np.isfinite(std) and std > 0):
            raise ProblemError(f"std must be a positive number, got {std!r}")
        w = np.full(mu.shape[0], 1.0 / mu.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (mu.shape[0],) or np.any(w < 0) or abs(w.sum() - 1) > 1e-8:
            raise ProblemError(f"weights must be {mu.shape[0]} non-negative numbers summing to 1, got {weights!r}")
        self.means, self.std, self.weights = jnp.asarray(mu), float(std), jnp.asarray(w)

    def sample(self, *, key: jax.Array, n: int) -> jax.Array:
        """``n`` samples, ``(n, d)``."""
        kc, kx = jax.random.split(check_key(key))
        c = jax.random.choice(kc, self.weights.shape[0], (check_positive_int(n, "n"),), p=self.weights)
        return self.means[c] + self.std * jax.random.normal(kx, (n, self.means.shape[1]), self.means.dtype)

    def component(self, x: jax.Array) -> jax.Array:
        """The most probable component of each sample ``x`` ``(n, d)`` (nearest mean), ``(n,)`` integers."""
        d2 = jnp.sum((jnp.asarray(x)[:, None, :] - self.means[None]) ** 2, axis=-1)
        return jnp.argmax(jnp.log(self.weights)[None] - d2 / (2 * self.std**2), axis=1)

    def component_weights(self, x: jax.Array, weights: jax.Array | None = None) -> np.ndarray:
        """The fraction of samples ``x`` in each component (with sample ``weights`` summing to 1, if given)."""
        c = np.asarray(self.component(x))
        w = np.full(c.shape[0], 1.0 / c.shape[0]) if weights is None else np.asarray(weights)
        return np.bincount(c, weights=w, minlength=self.means.shape[0])


def pretrain_ddpm(
    data,
    *,
    key: jax.Array,
    steps: int = 3000,
    horizon: int = 30,
    width: int = 64,
    depth: int = 2,
    batch: int = 256,
    learning_rate: float = 2e-3,
) -> DDPM:
    r"""Train a small :class:`DDPM` on ``data`` by the denoising loss of Ho et al. (2020),
    :math:`\mathbb E_{k, x, \varepsilon}\lVert \varepsilon - \varepsilon_\phi(\sqrt{\bar\alpha_k}x +
    \sqrt{1-\bar\alpha_k}\varepsilon, k)\rVert^2` (Adam with cosine decay), with the cosine schedule of ``horizon``
    steps. A few seconds for 2-D toy data on a CPU.

    This is how the *pretrained* model is made; tuning it afterwards is a DSO problem (:func:`generative`).

    **Arguments:**

    - `data`: training samples ``(N, d)``.
    - `key`: PRNG key (initialisation and minibatches).
    - `steps`, `batch`, `learning_rate`: Adam steps, minibatch size, peak learning rate.
    - `horizon`: the number of diffusion steps :math:`K`; `width`, `depth`: the MLP.

    **Returns:**

    The trained :class:`DDPM`.
    """
    x = np.asarray(data, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or not np.all(np.isfinite(x)):
        raise ProblemError(f"data must be finite training samples of shape (N, d) with N >= 2, got {x.shape}")
    key = check_key(key)
    steps = check_positive_int(steps, "steps")
    horizon = check_positive_int(horizon, "horizon")
    d = x.shape[1]
    k_init, k_train = jax.random.split(key)
    net = eqx.nn.MLP(
        d + 8, d, check_positive_int(width, "width"), check_positive_int(depth, "depth"), jax.nn.silu, key=k_init
    )
    model = DDPM(net, cosine_schedule(horizon), dim=d)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05))
    params = _train(model, optimizer, jnp.asarray(x), k_train, steps, check_positive_int(batch, "batch"))
    return DDPM(eqx.combine(params, model.static), model.betas, dim=d)


@eqx.filter_jit
def _train(model, optimizer, data, key, steps, batch):
    abar = jnp.cumprod(1.0 - model.betas)

    def loss(params, k):
        ki, kk, ke = jax.random.split(k, 3)
        x0 = data[jax.random.randint(ki, (batch,), 0, data.shape[0])]
        ks = jax.random.randint(kk, (batch,), 1, model.horizon + 1)
        eps = jax.random.normal(ke, x0.shape, x0.dtype)
        a = abar[ks - 1][:, None]
        xk = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
        pred = jax.vmap(model.epsilon, in_axes=(0, 0, None))(xk, ks, params)
        return jnp.mean(jnp.sum((pred - eps) ** 2, axis=1))

    def step(carry, k):
        params, state = carry
        g = jax.grad(loss)(params, k)
        updates, state = optimizer.update(g, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (model.params, optimizer.init(model.params)), jax.random.split(key, steps))
    return params


def tilted_weights(rewards, beta: float) -> np.ndarray:
    r"""Self-normalised importance weights :math:`e^{r_i/\beta}/\sum_j e^{r_j/\beta}` that turn samples of the
    pretrained model into samples of the tilted optimum :math:`p_0 e^{r/\beta}/Z` (reference for a tuned model)."""
    r = np.asarray(rewards, dtype=np.float64) / _check_beta(beta)
    w = np.exp(r - r.max())
    return w / w.sum()


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, int | float | np.floating) or not np.isfinite(beta) or beta <= 0:
        raise ProblemError(f"beta must be a positive finite number (the weight of the KL term), got {beta!r}")
    return float(beta)


# --------------------------------------------------------------------------------------------- problem
@dataclass
class GenerativeResult:
    """The report of a tuning problem at ``theta`` (:meth:`GenerativeProblem.result`).

    **Attributes:**

    - ``theta``: the tuned parameters.
    - ``reward``, ``reward_stderr``: Monte-Carlo mean reward :math:`\\mathbb E_\\theta[r(x_H)]` and its s.e.
    - ``kl``, ``kl_stderr``: Monte-Carlo path KL :math:`\\mathrm{KL}(Q_\\theta\\|P_{\\phi_0}) =
      \\mathbb E\\sum_t \\mathrm{KL}_t` and its s.e.
    - ``objective``: :math:`\\beta\\,\\mathrm{KL} - \\text{reward}`.
    - ``samples``: the final states ``(n, d)``.
    - ``info``: how ``theta`` was obtained.
    """

    theta: PyTree
    reward: float
    reward_stderr: float
    kl: float
    kl_stderr: float
    objective: float
    samples: np.ndarray
    info: dict = field(default_factory=dict)


class GenerativeProblem(AbstractConstructedProblem):
    r"""A KL-regularised tuning problem (module docstring): :attr:`problem` is the time-varying
    :class:`pydso.Problem` of the chain with parameters ``theta``, cost :math:`\beta\,\mathrm{KL}_t`, terminal cost
    :math:`-r`, :class:`~pydso.FiniteHorizon` setting. Solve it with
    ``pydso.minimize(p.problem, p.theta0, key=key, method=pydso.Gradient(...))`` (pathwise by default; the chain
    has a density, so the score estimator applies too).
    """

    dso: Problem
    theta0: PyTree
    chain: AbstractDenoisingChain
    reward: Callable = eqx.field(static=True)
    beta: float = eqx.field(static=True)

    @property
    def problem(self) -> Problem:
        return self.dso

    def sample(self, theta: PyTree, *, key: jax.Array, n: int) -> jax.Array:
        """``n`` samples of the tuned chain, ``(n, d)``."""
        return self.chain.sample(theta, key=key, n=n)

    def result(self, theta: PyTree, *, key: jax.Array | None = None, n: int = 1024, **info) -> GenerativeResult:
        """Reward, path KL and samples of ``n`` fresh episodes (``key``, default ``jax.random.key(0)``)."""
        key = jax.random.key(0) if key is None else key
        traj = rollout(self.dso, theta, key=check_key(key), n=check_positive_int(n, "n"), progress=False)
        r = -np.asarray(traj.terminal_costs)
        kl = np.asarray(traj.costs).sum(axis=1) / self.beta
        se = lambda v: float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0  # noqa: E731
        return GenerativeResult(
            theta=theta,
            reward=float(r.mean()),
            reward_stderr=se(r),
            kl=float(kl.mean()),
            kl_stderr=se(kl),
            objective=float(self.beta * kl.mean() - r.mean()),
            samples=np.asarray(traj.states[:, -1]),
            info=dict(info),
        )


def generative(
    chain: AbstractDenoisingChain,
    reward: Callable,
    *,
    beta: float,
    theta0: PyTree | None = None,
    name: str = "generative",
) -> GenerativeProblem:
    r"""Build the KL-regularised tuning problem of a pretrained chain (module docstring).

    **Arguments:**

    - `chain`: the pretrained chain, an :class:`AbstractDenoisingChain` (:class:`DDPM`, :class:`DenoisingChain`).
    - `reward`: :math:`r(x)`, a callable of one sample ``(d,)`` returning a scalar (JAX-traceable).
    - `beta`: :math:`\beta > 0`, the weight of the KL to the pretrained chain (small: follow the reward; large:
      stay at the pretrained model).
    - `theta0`: initial parameters (default: the pretrained ``chain.params``; the KL reference is always those).

    **Returns:**

    A :class:`GenerativeProblem`. Raises :class:`pydso.ProblemError` naming the argument for a non-positive
    ``beta``, a reward that is not a scalar function of a sample, or a chain of the wrong type.

    When not to use it: when the reward is known only on samples (no gradient): then use the score estimator
    (``pydso.Gradient(estimator=pydso.Score())``) on the same problem.
    """
    if not isinstance(chain, AbstractDenoisingChain):
        raise ProblemError(
            f"chain must be a pydso.problems.generative.AbstractDenoisingChain (DDPM, DenoisingChain), got "
            f"{type(chain).__name__}"
        )
    beta = _check_beta(beta)
    if not callable(reward):
        raise ProblemError(f"reward must be a callable reward(x) -> scalar, got {type(reward).__name__}")
    x = jax.eval_shape(chain.initial.sample, jax.random.key(0))
    try:
        out = jax.eval_shape(reward, x)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ProblemError(f"reward cannot be evaluated on a sample of shape {x.shape}: {type(e).__name__}: {e}") from e
    if getattr(out, "shape", None) != ():
        raise ProblemError(
            f"reward must return a scalar for one sample of shape {x.shape}, got shape {getattr(out, 'shape', out)}; "
            "sum or index it (the reward of a batch is computed by vmap)"
        )
    reference = chain.params
    theta0 = reference if theta0 is None else theta0
    system = GaussianChain(
        lambda t, x, th: chain.mean(t, x, th), scale=lambda t, x, th: chain.scale(t), time_varying=True
    )

    def cost(t, x, theta):
        return beta * transition_kl(system, theta, system, reference, t, x)

    def terminal_cost(t, x, theta):
        return -reward(x)

    problem = Problem(
        system,
        cost,
        FiniteHorizon(horizon=chain.horizon),
        chain.initial,
        terminal_cost,
        name=name,
        theta_example=theta0,
        time_varying=True,
    )
    return GenerativeProblem(dso=problem, theta0=theta0, chain=chain, reward=reward, beta=beta)
