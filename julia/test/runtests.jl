# Tests of PyDSO.jl (run with `julia --project=julia -e 'using Pkg; Pkg.test()'`). They need Julia and the
# packages of Project.toml; pydso's CI has neither, so CI only parses this file (tests/test_julia_syntax.py).
using PyDSO
using StaticArrays
using LinearAlgebra
using FiniteDiff
using Test

@testset "PyDSO.jl" begin
    @testset "translated-code helpers follow the JAX layout" begin
        theta = collect(1.0:10.0)
        # a JAX (2, 3) leaf at offset 1 is the Julia (3, 2) array of the same memory
        W = PyDSO.leaf(theta, 1, (3, 2))
        @test size(W) == (3, 2)
        @test W[:, 1] == [2.0, 3.0, 4.0]  # JAX row 0
        @test PyDSO.leaf(theta, 0, ()) == 1.0
        @test PyDSO.leaf(SVector{10}(theta), 1, (3, 2)) == W
        x = [1.0, -2.0, 0.5]
        # W @ x in JAX (W of shape (2, 3)) is tensordot(x, Wj, (1,), (1,)) = transpose(Wj) * x
        @test PyDSO.tensordot(x, W, (1,), (1,)) ≈ [dot(W[:, 1], x), dot(W[:, 2], x)]
        @test PyDSO.tensordot(x, x, (1,), (1,)) ≈ dot(x, x)
        A = reshape(collect(1.0:24.0), 2, 3, 4)
        B = reshape(collect(1.0:12.0), 4, 3)
        C = PyDSO.tensordot(A, B, (3, 2), (1, 2))
        @test C ≈ [sum(A[i, j, k] * B[k, j] for j in 1:3, k in 1:4) for i in 1:2]
        @test PyDSO.slice(x, (2,), (3,), (1,)) == [-2.0, 0.5]
        @test PyDSO.stack((1.0, 2.0), 1) == SVector(1.0, 2.0)
        @test PyDSO.stack(([1.0, 2.0], [3.0, 4.0]), 2) == [1.0 3.0; 2.0 4.0]
        @test PyDSO.concatenate(([1.0], [2.0, 3.0]), 1) == [1.0, 2.0, 3.0]
        @test PyDSO.broadcast_in_dim(2.0, (3,), ()) == fill(2.0, 3)
        @test PyDSO.broadcast_in_dim([1.0, 2.0], (2, 3), (1,)) == [1.0 1.0 1.0; 2.0 2.0 2.0]
        @test PyDSO.reshape(collect(1.0:6.0), (3, 2))[:, 2] == [4.0, 5.0, 6.0]
        @test PyDSO.reshape([7.0], ()) == 7.0
        @test PyDSO.reduce_sum(reshape(collect(1.0:6.0), 3, 2), (1,)) == [6.0, 15.0]
        @test PyDSO.select_n(true, 1.0, 2.0) == 2.0
        @test PyDSO.logistic(0.0) == 0.5
    end

    # dx/dt = -a x, running cost x^2: x(t) = x0 exp(-a t), interval cost x0^2 (exp(-2a t_k) - exp(-2a t_k+1)) / 2a
    source = """
    decay(t, x, theta) = SVector(-theta[1] * x[1])
    square(t, x, theta) = x[1]^2
    noise(t, x, theta) = 0.0
    """
    a, dt, H = 0.7, 0.05, 20
    x0s = reshape([1.0, -0.5, 2.0], 3, 1)
    ts = (0:H) .* dt

    @testset "ODE ensemble: states and running costs against the closed form" begin
        model = load_model(source, "ode", "decay", "square", nothing)
        states, costs = solve_ensemble(model, x0s, [a], nothing; dt=dt, horizon=H, adaptive=true, abstol=1e-12,
            reltol=1e-12)
        @test size(states) == (3, H + 1, 1)
        @test size(costs) == (3, H)
        for i in 1:3
            x0 = x0s[i, 1]
            @test states[i, :, 1] ≈ x0 .* exp.(-a .* ts) rtol = 1e-8
            exact = x0^2 .* (exp.(-2a .* ts[1:end-1]) .- exp.(-2a .* ts[2:end])) ./ (2a)
            @test costs[i, :] ≈ exact rtol = 1e-8
        end
    end

    @testset "VJP with respect to theta against finite differences" begin
        model = load_model(source, "ode", "decay", "square", nothing)
        sbar = randn(3, H + 1, 1)
        cbar = randn(3, H)
        loss(th) = begin
            s, c = solve_ensemble(model, x0s, th, nothing; dt=dt, horizon=H, adaptive=true, abstol=1e-12,
                reltol=1e-12)
            sum(s .* sbar) + sum(c .* cbar)
        end
        g = vjp_ensemble(model, x0s, [a], nothing, sbar, cbar; dt=dt, horizon=H, adaptive=true, abstol=1e-12,
            reltol=1e-12)
        @test g ≈ FiniteDiff.finite_difference_gradient(loss, [a]) rtol = 1e-5
    end

    @testset "SDE with zero noise increments is the Euler scheme of the ODE" begin
        model = load_model(source, "sde", "decay", "square", "noise")
        noise = zeros(3, H, 1)
        states, costs = solve_ensemble(model, x0s, [a], noise; dt=dt, horizon=H)
        for i in 1:3
            @test states[i, :, 1] ≈ x0s[i, 1] .* (1 - a * dt) .^ (0:H) rtol = 1e-10
            @test costs[i, :] ≈ dt .* states[i, 1:H, 1] .^ 2 rtol = 1e-10
        end
    end
end
