"""
    PyDSO

The Julia side of pydso's optional `backend="julia"`: ensemble solves of a problem's ODE/SDE with its running cost
as an augmented state component, on CPU threads (`EnsembleThreads`) or as GPU kernels (`EnsembleGPUKernel`), and
vector-Jacobian products with respect to the flat parameter vector through SciMLSensitivity adjoints.

It also defines the helpers that code emitted by `pydso.backends.julia.translate_problem` calls (`leaf`, `slice`,
`stack`, `tensordot`, ...). Their semantics follow pydso's layout rule: a JAX array of shape `(s1, ..., sr)` is the
Julia array of size `(sr, ..., s1)` holding the same memory; rank-0 arrays are numbers.
"""
module PyDSO

using LinearAlgebra
using StaticArrays
using OrdinaryDiffEq
using StochasticDiffEq
using SciMLSensitivity
using DiffEqGPU
using CUDA

export load_model, solve_ensemble, vjp_ensemble

# ------------------------------------------------------------------------------------------------
# helpers called by translated code
# ------------------------------------------------------------------------------------------------

"`logistic(x) = 1 / (1 + exp(-x))` (JAX's `logistic`, `jax.nn.sigmoid`)."
logistic(x) = inv(one(x) + exp(-x))

"`rsqrt(x) = 1 / sqrt(x)` (JAX's `rsqrt`)."
rsqrt(x) = inv(sqrt(x))

"JAX's `select_n(p, cases...)`: `cases[p + 1]` (for a Bool `p`: `p ? b : a`)."
select_n(p::Bool, a, b) = ifelse(p, b, a)
select_n(p::Integer, cases...) = cases[p+1]

"""
    leaf(theta, offset, dims)

The parameter leaf stored at `theta[offset+1 : offset+prod(dims)]`, of Julia size `dims` (the reversed JAX shape): a
number for `dims == ()`, a static array for a static `theta` (GPU kernels), else a reshaped view (no copy).
"""
@inline leaf(theta::AbstractVector, offset::Integer, ::Tuple{}) = theta[offset+1]
@inline leaf(theta::StaticVector, offset::Integer, ::Tuple{}) = theta[offset+1]
@inline function leaf(theta::StaticVector, offset::Integer, dims::Tuple)
    n = prod(dims)
    return SArray{Tuple{dims...}}(ntuple(i -> theta[offset+i], n))
end
@inline leaf(theta::AbstractVector, offset::Integer, dims::Tuple) =
    Base.reshape(view(theta, (offset+1):(offset+prod(dims))), dims)

"A constant array of the traced function: `values` in JAX (row-major) order, Julia size `dims`."
constant(values::AbstractVector, ::Tuple{}) = values[1]
constant(values::AbstractVector, dims::Tuple) = Base.reshape(values, dims)

"JAX's `reshape`/`squeeze`/`expand_dims`: Julia's column-major `reshape` of the reversed sizes (numbers for `()`)."
reshape(a::Number, ::Tuple{}) = a
reshape(a::Number, dims::Tuple) = fill(a, dims)
reshape(a::AbstractArray, ::Tuple{}) = a[1]
reshape(a::StaticArray, ::Tuple{}) = a[1]
reshape(a::StaticArray, dims::Tuple) = SArray{Tuple{dims...}}(Tuple(a))
reshape(a::AbstractArray, dims::Tuple) = Base.reshape(a, dims)

"JAX's static `slice`: 1-based inclusive `starts:strides:stops` in every Julia dimension."
slice(a::AbstractArray, starts::Tuple, stops::Tuple, strides::Tuple) =
    a[map((s, l, k) -> s:k:l, starts, stops, strides)...]

_insertdim(sz::Tuple, dim::Integer) = (sz[1:dim-1]..., 1, sz[dim:end]...)

"JAX's `stack` along Julia dimension `dim` (numbers stack into a static vector)."
stack(xs::Tuple{Vararg{Number}}, dim::Integer) = SVector(xs...)
stack(xs::Tuple, dim::Integer) = cat(map(x -> Base.reshape(x, _insertdim(size(x), dim)), xs)...; dims=dim)

"JAX's `concatenate` along Julia dimension `dim`."
concatenate(xs::Tuple{Vararg{AbstractVector}}, dim::Integer) = vcat(xs...)
concatenate(xs::Tuple, dim::Integer) = cat(xs...; dims=dim)

"""
    tensordot(A, B, ia, ib)

`numpy.tensordot(A, B, (ia, ib))` with 1-based dimensions: contract `A`'s dimensions `ia` with `B`'s `ib` (pairwise);
the result has `A`'s free dimensions, then `B`'s. JAX's `dot_general(lhs, rhs)` without batch dimensions is
`tensordot(rhs, lhs, ...)` in pydso's layout (`W @ x` is `transpose(Wj) * x`).
"""
tensordot(A::AbstractVector, B::AbstractVector, ::Tuple{Int}, ::Tuple{Int}) = dot(A, B)
tensordot(A::AbstractVector, B::AbstractMatrix, ::Tuple{Int}, ib::Tuple{Int}) =
    ib[1] == 1 ? transpose(B) * A : B * A
tensordot(A::AbstractMatrix, B::AbstractVector, ia::Tuple{Int}, ::Tuple{Int}) =
    ia[1] == 1 ? transpose(A) * B : A * B
function tensordot(A::AbstractArray, B::AbstractArray, ia::Tuple, ib::Tuple)
    fa = Tuple(filter(d -> !(d in ia), 1:ndims(A)))
    fb = Tuple(filter(d -> !(d in ib), 1:ndims(B)))
    Ap = permutedims(A, (fa..., ia...))
    Bp = permutedims(B, (ib..., fb...))
    m, k, n = prod(size(A, d) for d in fa; init=1), prod(size(A, d) for d in ia; init=1),
    prod(size(B, d) for d in fb; init=1)
    C = Base.reshape(Ap, m, k) * Base.reshape(Bp, k, n)
    out = (map(d -> size(A, d), fa)..., map(d -> size(B, d), fb)...)
    return isempty(out) ? C[1] : Base.reshape(C, out)
end

"""
    broadcast_in_dim(a, dims, map)

JAX's `broadcast_in_dim`: Julia dimension `j` of `a` becomes dimension `map[j]` of the result of size `dims`.
"""
broadcast_in_dim(a::Number, ::Tuple{}, ::Tuple{}) = a
broadcast_in_dim(a::Number, dims::Tuple, ::Tuple{}) = fill(a, dims)
function broadcast_in_dim(a::AbstractArray, dims::Tuple, map::Tuple)
    shape = ntuple(k -> (j = findfirst(==(k), map); j === nothing ? 1 : size(a, j)), length(dims))
    b = Base.reshape(a, shape)
    return repeat(b; outer=ntuple(k -> shape[k] == dims[k] ? 1 : dims[k], length(dims)))
end

for (name, f) in ((:reduce_sum, :sum), (:reduce_max, :maximum), (:reduce_min, :minimum))
    @eval function $name(a::AbstractArray, dims::Tuple)
        length(dims) == ndims(a) && return $f(a)
        return dropdims($f(a; dims=dims); dims=dims)
    end
end

# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

"""
    Model(kind, f, cost, g)

A problem's right-hand side: `f(t, x, theta)` (vector field or drift), `cost(t, x, theta)` (running cost, a number)
and, for SDEs, `g(t, x, theta)` (diagonal noise: a number or a vector).
"""
struct Model{F,L,G}
    kind::Symbol
    f::F
    cost::L
    g::G
end

"""
    load_model(source, kind, f, cost, g)

Evaluate Julia `source` (translated or hand-written) in a fresh module with `using PyDSO, StaticArrays,
LinearAlgebra` and return the [`Model`](@ref) of the functions it names (`g === nothing` for ODEs).
"""
function load_model(source::AbstractString, kind::AbstractString, f::AbstractString, cost::AbstractString, g)
    mod = Module(:PyDSOUserModel)
    Core.eval(mod, :(using PyDSO, StaticArrays, LinearAlgebra))
    Base.include_string(mod, String(source), "pydso_model.jl")
    lookup(name) = Base.invokelatest(getfield, mod, Symbol(name))
    return Model(Symbol(kind), lookup(f), lookup(cost), g === nothing ? nothing : lookup(g))
end

"The augmented right-hand side `(dx/dt, L)` of state `u = (x, c)`, out of place on static vectors."
function augmented_rhs(model::Model, ::Val{D}) where {D}
    return function (u, p, t)
        x = SVector{D}(ntuple(i -> u[i], Val(D)))
        dx = model.f(t, x, p)
        c = model.cost(t, x, p)
        return SVector{D + 1}(ntuple(i -> i <= D ? dx[i] : c, Val(D + 1)))
    end
end

"The augmented diagonal noise `(g, 0)`: the running-cost component has none."
function augmented_noise(model::Model, ::Val{D}) where {D}
    return function (u, p, t)
        x = SVector{D}(ntuple(i -> u[i], Val(D)))
        g = model.g(t, x, p)
        return SVector{D + 1}(ntuple(i -> i <= D ? (g isa Number ? g : g[i]) : zero(eltype(u)), Val(D + 1)))
    end
end

const ODE_SOLVERS = Dict(
    "Tsit5" => Tsit5, "Vern7" => Vern7, "Vern9" => Vern9, "DP5" => DP5, "RK4" => RK4,
    "Rodas5P" => Rodas5P, "KenCarp4" => KenCarp4, "QNDF" => QNDF,
)
const GPU_SOLVERS = Dict("Tsit5" => GPUTsit5, "Vern7" => GPUVern7, "Vern9" => GPUVern9)

function sensitivity(name::AbstractString)
    name == "InterpolatingAdjoint" && return InterpolatingAdjoint()
    name == "QuadratureAdjoint" && return QuadratureAdjoint()
    name == "GaussAdjoint" && return GaussAdjoint()
    name == "BacksolveAdjoint" && return BacksolveAdjoint()
    throw(ArgumentError("unknown sensealg $name"))
end

"The problem of trajectory `i`: initial state `x0s[i, :]` with zero accumulated cost, noise path `noise[i, :, :]`."
function trajectory_problem(model::Model, x0s, theta, noise, i, ts, ::Val{D}) where {D}
    T = eltype(theta)
    u0 = SVector{D + 1}(ntuple(k -> k <= D ? T(x0s[i, k]) : zero(T), Val(D + 1)))
    tspan = (ts[1], ts[end])
    if model.kind === :ode
        return ODEProblem{false}(augmented_rhs(model, Val(D)), u0, tspan, theta)
    end
    H = length(ts) - 1
    W = Vector{SVector{D + 1,T}}(undef, H + 1)
    W[1] = zero(SVector{D + 1,T})
    for k in 1:H
        dW = SVector{D + 1}(ntuple(j -> j <= D ? T(noise[i, k, j]) : zero(T), Val(D + 1)))
        W[k+1] = W[k] + dW
    end
    return SDEProblem{false}(
        augmented_rhs(model, Val(D)), augmented_noise(model, Val(D)), u0, tspan, theta;
        noise=NoiseGrid(collect(ts), W),
    )
end

function _algorithm(model::Model, solver::AbstractString)
    model.kind === :sde && return EM()
    return ODE_SOLVERS[solver]()
end

"""
    solve_ensemble(model, x0s, theta, noise; device, solver, adaptive, abstol, reltol, dt, horizon, sensealg)

Solve `n = size(x0s, 1)` trajectories from the rows of `x0s` (`(n, D)`) with the flat parameters `theta` and, for
SDEs, the Brownian increments `noise` (`(n, H, D)`, already scaled by `sqrt(dt)`; Euler-Maruyama with step `dt`).
Returns `(states, costs)`: the states at `t_k = k dt`, `(n, H+1, D)`, and the running-cost integrals of the `H`
intervals, `(n, H)`. `device = "gpu"` runs ODEs as one `EnsembleGPUKernel` (CUDA) kernel with `theta` as a static
vector (small models only).
"""
function solve_ensemble(model::Model, x0s, theta, noise; device="cpu", solver="Tsit5", adaptive=false,
    abstol=1e-8, reltol=1e-6, dt, horizon, sensealg="InterpolatingAdjoint")
    T = eltype(theta)
    n, D = size(x0s)
    H = Int(horizon)
    ts = collect(T, (0:H) .* T(dt))
    p = device == "gpu" ? SVector{length(theta)}(T.(theta)) : Vector{T}(theta)
    prob = trajectory_problem(model, x0s, p, noise, 1, ts, Val(D))
    ens = EnsembleProblem(prob; prob_func=(_, i, _) -> trajectory_problem(model, x0s, p, noise, i, ts, Val(D)),
        safetycopy=false)
    if device == "gpu"
        model.kind === :ode || throw(ArgumentError("EnsembleGPUKernel runs ODE problems only"))
        sim = solve(ens, GPU_SOLVERS[solver](), EnsembleGPUKernel(CUDA.CUDABackend()); trajectories=n,
            saveat=ts, dt=T(dt), adaptive=adaptive, abstol=abstol, reltol=reltol)
    else
        sim = solve(ens, _algorithm(model, solver), EnsembleThreads(); trajectories=n, saveat=ts, dt=T(dt),
            adaptive=adaptive, abstol=abstol, reltol=reltol)
    end
    states = Array{T}(undef, n, H + 1, D)
    costs = Array{T}(undef, n, H)
    for i in 1:n
        us = sim[i].u
        if length(us) != H + 1  # a failed solve: NaN states, which pydso reports as a divergence
            states[i, :, :] .= T(NaN)
            costs[i, :] .= T(NaN)
            continue
        end
        for k in 1:(H+1), j in 1:D
            states[i, k, j] = us[k][j]
        end
        for k in 1:H
            costs[i, k] = us[k+1][D+1] - us[k][D+1]
        end
    end
    return states, costs
end

"""
    vjp_ensemble(model, x0s, theta, noise, states_bar, costs_bar; options...)

The vector-Jacobian product `sum_i (states_bar_i . d states_i/d theta + costs_bar_i . d costs_i/d theta)`, a vector
like `theta`, from one SciMLSensitivity adjoint solve per trajectory (CPU threads; `sensealg`, default
`InterpolatingAdjoint`). The cotangent of the accumulated cost at save time `k` is
`costs_bar[k-1] - costs_bar[k]` (costs are differences of that component).
"""
function vjp_ensemble(model::Model, x0s, theta, noise, states_bar, costs_bar; device="cpu", solver="Tsit5",
    adaptive=false, abstol=1e-8, reltol=1e-6, dt, horizon, sensealg="InterpolatingAdjoint")
    T = eltype(theta)
    n, D = size(x0s)
    H = Int(horizon)
    ts = collect(T, (0:H) .* T(dt))
    p = Vector{T}(theta)
    grads = [zeros(T, length(p)) for _ in 1:Threads.nthreads()]
    Threads.@threads :static for i in 1:n
        prob = trajectory_problem(model, x0s, p, noise, i, ts, Val(D))
        alg = _algorithm(model, solver)
        sol = solve(prob, alg; saveat=ts, dt=T(dt), adaptive=adaptive, abstol=abstol, reltol=reltol)
        ubar = [
            SVector{D + 1}(ntuple(j -> j <= D ? T(states_bar[i, k, j]) :
                                       (k > 1 ? T(costs_bar[i, k-1]) : zero(T)) - (k <= H ? T(costs_bar[i, k]) : zero(T)),
                Val(D + 1))) for k in 1:(H+1)
        ]
        dgdu(out, u, p, t, k) = (out .= ubar[k]; nothing)
        _, dp = adjoint_sensitivities(sol, alg; t=ts, dgdu_discrete=dgdu, sensealg=sensitivity(sensealg),
            abstol=abstol, reltol=reltol)
        grads[Threads.threadid()] .+= vec(dp)
    end
    return sum(grads)
end

end # module
