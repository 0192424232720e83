"""The JAX -> Julia translator (``pydso.backends.julia``), checked without Julia.

* **Snapshots**: the Julia emitted for three example problems — Lorenz, the pendulum closed loop with an
  ``eqx.nn.MLP`` tanh policy, an Ornstein–Uhlenbeck SDE — is kept in ``tests/snapshots/julia/`` (regenerate with
  ``PYDSO_UPDATE_SNAPSHOTS=1``); ``tests/test_julia_syntax.py`` parses them with tree-sitter-julia.
* **Numerics**: the *emitted text* is executed by a small interpreter (tree-sitter-julia parse, each Julia
  operation given its Julia semantics in NumPy on the Julia layout: column-major, reversed sizes, 1-based) and must
  reproduce the JAX functions to 1e-12 at random states and parameters. A wrong layout, index offset, reshape
  order or contraction in the translator makes it disagree.
* **Errors**: the first unsupported primitive is named.
"""

import functools
import os
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import pydso
from pydso.backends.julia import JuliaModel, theta_layout, translate_function, translate_problem

SNAPSHOTS = pathlib.Path(__file__).resolve().parent / "snapshots" / "julia"


# ----------------------------------------------------------------------------------------- example problems
def lorenz_problem():
    def vector_field(t, x, theta):
        s, r, b = theta["sigma"], theta["rho"], theta["beta"]
        return jnp.stack([s * (x[1] - x[0]), x[0] * (r - x[2]) - x[1], x[0] * x[1] - b * x[2]])

    def cost(x, theta):
        return 0.5 * jnp.sum(x**2)

    theta = {"sigma": jnp.asarray(10.0), "rho": jnp.asarray(28.0), "beta": jnp.asarray(8.0 / 3.0)}
    problem = pydso.Problem(
        pydso.ODESystem(vector_field, dt=0.01),
        cost,
        pydso.FiniteHorizon(20),
        pydso.Fixed(jnp.array([1.0, 1.0, 1.0])),
        name="lorenz",
    )
    return problem, theta


@functools.cache
def pendulum_problem():
    """The pendulum closed loop as an ODE, torque ``2 tanh(MLP(cos th, sin th, thdot))`` (as examples/pendulum_swingup:
    a tanh ``eqx.nn.MLP``, the observation rounded to float32), with gymnasium's cost."""
    shapes = eqx.filter_eval_shape(eqx.nn.MLP, 3, "scalar", 8, 2, activation=jnp.tanh, key=jax.random.key(0))
    rng = np.random.default_rng(1)  # random weights without compiling the initialiser
    mlp = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / 2.0) if isinstance(s, jax.ShapeDtypeStruct) else s, shapes
    )
    theta, static = eqx.partition(mlp, eqx.is_array)

    def torque(x, theta):
        obs = jnp.stack([jnp.cos(x[0]), jnp.sin(x[0]), x[1]]).astype(jnp.float32).astype(x.dtype)
        return jnp.clip(2.0 * jnp.tanh(eqx.combine(theta, static)(obs)), -2.0, 2.0)

    def vector_field(t, x, theta):
        return jnp.stack([x[1], 15.0 * jnp.sin(x[0]) + 3.0 * torque(x, theta)])

    def cost(x, theta):
        angle = (x[0] + jnp.pi) % (2 * jnp.pi) - jnp.pi
        return angle**2 + 0.1 * x[1] ** 2 + 0.001 * torque(x, theta) ** 2

    problem = pydso.Problem(
        pydso.ODESystem(vector_field, dt=0.05),
        cost,
        pydso.Episodic(0.95, 20),
        pydso.Uniform([-np.pi, -1.0], [np.pi, 1.0]),
        name="pendulum_mlp",
    )
    return problem, theta


def ornstein_uhlenbeck_problem():
    def drift(t, x, theta):
        return theta["kappa"] * (theta["mu"] - x)

    def diffusion(t, x, theta):
        return jnp.exp(theta["log_sigma"])

    def cost(x, theta):
        return x @ x

    theta = {"kappa": jnp.array([1.0, 2.0]), "mu": jnp.array([0.5, -0.5]), "log_sigma": jnp.asarray(-1.0)}
    problem = pydso.Problem(
        pydso.SDESystem(drift, diffusion, dt=0.01),
        cost,
        pydso.FiniteHorizon(20),
        pydso.Normal(jnp.zeros(2), 0.3),
        name="ornstein_uhlenbeck",
    )
    return problem, theta


EXAMPLES = {
    "lorenz": lorenz_problem,
    "pendulum_mlp": pendulum_problem,
    "ornstein_uhlenbeck": ornstein_uhlenbeck_problem,
}


# ----------------------------------------------------------------------------------------- the interpreter
def _parser():
    tree_sitter = pytest.importorskip("tree_sitter", reason="tree-sitter is in the 'test' extra")
    tree_sitter_julia = pytest.importorskip("tree_sitter_julia", reason="tree-sitter-julia is in the 'test' extra")
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_julia.language()))


def _f(a):
    """A Julia array (NumPy array in Julia layout) or number."""
    return a


def _jl_reshape(a, dims):
    if dims == ():
        return np.asarray(a).reshape(-1, order="F")[0] if np.ndim(a) else a
    if np.ndim(a) == 0:
        return np.full(dims, a)
    return np.reshape(a, dims, order="F")


def _jl_tensordot(a, b, ia, ib):
    out = np.tensordot(a, b, axes=([i - 1 for i in ia], [i - 1 for i in ib]))
    return out[()] if np.ndim(out) == 0 else out


def _jl_broadcast_in_dim(a, dims, mapping):
    if np.ndim(a) == 0:
        return a if dims == () else np.full(dims, a)
    shape = [1] * len(dims)
    for j, k in enumerate(mapping):
        shape[k - 1] = np.shape(a)[j]
    return np.broadcast_to(np.reshape(a, shape, order="F"), dims).copy()


def _jl_slice(a, starts, stops, strides):
    return a[tuple(slice(s - 1, e, k) for s, e, k in zip(starts, stops, strides))]


def _jl_stack(xs, dim):
    return np.stack([np.asarray(x) for x in xs], axis=dim - 1)


def _jl_reduce(fn):
    def reduce(a, dims):
        out = fn(a, axis=tuple(d - 1 for d in dims))
        return out[()] if np.ndim(out) == 0 else out

    return reduce


def _jl_leaf(theta, offset, dims):
    n = int(np.prod(dims, dtype=np.int64))
    chunk = theta[offset : offset + n]
    return chunk[0] if dims == () else np.reshape(chunk, dims, order="F")


PYDSO_JL = {
    "leaf": _jl_leaf,
    "constant": lambda values, dims: _jl_reshape(np.asarray(values), dims),
    "reshape": _jl_reshape,
    "slice": _jl_slice,
    "stack": _jl_stack,
    "concatenate": lambda xs, dim: np.concatenate([np.asarray(x) for x in xs], axis=dim - 1),
    "tensordot": _jl_tensordot,
    "broadcast_in_dim": _jl_broadcast_in_dim,
    "reduce_sum": _jl_reduce(np.sum),
    "reduce_max": _jl_reduce(np.max),
    "reduce_min": _jl_reduce(np.min),
    "logistic": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "select_n": lambda p, *cases: np.choose(np.asarray(p, dtype=np.int64), cases)[()],
}
BASE_JL = {
    "exp": np.exp,
    "log": np.log,
    "expm1": np.expm1,
    "log1p": np.log1p,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "tanh": np.tanh,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "sign": np.sign,
    "max": np.maximum,
    "min": np.minimum,
    "rem": np.fmod,  # Julia's rem truncates, like C's fmod and lax.rem
    "atan": np.arctan2,
    "clamp": np.clip,
    "Float64": lambda x: np.asarray(x, np.float64)[()],
    "Float32": lambda x: np.asarray(x, np.float32)[()],
    "permutedims": lambda a, perm: np.transpose(a, [p - 1 for p in perm]),
}
OPERATORS = {
    ".+": np.add,
    ".-": np.subtract,
    ".*": np.multiply,
    "./": np.divide,
    ".^": np.power,
    ".<": np.less,
    ".<=": np.less_equal,
    ".>": np.greater,
    ".>=": np.greater_equal,
    ".==": np.equal,
    ".!=": np.not_equal,
    ".&": np.logical_and,
    ".|": np.logical_or,
}
UNARY = {".-": np.negative, "-": np.negative, ".!": np.logical_not}


class JuliaInterpreter:
    """Executes the straight-line Julia the translator emits (one function of assignments and a return), giving
    every operation its Julia meaning on Julia-layout NumPy arrays. Any construct it does not know fails loudly."""

    def __init__(self, source: str):
        self.tree = _parser().parse(source.encode())
        self.functions = {}
        for node in self.tree.root_node.children:
            if node.type == "function_definition":
                call = next(c for c in node.children if c.type == "signature").children[0]
                name = call.children[0].text.decode()
                params = [c.text.decode() for c in call.children[1].children if c.type == "identifier"]
                self.functions[name] = (params, node)

    def call(self, name, *args):
        params, node = self.functions[name]
        env = dict(zip(params, args, strict=True))
        for stmt in node.children:
            if stmt.type == "assignment":
                target, _, value = stmt.children
                env[target.text.decode()] = self.eval(value, env)
            elif stmt.type == "return_statement":
                return self.eval(stmt.children[1], env)
            elif stmt.type not in ("function", "signature", "end", "line_comment"):
                raise AssertionError(f"the interpreter does not know the statement {stmt.type}: {stmt.text!r}")
        raise AssertionError(f"{name} has no return")

    def function(self, node):
        if node.type == "identifier":
            return BASE_JL[node.text.decode()]
        if node.type == "field_expression":
            module, _, attr = node.children
            assert module.text == b"PyDSO", node.text
            return PYDSO_JL[attr.text.decode()]
        raise AssertionError(f"unknown callee {node.text!r}")

    def args(self, node, env):
        return [self.eval(c, env) for c in node.children if c.type not in ("(", ")", ",", "[", "]")]

    def eval(self, node, env):
        kind = node.type
        text = node.text.decode()
        if kind == "identifier":
            return env[text] if text in env else {"Inf": np.inf, "NaN": np.nan}[text]
        if kind == "boolean_literal":
            return text == "true"
        if kind == "integer_literal":
            return int(text)
        if kind == "float_literal":
            return float(text)
        if kind == "parenthesized_expression":
            return self.eval(node.children[1], env)
        if kind == "tuple_expression":
            return tuple(self.args(node, env))
        if kind == "vector_expression":
            return np.array(self.args(node, env))
        if kind == "unary_expression":
            op, arg = node.children
            return UNARY[op.text.decode()](self.eval(arg, env))
        if kind == "binary_expression":
            left, op, right = node.children
            return OPERATORS[op.text.decode()](self.eval(left, env), self.eval(right, env))
        if kind == "call_expression":
            return self.function(node.children[0])(*self.args(node.children[1], env))
        if kind == "broadcast_call_expression":
            fn = self.function(node.children[0])
            args = self.args(node.children[2], env)
            if fn in (BASE_JL["Float64"], BASE_JL["Float32"], PYDSO_JL["select_n"]):
                return fn(*args)
            return np.vectorize(fn, otypes=[np.result_type(*[np.asarray(a) for a in args])])(*args)[()]
        if kind == "index_expression":
            array, index = node.children
            (i,) = self.args(index, env)
            return np.asarray(self.eval(array, env)).reshape(-1, order="F")[i - 1]
        raise AssertionError(f"the interpreter does not know the Julia construct {kind}: {text!r}")


def to_julia_layout(a):
    return np.asarray(a).T  # NumPy's .T reverses every axis: the Julia array of the same memory


def run_translated(source, name, t, x, theta):
    flat = np.asarray(ravel_pytree(theta)[0])
    out = JuliaInterpreter(source).call(name, np.float64(t), to_julia_layout(x), flat)
    return np.asarray(out).T


# ----------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def models():
    return {name: (*make(), translate_problem(*make())) for name, make in EXAMPLES.items()}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_snapshot(models, name):
    problem, theta, model = models[name]
    path = SNAPSHOTS / f"{name}.jl"
    if os.environ.get("PYDSO_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(model.source)
    assert path.exists(), f"no snapshot {path}; run with PYDSO_UPDATE_SNAPSHOTS=1 to create it"
    assert model.source == path.read_text(), (
        f"the Julia emitted for {name} changed; if intended, regenerate with PYDSO_UPDATE_SNAPSHOTS=1 and review "
        "the diff"
    )


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_translated_code_reproduces_jax(models, name):
    problem, theta, model = models[name]
    system = problem.system
    roles = {model.vector_field: getattr(system, "vector_field", None) or system.drift}
    roles[model.running_cost] = problem.running_cost
    if model.diffusion is not None:
        roles[model.diffusion] = system.diffusion
    flat, unravel = ravel_pytree(theta)
    rng = np.random.default_rng(0)
    d = problem.state_shape[0]
    roles = {julia_name: jax.jit(lambda t, x, th, fn=fn: fn(t, x, th)) for julia_name, fn in roles.items()}
    for trial in range(3):
        x = rng.normal(size=d) * 2.0
        th = unravel(jnp.asarray(np.asarray(flat) * (1.0 + 0.3 * rng.normal(size=flat.shape))))
        t = 0.37 * trial
        for julia_name, fn in roles.items():
            expected = np.asarray(fn(jnp.asarray(t), jnp.asarray(x), th))
            got = run_translated(model.source, julia_name, t, x, th)
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, err_msg=f"{name}: {julia_name}")


def test_matrix_layout_and_structural_primitives():
    """Shapes the examples do not cover: a (2, 3) matrix leaf, transposes, reshapes, reductions, broadcasts,
    concatenation, strided slices, comparisons and constants — each against JAX."""
    A0 = np.arange(6.0).reshape(2, 3) / 7.0

    def fn(t, x, theta):
        A, b = theta["A"], theta["b"]
        y = A @ x[:3] + b  # (2,)
        z = x[:3] @ A.T  # (2,)
        M = jnp.outer(y, x[1:4]) + A0  # (2, 3): broadcast_in_dim + dot_general + constant
        w = M.T.reshape(6)[::2]  # transpose, reshape, strided slice
        s = jnp.sum(M, axis=0) * jnp.max(M, axis=1).sum() + jnp.min(M)
        P = (A @ jnp.stack([x[:3], x[1:4] ** 2], axis=1)).reshape(4)  # a (2, 2) matrix product, not symmetric
        u = jnp.concatenate([y * z, w, s, P, jnp.where(x[:2] > 0.1, x[:2] ** 3, -x[:2])])
        return jax.nn.sigmoid(u) * jnp.sqrt(jnp.abs(u) + 1.0) + jnp.exp(-(u**2)) - t * jnp.log1p(u**2)

    theta = {"A": jnp.asarray(A0 + 0.5), "b": jnp.array([0.3, -0.2])}
    source = translate_function(fn, (4,), theta, name="f")
    x = np.array([0.4, -1.3, 0.7, 2.0])
    expected = np.asarray(jax.jit(fn)(jnp.asarray(0.5), jnp.asarray(x), theta))
    np.testing.assert_allclose(run_translated(source, "f", 0.5, x, theta), expected, rtol=1e-12, atol=1e-12)


def test_theta_layout_is_ravel_pytree_order():
    problem, theta = pendulum_problem()
    layout = theta_layout(theta)
    flat = np.asarray(ravel_pytree(theta)[0])
    leaves = jax.tree_util.tree_leaves(theta)
    assert len(layout) == len(leaves)
    for leaf, value in zip(layout, leaves, strict=True):
        n = int(np.prod(leaf.shape, dtype=np.int64))
        np.testing.assert_array_equal(flat[leaf.offset : leaf.offset + n], np.ravel(value))
    assert layout[-1].offset + int(np.prod(layout[-1].shape, dtype=np.int64)) == flat.size


def test_float32_translation_emits_float32_literals():
    problem, theta = lorenz_problem()
    source = translate_problem(problem, theta, dtype=jnp.float32).source
    assert "Float32(" not in translate_problem(problem, theta).source
    assert "Float32(0.5)" in source


def test_first_unsupported_primitive_is_named():
    def fn(t, x, theta):
        y = jnp.cumsum(x) * theta  # cumsum: unsupported, and the first such primitive
        return jnp.sort(y)

    with pytest.raises(pydso.ProblemError, match=r"first unsupported JAX primitive is 'cumsum'.*JuliaModel"):
        translate_function(fn, (3,), jnp.asarray(2.0), name="f", what="the vector field")


def test_traced_index_is_unsupported_with_the_reason():
    def fn(t, x, theta):
        return x[jnp.argmax(x)] * x

    with pytest.raises(pydso.ProblemError, match=r"unsupported JAX primitive is 'argmax'"):
        translate_function(fn, (3,), jnp.asarray(2.0), name="f")


def test_chains_are_refused():
    problem = pydso.Problem(
        pydso.DeterministicMap(lambda x, theta: theta * x),
        lambda x, theta: x @ x,
        pydso.FiniteHorizon(5),
        pydso.Fixed(jnp.ones(2)),
    )
    with pytest.raises(pydso.ProblemError, match="ODESystem and SDESystem"):
        translate_problem(problem, jnp.asarray(0.5))


def test_user_supplied_julia_source():
    source = "f(t, x, p) = SVector(p[1] * x[2], -x[1])\nL(t, x, p) = x[1]^2\n"
    model = JuliaModel(kind="ode", source=source, vector_field="f", running_cost="L")
    assert model.diffusion is None
    with pytest.raises(pydso.ProblemError, match="diffusion"):
        JuliaModel(kind="sde", source=source, vector_field="f", running_cost="L")
    with pytest.raises(pydso.ProblemError, match="kind"):
        JuliaModel(kind="pde", source=source, vector_field="f", running_cost="L")


# -------------------------------------------------------------------------------- the Python half of the bridge
class FakeJulia:
    """Stands in for PyDSO.jl behind :class:`JuliaBackend`: runs the *translated* model through the interpreter
    above (RK4 with 8 substeps per save interval for ODEs, Euler–Maruyama on the given increments for SDEs) and
    answers VJPs by central differences. It checks the Python side of the bridge — the translation it sends, the
    ``pure_callback``/``custom_vjp`` wiring, the layouts of initial states, noise, states and costs, and what JAX
    adds (terminal costs, log-densities) — not Julia."""

    def load_model(self, source, kind, f, cost, g):
        return JuliaInterpreter(source), kind, f, cost, g

    def solve_ensemble(self, model, x0s, theta, noise, *, dt, horizon, **options):
        interp, kind, f, cost, g = model
        n, d = x0s.shape

        def rhs(t, u):
            x = u[:d]
            return np.append(np.asarray(interp.call(f, t, x, theta)), interp.call(cost, t, x, theta))

        states, costs = np.zeros((n, horizon + 1, d)), np.zeros((n, horizon))
        for i in range(n):
            u = np.append(x0s[i], 0.0)
            states[i, 0] = x0s[i]
            for k in range(horizon):
                t = k * dt
                if kind == "sde":
                    scale = np.broadcast_to(interp.call(g, t, u[:d], theta), (d,))
                    u = u + rhs(t, u) * dt + np.append(scale * noise[i, k], 0.0)
                else:
                    h = dt / 8
                    for m in range(8):
                        s = t + m * h
                        k1 = rhs(s, u)
                        k2 = rhs(s + h / 2, u + h / 2 * k1)
                        k3 = rhs(s + h / 2, u + h / 2 * k2)
                        k4 = rhs(s + h, u + h * k3)
                        u = u + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
                states[i, k + 1] = u[:d]
                costs[i, k] = u[d] - (costs[i, :k].sum())
        return states, costs

    def vjp_ensemble(self, model, x0s, theta, noise, states_bar, costs_bar, **options):
        grad = np.zeros_like(theta)
        for j in range(theta.size):
            e = np.zeros_like(theta)
            e[j] = 1e-6
            plus = self.solve_ensemble(model, x0s, theta + e, noise, **options)
            minus = self.solve_ensemble(model, x0s, theta - e, noise, **options)
            grad[j] = sum(np.sum(b * (p - m)) for b, p, m in zip((states_bar, costs_bar), plus, minus)) / 2e-6
        return grad


@pytest.fixture
def fake_julia(monkeypatch):
    from pydso.backends.julia import _backend

    fake = FakeJulia()
    monkeypatch.setattr(_backend, "_session", lambda project: fake)
    monkeypatch.setattr(_backend, "_loaded_model", lambda project, model: fake.load_model(*_model_args(model)))
    return fake


def _model_args(model):
    return model.source, model.kind, model.vector_field, model.running_cost, model.diffusion


def test_bridge_ode_states_costs_and_gradient(fake_julia):
    """JuliaBackend with the stand-in: states and interval costs of x' = A x against the closed form, the
    terminal cost, and the gradient through ``custom_vjp`` against the closed form's."""
    from pydso.backends.julia import JuliaBackend

    a, w, dt, horizon = 0.4, 1.3, 0.05, 6
    problem = pydso.Problem(
        pydso.ODESystem(
            lambda t, x, th: jnp.stack([-th[0] * x[0] + th[1] * x[1], -th[1] * x[0] - th[0] * x[1]]), dt=dt
        ),
        lambda x, th: x @ x,
        pydso.Episodic(0.9, horizon),
        pydso.Normal(jnp.zeros(2), 1.0),
        terminal_cost=lambda x, th: 2.0 * (x @ x),
    )
    theta = jnp.array([a, w])
    keys = jax.random.split(jax.random.key(0), 2)

    def objective(backend, th):
        b = backend.simulate(problem, th, keys)
        weights, _ = problem.setting.weights()
        return jnp.mean(b.costs @ jnp.asarray(weights) + b.terminal_weights * b.terminal_costs), b

    (value, b), grad = jax.jit(jax.value_and_grad(lambda th: objective(JuliaBackend(), th), has_aux=True))(theta)
    ts = np.arange(horizon + 1) * dt
    for i in range(2):
        x0 = np.asarray(b.states[i, 0])
        c, s = np.cos(w * ts), np.sin(w * ts)
        exact = np.exp(-a * ts)[:, None] * np.stack([c * x0[0] + s * x0[1], -s * x0[0] + c * x0[1]], axis=1)
        np.testing.assert_allclose(b.states[i], exact, rtol=1e-9, atol=1e-12)
        e = np.exp(-2 * a * ts)
        np.testing.assert_allclose(b.costs[i], (x0 @ x0) * (e[:-1] - e[1:]) / (2 * a), rtol=1e-9)
        np.testing.assert_allclose(b.terminal_costs[i], 2.0 * exact[-1] @ exact[-1], rtol=1e-9)

    def closed_form_objective(a):
        e = np.exp(-2 * a * ts)
        r2 = np.sum(np.asarray(b.states[:, 0]) ** 2, axis=1).mean()
        return r2 * (np.sum(0.9 ** np.arange(horizon) * (e[:-1] - e[1:]) / (2 * a)) + 0.9**horizon * 2.0 * e[-1])

    np.testing.assert_allclose(value, closed_form_objective(a), rtol=1e-9)
    da = (closed_form_objective(a + 1e-6) - closed_form_objective(a - 1e-6)) / 2e-6
    np.testing.assert_allclose(grad, [da, 0.0], rtol=1e-6, atol=1e-8)  # d/dw = 0: a rotation keeps |x|


def test_bridge_sde_uses_the_jax_backends_brownian_increments(fake_julia):
    """Same keys, same paths: the stand-in's Euler–Maruyama on the increments the bridge sends reproduces the JAX
    fast path, and the log-densities the bridge computes in JAX equal the JAX backend's."""
    from pydso.backends.julia import JuliaBackend

    problem, theta = ornstein_uhlenbeck_problem()
    keys = jax.random.split(jax.random.key(1), 3)
    got = jax.jit(lambda th: JuliaBackend().simulate(problem, th, keys))(theta)
    ref = jax.jit(lambda th: pydso.backends.JaxBackend().simulate(problem, th, keys))(theta)
    np.testing.assert_allclose(got.states, ref.states, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got.costs, ref.costs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.log_probs, ref.log_probs, rtol=1e-10)
