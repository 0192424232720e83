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
from ._problem import SysIdProblem, SysIdResult, _metrics


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


class JointSysIdProblem(SysIdProblem):
    """One identification problem over several experiments with shared and per-experiment parameters.

    Built from one :class:`SysIdProblem` per experiment (same model, loss and options); these must have equal
    shapes — the same number of episodes, samples and channels (shorter or ragged records are refused: trim
    or split them first; padding with masks is not implemented). The unconstrained vector is
    ``[shared | local (experiment, n_local) | initial states (experiment, ...) | segment states | log noise]``;
    :meth:`residuals` maps it to every experiment's own vector and ``jax.vmap``-s the per-experiment residual
    function over the stacked data (leading experiment axis), so every loss, transform, solver and the
    covariance code of :class:`SysIdProblem` apply unchanged. Output scaling is pooled over experiments
    (default: the standard deviation of each output over all experiments) so residuals are commensurate.
    """

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
        self.experiment_ids = ids
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
        base = probs[0]
        for i, p in enumerate(probs[1:], 1):
            if (p.E, p.T, p.ny, p.nu) != (base.E, base.T, base.ny, base.nu) or any(
                p.arrays[k].shape != v.shape for k, v in base.arrays.items()
            ):
                raise SysIdError(
                    "joint fits need experiments of equal shape (they are stacked and vmapped; padding is not "
                    f"implemented): experiment {ids[i]!r} has {p.E} episode(s) x {p.T} samples x {p.ny} "
                    f"output(s) x {p.nu} input(s), experiment {ids[0]!r} has {base.E} x {base.T} x {base.ny} x "
                    f"{base.nu}; trim or split the records to one length"
                )
        if output_scale is None:
            ally = np.concatenate([p.y_np.reshape(-1, p.ny) for p in probs])
            sc = np.std(ally, axis=0)
            sc = jnp.asarray(np.where(sc > 0, sc, 1.0))
            for p in probs:
                p.arrays["scale"] = sc
        self.base, self.J = base, len(probs)
        self.model, self.loss, self.space = model, base.loss, base.space
        self.E, self.T, self.ny, self.nu, self.dt = base.E, base.T, base.ny, base.nu, base.dt
        self.y_np = np.stack([p.y_np for p in probs])

        # shared / local split of the scalar parameters (model order)
        if isinstance(shared, str):
            shared = [s.strip() for s in shared.split(",") if s.strip()]
        sp = self.space
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
                avail = sp.leaf_names if sp.leaf_names == sp.names else sorted(set(sp.leaf_names) | set(sp.names))
                raise SysIdError(f"unknown shared parameter {s!r}: the model's parameters are {avail}")
        self.shared_idx = np.array(sorted(chosen), dtype=int)
        self.local_idx = np.array([i for i in range(sp.size) if i not in chosen], dtype=int)
        self._inv_perm = np.argsort(np.concatenate([self.shared_idx, self.local_idx]))
        self.shared_names = [sp.names[i] for i in self.shared_idx]
        self.local_names = [sp.names[i] for i in self.local_idx]
        ns, nl, J = len(self.shared_idx), len(self.local_idx), self.J
        self.n_shared, self.n_local = ns, nl
        self.n_theta = ns + J * nl
        self.n_x0 = J * base.n_x0
        self.n_seg = J * getattr(base, "n_seg", 0)
        self.names = self.shared_names + [f"{n}@{i}" for i in range(J) for n in self.local_names]

        nth, nx0, nseg = base.n_theta, base.n_x0, getattr(base, "n_seg", 0)
        Z = np.stack([np.asarray(p.z0) for p in probs])  # (J, per-experiment vector)
        parts = [Z[0, :nth][self.shared_idx], Z[:, :nth][:, self.local_idx].ravel()]
        parts += [Z[:, nth : nth + nx0].ravel(), Z[:, nth + nx0 : nth + nx0 + nseg].ravel()]
        if isinstance(self.loss, GaussianNLL):
            parts.append(np.zeros(self.ny))  # one log noise std per output, shared by all experiments
        self.z0 = jnp.asarray(np.concatenate(parts))
        self.arrays = {k: jnp.stack([p.arrays[k] for p in probs]) for k in base.arrays}
        self.problems = probs

    # ---- the joint vector and the per-experiment vectors
    def _per_experiment(self, w):
        """(experiment, per-experiment vector) from the joint vector ``w`` (its core prefix, or the core plus
        segment states; trailing log noise levels are not part of it)."""
        J, ns, nl = self.J, self.n_shared, self.n_local
        parts = [self._theta_blocks(w)]
        off, nx0, nseg = ns + J * nl, self.base.n_x0, getattr(self.base, "n_seg", 0)
        parts.append(w[off : off + J * nx0].reshape(J, nx0))
        off += J * nx0
        if nseg and w.shape[0] >= off + J * nseg:
            parts.append(w[off : off + J * nseg].reshape(J, nseg))
        return jnp.concatenate(parts, axis=1)

    def _theta_blocks(self, w):
        """(experiment, scalar parameter in model order), unconstrained, from the joint vector's first block."""
        J, ns, nl = self.J, self.n_shared, self.n_local
        th = jnp.concatenate([jnp.broadcast_to(w[:ns], (J, ns)), w[ns : ns + J * nl].reshape(J, nl)], axis=1)
        return th[:, self._inv_perm]

    def _joint_index(self, i):
        """Positions in the joint parameter block of experiment ``i``'s scalar parameters (model order)."""
        pos = np.empty(self.space.size, dtype=int)
        pos[self.shared_idx] = np.arange(self.n_shared)
        pos[self.local_idx] = self.n_shared + i * self.n_local + np.arange(self.n_local)
        return pos

    def _physical_flat(self, zt):
        phys = jax.vmap(self.space.physical_flat)(self._theta_blocks(zt))
        return jnp.concatenate([phys[0, self.shared_idx], phys[:, self.local_idx].ravel()])

    def simulate_outputs(self, z, arrays):
        """Simulated outputs (experiment, episode, time, output)."""
        return jax.vmap(self.base.simulate_outputs)(self._per_experiment(z), arrays)

    def simulation_residuals(self, z, arrays):
        return jax.vmap(self.base.simulation_residuals)(self._per_experiment(z), arrays).ravel()

    def residuals(self, z, arrays=None):
        """Stacked residual vectors of all experiments (experiment-major) at the joint vector ``z``."""
        arrays = self.arrays if arrays is None else arrays
        return jax.vmap(self.base.residuals)(self._per_experiment(z), arrays).ravel()

    def _key(self, solver, extra):
        return ("joint", self.base._key(solver, extra), self.J, tuple(self.shared_idx.tolist()), self.z0.shape)

    def _post_key(self):
        return ("joint", *self.base._post_key(), self.J, tuple(self.shared_idx.tolist()))

    def fit(
        self,
        *,
        solver: str = "lm",
        rtol: float = 1e-10,
        atol: float = 1e-10,
        max_steps: int = 500,
        optimizer=None,
        steps: int = 2000,
        z0=None,
    ) -> JointSysIdResult:
        """Solve the joint problem (same solvers as :meth:`SysIdProblem.fit`); return a :class:`JointSysIdResult`."""
        s = self._solve(solver, rtol, atol, max_steps, optimizer, steps, z0)
        z, est, se, q, cov = s["z"], s["estimate"], s["stderr"], s["q"], s["cov"]
        J, E, nx = self.J, self.E, self.model.n_states
        zj = np.asarray(self._per_experiment(z[: self.n_theta + self.n_x0]))
        r = s["r"].reshape(J, -1)
        per, mets = [], []
        for i in range(J):
            idx = self._joint_index(i)
            theta = self.space.unflatten(jnp.asarray(zj[i, : self.space.size]))
            x0 = zj[i, self.space.size :].reshape(E, nx) if self.model.estimate_x0 else np.asarray(self.arrays["x0"][i])
            m = _metrics(s["ys"][i], self.y_np[i])
            mets.append(m)
            per.append(
                SysIdResult(
                    names=list(self.space.names),
                    estimate=est[idx],
                    stderr=se[idx],
                    ci_low=est[idx] - q * se[idx],
                    ci_high=est[idx] + q * se[idx],
                    cov=cov[np.ix_(idx, idx)],
                    params=jax.tree.map(lambda v: np.asarray(v) if eqx.is_array(v) else v, theta),
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
                )
            )
        return JointSysIdResult(
            experiments=list(self.experiment_ids),
            names=list(self.names),
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
