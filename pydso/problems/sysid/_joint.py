"""Joint fits over several experiments: :class:`JointSysIdProblem` (shared and per-experiment parameters, the
per-experiment residuals vmapped over stacked data), its outcome :class:`JointSysIdResult` and :func:`fit_joint`.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import SysIdError
from ._losses import GaussianNLL
from ._problem import AbstractSysIdProblem, Simulator, SysIdProblem, SysIdResult, fit_metrics
from ._transforms import ParamSpace


@dataclasses.dataclass
class JointSysIdResult:
    """Outcome of :func:`fit_joint`: one least-squares fit over all experiments.

    The *joint vector* is ``names``: the shared scalar parameters first (``shared_names``), then for each
    experiment ``i`` its own scalar parameters named ``'{name}@{i}'`` (``local_names`` in model order);
    ``estimate``/``stderr``/``ci_low``/``ci_high``/``cov`` are over that vector (physical units; the covariance
    is :math:`\\hat\\sigma^2 (J^\\top J)^{-1}` of the stacked simulation residuals of all experiments over the
    shared, per-experiment and initial-state unknowns, by the delta method; 95% intervals with Student's t on
    ``dof = n_samples - n_unknowns``). ``sigma2`` and ``noise_std`` are pooled over experiments.

    Per experiment: ``per_experiment[i]`` (also :meth:`experiment`) is a :class:`SysIdResult` view with all of
    the model's parameters (the shared ones with the joint estimate and interval), its initial states,
    simulated outputs and metrics; ``rmse``/``nrmse``/``fit_percent`` are ``(experiment, output)``;
    ``experiment_cost[i]`` is ``0.5 * sum r_i^2`` of its scaled simulation residuals.
    """

    experiments: list
    names: list
    shared_names: list
    local_names: list
    estimate: np.ndarray
    stderr: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    cov: np.ndarray
    per_experiment: list
    sigma2: float
    noise_std: np.ndarray
    rmse: np.ndarray
    nrmse: np.ndarray
    fit_percent: np.ndarray
    experiment_cost: np.ndarray
    cost: float
    n_steps: int
    converged: bool
    message: str
    loss: str
    n_samples: int
    dof: int
    stop_reason: str = ""
    grad_cosine: float = float("nan")
    warnings: tuple = ()
    multistart: object = None

    def experiment(self, i: int | str) -> SysIdResult:
        """The :class:`SysIdResult` view of experiment ``i`` (index or id)."""
        return self.per_experiment[self.experiments.index(i) if isinstance(i, str) else i]

    def shared_estimates(self) -> dict:
        """``{name: estimate}`` of the shared scalar parameters."""
        ns = len(self.shared_names)
        return {n: float(v) for n, v in zip(self.shared_names, self.estimate[:ns], strict=True)}

    def local_estimates(self) -> dict:
        """``{name: array (experiment,)}`` of the per-experiment scalar parameters."""
        ns, nl = len(self.shared_names), len(self.local_names)
        loc = np.asarray(self.estimate[ns:]).reshape(len(self.experiments), nl)
        return {n: loc[:, j].copy() for j, n in enumerate(self.local_names)}

    def as_dict(self) -> dict:
        return {"shared": self.shared_estimates(), "local": self.local_estimates()}

    def to_dataset(self):
        """The results as an ``xarray.Dataset`` in the layout of :func:`pydso.problems.sysid.fit_many`.

        ``estimate``/``stderr``/``ci_low``/``ci_high`` are ``(experiment, parameter)`` over *all* model
        parameters; a shared parameter has the same (joint) value and interval in every row and is flagged by
        the boolean coordinate ``shared(parameter)``. Per experiment: ``rmse``/``nrmse``/``fit_percent``
        ``(experiment, output_dim)``, ``cost`` (its share of the joint cost), ``status``, ``error``, ``n_steps``
        and ``wall_s`` (NaN here: the joint fit is one solve). ``cov(joint_row, joint_col)`` is the covariance
        over the joint vector (coordinates: :attr:`names`). Attributes: ``joint`` (True), ``shared`` (scalar
        names), ``sigma2``, ``dof``, ``n_samples``, ``loss``, ``converged``, ``message``, ``total_cost``.
        """
        import xarray as xr

        per = self.per_experiment
        names = list(per[0].names)
        E = len(per)
        data = {
            k: (("experiment", "parameter"), np.stack([np.asarray(getattr(r, k), float) for r in per]))
            for k in ("estimate", "stderr", "ci_low", "ci_high")
        }
        for k in ("rmse", "nrmse", "fit_percent"):
            data[k] = (("experiment", "output_dim"), np.asarray(getattr(self, k), float))
        status = "ok" if self.converged else "not_converged"
        data.update(
            cost=("experiment", np.asarray(self.experiment_cost, float)),
            n_steps=("experiment", np.full(E, self.n_steps, dtype=np.int64)),
            wall_s=("experiment", np.full(E, np.nan)),
            status=("experiment", np.array([status] * E, dtype=str)),
            error=("experiment", np.array(["" if self.converged else self.message] * E, dtype=str)),
            cov=(("joint_row", "joint_col"), np.asarray(self.cov, float)),
        )
        return xr.Dataset(
            data,
            coords={
                "experiment": np.array([str(e) for e in self.experiments], dtype=str),
                "parameter": np.array(names, dtype=str),
                "shared": ("parameter", np.array([n in self.shared_names for n in names], dtype=bool)),
                "joint_row": np.array(self.names, dtype=str),
                "joint_col": np.array(self.names, dtype=str),
            },
            attrs={
                "joint": True,
                "shared": list(self.shared_names),
                "sigma2": float(self.sigma2),
                "dof": int(self.dof),
                "n_samples": int(self.n_samples),
                "loss": str(self.loss),
                "converged": bool(self.converged),
                "message": str(self.message),
                "total_cost": float(self.cost),
            },
        )

    def summary(self) -> str:
        ns = len(self.shared_names)
        lines = [f"joint fit of {len(self.experiments)} experiment(s)", "shared parameters:"]
        lines.append(f"{'parameter':>14} {'estimate':>13} {'stderr':>11} {'95% CI':>27}")
        for j in range(ns):
            lines.append(
                f"{self.names[j]:>14} {self.estimate[j]:13.6g} {self.stderr[j]:11.3g}   "
                f"[{self.ci_low[j]:11.5g}, {self.ci_high[j]:11.5g}]"
            )
        if self.local_names:
            lines.append("per-experiment parameters (estimate +- stderr):")
            head = f"{'experiment':>14}" + "".join(f" {n:>22}" for n in self.local_names)
            lines.append(head)
            for i, r in enumerate(self.per_experiment):
                d = dict(zip(r.names, zip(r.estimate, r.stderr, strict=True), strict=True))
                cells = "".join(f" {d[n][0]:12.6g} +- {d[n][1]:6.2g}" for n in self.local_names)
                lines.append(f"{str(self.experiments[i])[-14:]:>14}{cells}")
        lines.append(
            f"loss={self.loss} converged={self.converged} steps={self.n_steps} sigma2={self.sigma2:.4g} "
            f"NRMSE={np.array2string(self.nrmse.mean(axis=0), precision=4)} (mean over experiments)"
        )
        return "\n".join(lines)


class Labels(tuple):
    """A tuple of labels (experiment ids) that compares equal to any other :class:`Labels` and hashes to a constant:
    labels never enter a computation, so problems that differ only in them share compiled code."""

    __slots__ = ()

    def __eq__(self, other):
        return isinstance(other, Labels)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(Labels)


class Sharing(eqx.Module):
    """How the joint vector's parameter block maps to each experiment's: ``J`` experiments, the scalar parameters
    at ``shared_idx`` (model order) common to all, those at ``local_idx`` per experiment."""

    space: ParamSpace = eqx.field(static=True)
    J: int = eqx.field(static=True)
    shared_idx: tuple = eqx.field(static=True)
    local_idx: tuple = eqx.field(static=True)
    n_x0: int = eqx.field(static=True)  # per experiment
    n_seg: int = eqx.field(static=True)  # per experiment

    @property
    def n_shared(self) -> int:
        return len(self.shared_idx)

    @property
    def n_local(self) -> int:
        return len(self.local_idx)

    @property
    def n_theta(self) -> int:
        return self.n_shared + self.J * self.n_local

    def theta_blocks(self, w):
        """(experiment, scalar parameter in model order), unconstrained, from the joint vector's first block."""
        J, ns, nl = self.J, self.n_shared, self.n_local
        inv_perm = np.argsort(np.concatenate([np.asarray(self.shared_idx, int), np.asarray(self.local_idx, int)]))
        th = jnp.concatenate([jnp.broadcast_to(w[:ns], (J, ns)), w[ns : ns + J * nl].reshape(J, nl)], axis=1)
        return th[:, inv_perm]

    def per_experiment(self, w):
        """(experiment, per-experiment vector) from the joint vector ``w`` (its core prefix, or the core plus
        segment states; trailing log noise levels are not part of it)."""
        J = self.J
        parts = [self.theta_blocks(w)]
        off = self.n_theta
        parts.append(w[off : off + J * self.n_x0].reshape(J, self.n_x0))
        off += J * self.n_x0
        if self.n_seg and w.shape[0] >= off + J * self.n_seg:
            parts.append(w[off : off + J * self.n_seg].reshape(J, self.n_seg))
        return jnp.concatenate(parts, axis=1)

    def joint_index(self, i):
        """Positions in the joint parameter block of experiment ``i``'s scalar parameters (model order)."""
        pos = np.empty(self.space.size, dtype=int)
        pos[list(self.shared_idx)] = np.arange(self.n_shared)
        pos[list(self.local_idx)] = self.n_shared + i * self.n_local + np.arange(self.n_local)
        return pos

    def physical_flat(self, zt):
        phys = jax.vmap(self.space.physical_flat)(self.theta_blocks(zt))
        return jnp.concatenate([phys[0, list(self.shared_idx)], phys[:, list(self.local_idx)].ravel()])


class JointSimulator(eqx.Module):
    """Free-run simulation of all experiments at the joint core vector (the stacked :class:`Simulator` vmapped)."""

    base: Simulator  # every array leaf with a leading experiment axis
    sharing: Sharing

    @property
    def model(self):
        return self.base.model

    @property
    def space(self):
        return self.base.space

    @property
    def scale(self):
        return self.base.scale[0]

    @property
    def n_theta(self) -> int:
        return self.sharing.n_theta

    def outputs(self, z):
        """Simulated outputs (experiment, episode, time, output)."""
        return eqx.filter_vmap(lambda s, zz: s.outputs(zz))(self.base, self.sharing.per_experiment(z))

    def residuals(self, z):
        return eqx.filter_vmap(lambda s, zz: s.residuals(zz))(self.base, self.sharing.per_experiment(z)).ravel()

    def physical_flat(self, zt):
        return self.sharing.physical_flat(zt)


class JointSysIdProblem(AbstractSysIdProblem):
    """One identification problem over several experiments with shared and per-experiment parameters.

    Built from one :class:`SysIdProblem` per experiment (same model, loss and options); these must have equal
    shapes — the same number of episodes, samples and channels (shorter or ragged records are refused: trim
    or split them first; padding with masks is not implemented). The unconstrained vector ``theta`` is
    ``[shared | local (experiment, n_local) | initial states (experiment, ...) | segment states | log noise]``;
    :meth:`residuals` maps it to every experiment's own vector and vmaps the per-experiment residual function
    over the stacked problems (leading experiment axis), so every loss, transform, method and the covariance
    code of :class:`SysIdProblem` apply unchanged. Output scaling is pooled over experiments (default: the
    standard deviation of each output over all experiments) so residuals are commensurate.
    """

    base: SysIdProblem  # the per-experiment problems stacked: every array leaf has a leading experiment axis
    sharing: Sharing
    theta0: jax.Array
    experiment_ids: Labels = eqx.field(static=True)
    shared_names: tuple = eqx.field(static=True)
    local_names: tuple = eqx.field(static=True)

    def __init__(
        self,
        model,
        datasets,
        *,
        shared=(),
        loss="simulation",
        params=None,
        x0=None,
        output_scale=None,
        transforms=None,
        experiment_ids=None,
    ):
        import xarray as xr

        if isinstance(datasets, xr.Dataset):
            n = int(datasets.sizes.get("episode", 1))
            if "episode" in datasets.dims:
                datasets = [datasets.isel(episode=[e]) for e in range(n)]
                ids = [f"episode{e}" for e in range(n)]
            else:
                datasets, ids = [datasets], ["experiment0"]
        else:
            datasets = list(datasets)
            ids = [f"experiment{i}" for i in range(len(datasets))]
        if not datasets:
            raise SysIdError("fit_joint needs at least one experiment (dataset)")
        if experiment_ids is not None:
            ids = [str(i) for i in experiment_ids]
            if len(ids) != len(datasets) or len(set(ids)) != len(ids):
                raise SysIdError(
                    f"experiment_ids must be {len(datasets)} unique ids (one per experiment), got {experiment_ids!r}"
                )
        self.experiment_ids = Labels(ids)
        probs = []
        for i, ds in enumerate(datasets):
            try:
                probs.append(
                    SysIdProblem(
                        model,
                        ds,
                        loss=loss,
                        params=params,
                        x0=x0,
                        output_scale=1.0 if output_scale is None else output_scale,
                        transforms=transforms,
                    )
                )
            except SysIdError as e:
                raise SysIdError(f"experiment {ids[i]!r}: {e}") from e
        first = probs[0]

        def dims(p):
            return (p.n_episodes, p.n_samples, p.n_outputs, p.n_inputs)

        def shapes(p):
            return [np.shape(a) for a in jax.tree.leaves(p)]

        for i, p in enumerate(probs[1:], 1):
            if dims(p) != dims(first) or shapes(p) != shapes(first):
                (E, T, ny, nu), (E0, T0, ny0, nu0) = dims(p), dims(first)
                raise SysIdError(
                    "joint fits need experiments of equal shape (they are stacked and vmapped; padding is not "
                    f"implemented): experiment {ids[i]!r} has {E} episode(s) x {T} samples x {ny} "
                    f"output(s) x {nu} input(s), experiment {ids[0]!r} has {E0} x {T0} x {ny0} x {nu0}; trim or "
                    "split the records to one length"
                )
        if output_scale is None:
            ally = np.concatenate([np.asarray(p.sim.y).reshape(-1, p.n_outputs) for p in probs])
            sc = np.std(ally, axis=0)
            sc = jnp.asarray(np.where(sc > 0, sc, 1.0))
            probs = [eqx.tree_at(lambda q: q.sim.scale, p, sc) for p in probs]

        # shared / local split of the scalar parameters (model order)
        if isinstance(shared, str):
            shared = [s.strip() for s in shared.split(",") if s.strip()]
        sp = first.space
        leaf_idx, i0 = {}, 0
        for n, s in zip(sp.leaf_names, sp.sizes, strict=True):
            leaf_idx[n] = list(range(i0, i0 + s))
            i0 += s
        chosen: set[int] = set()
        for s in shared:
            if s in leaf_idx:
                chosen.update(leaf_idx[s])
            elif s in sp.names:
                chosen.add(sp.names.index(s))
            else:
                avail = list(sp.leaf_names) if sp.leaf_names == sp.names else sorted(set(sp.leaf_names) | set(sp.names))
                raise SysIdError(f"unknown shared parameter {s!r}: the model's parameters are {avail}")
        shared_idx = tuple(sorted(chosen))
        local_idx = tuple(i for i in range(sp.size) if i not in chosen)
        J = len(probs)
        self.sharing = Sharing(
            space=sp, J=J, shared_idx=shared_idx, local_idx=local_idx, n_x0=first.n_x0, n_seg=first.n_seg
        )
        self.shared_names = tuple(sp.names[i] for i in shared_idx)
        self.local_names = tuple(sp.names[i] for i in local_idx)

        nth, nx0, nseg = first.n_theta, first.n_x0, first.n_seg
        Z = np.stack([np.asarray(p.theta0) for p in probs])  # (J, per-experiment vector)
        parts = [Z[0, :nth][list(shared_idx)], Z[:, :nth][:, list(local_idx)].ravel()]
        parts += [Z[:, nth : nth + nx0].ravel(), Z[:, nth + nx0 : nth + nx0 + nseg].ravel()]
        if isinstance(first.loss, GaussianNLL):
            parts.append(np.zeros(first.n_outputs))  # one log noise std per output, shared by all experiments
        self.theta0 = jnp.asarray(np.concatenate(parts))
        self.base = jax.tree.map(lambda *xs: jnp.stack(xs), *probs)

    # ---- sizes and pieces
    @property
    def loss(self):
        return self.base.loss

    @property
    def sim(self) -> JointSimulator:
        return JointSimulator(base=self.base.sim, sharing=self.sharing)

    @property
    def n_theta(self) -> int:
        return self.sharing.n_theta

    @property
    def n_x0(self) -> int:
        return self.sharing.J * self.sharing.n_x0

    @property
    def names(self) -> list:
        """The joint scalar parameters: the shared ones, then ``'{name}@{i}'`` per experiment."""
        return list(self.shared_names) + [f"{n}@{i}" for i in range(self.sharing.J) for n in self.local_names]

    def residuals(self, theta):
        """Stacked residual vectors of all experiments (experiment-major) at the joint vector ``theta``."""
        return eqx.filter_vmap(lambda p, zz: p.residuals(zz))(self.base, self.sharing.per_experiment(theta)).ravel()

    def result(
        self, theta, *, n_steps: int = 0, code: int | None = None, covariance: str = "white"
    ) -> JointSysIdResult:
        """The joint report at the joint unconstrained vector ``theta`` (see :meth:`SysIdProblem.result`; the
        covariance is the white-residual one: ``covariance`` other than ``'white'``/``'auto'`` is refused)."""
        if covariance not in ("white", "auto"):
            raise SysIdError(f"joint fits support covariance='white' only, got {covariance!r}")
        s = self._summary(theta, n_steps, code)
        z, est, se, q, cov = s["z"], s["estimate"], s["stderr"], s["q"], s["cov"]
        J, E, nx = self.sharing.J, self.base.n_episodes, self.model.n_states
        zj = np.asarray(self.sharing.per_experiment(z[: self.n_core]))
        r = s["r"].reshape(J, -1)
        y = np.asarray(self.base.sim.y)
        per, mets = [], []
        for i in range(J):
            idx = self.sharing.joint_index(i)
            theta_i = self.space.unflatten(jnp.asarray(zj[i, : self.space.size]))
            x0 = zj[i, self.space.size :].reshape(E, nx) if self.model.estimate_x0 else np.asarray(self.base.sim.x0[i])
            m = fit_metrics(s["ys"][i], y[i])
            mets.append(m)
            per.append(
                SysIdResult(
                    names=list(self.space.names),
                    estimate=est[idx],
                    stderr=se[idx],
                    ci_low=est[idx] - q * se[idx],
                    ci_high=est[idx] + q * se[idx],
                    cov=cov[np.ix_(idx, idx)],
                    params=jax.tree.map(lambda v: np.asarray(v) if eqx.is_array(v) else v, theta_i),
                    x0=np.asarray(x0),
                    sigma2=s["sigma2"],
                    rmse=m[0],
                    nrmse=m[1],
                    fit_percent=m[2],
                    cost=0.5 * float(r[i] @ r[i]),
                    n_steps=s["n_steps"],
                    converged=s["converged"],
                    message=s["message"],
                    loss=self.loss.name,
                    y_sim=s["ys"][i],
                    n_samples=s["n_samples"],
                    dof=s["dof"],
                    noise_std=s["noise_std"],
                    model=self.model,
                )
            )
        return JointSysIdResult(
            experiments=list(self.experiment_ids),
            names=self.names,
            shared_names=list(self.shared_names),
            local_names=list(self.local_names),
            estimate=est,
            stderr=se,
            ci_low=est - q * se,
            ci_high=est + q * se,
            cov=cov,
            per_experiment=per,
            sigma2=s["sigma2"],
            noise_std=s["noise_std"],
            rmse=np.stack([m[0] for m in mets]),
            nrmse=np.stack([m[1] for m in mets]),
            fit_percent=np.stack([m[2] for m in mets]),
            experiment_cost=np.array([p.cost for p in per]),
            cost=s["cost"],
            n_steps=s["n_steps"],
            converged=s["converged"],
            message=s["message"],
            loss=self.loss.name,
            n_samples=s["n_samples"],
            dof=s["dof"],
        )


def fit_joint(
    model,
    datasets,
    *,
    shared=(),
    loss="simulation",
    params=None,
    x0=None,
    output_scale=None,
    transforms=None,
    experiment_ids=None,
    solver: str = "lm",
    **solver_options,
) -> JointSysIdResult:
    """Identify ``model`` jointly from several experiments: parameters named in ``shared`` are common to all
    experiments, the others (and the initial states, if estimated) are per experiment.

    ``datasets``: a list of pydso datasets (each one experiment; its episodes share that experiment's
    parameters, with one initial state each) or one dataset (each episode one experiment). All experiments
    must have the same shape (episodes x samples x channels): they are stacked and the per-experiment residual
    function is vmapped over them — one least-squares problem, solved by the same Levenberg–Marquardt machinery
    as :func:`fit`. ``shared``: leaf names (``'k3'``; an array leaf shares all its elements) or scalar names
    (``'A[0]'``), or a comma-separated string; an unknown name raises :class:`SysIdError`. ``experiment_ids``
    names the experiments. Other arguments as for :func:`fit` (the initial guesses are the same for every
    experiment; ``output_scale`` defaults to the pooled standard deviation of each output).
    """
    prob = JointSysIdProblem(
        model,
        datasets,
        shared=shared,
        loss=loss,
        params=params,
        x0=x0,
        output_scale=output_scale,
        transforms=transforms,
        experiment_ids=experiment_ids,
    )
    return prob.fit(solver=solver, **solver_options)
