r"""The optional Julia backend (``backend="julia"``): DifferentialEquations.jl, DiffEqGPU.jl and SciMLSensitivity.jl
through juliacall, with the Julia package PyDSO.jl in the repository's ``julia/`` folder.

* :class:`JuliaBackend` implements :class:`~pydso.backends.AbstractBackend` for ODE and SDE problems: ensembles with
  ``EnsembleThreads`` (CPU) or ``EnsembleGPUKernel`` (GPU, float32/float64), running costs as an augmented state,
  pathwise gradients as SciMLSensitivity vector-Jacobian products (``InterpolatingAdjoint`` by default).
* :func:`translate_problem` / :func:`translate_function` turn the problem's JAX vector field, drift, diffusion and
  running cost into Julia source (a documented subset of primitives, :data:`SUPPORTED_PRIMITIVES`); a
  :class:`JuliaModel` carries that source, or Julia source written by hand.
* :func:`julia_unavailable_reason` / :func:`require_julia` check for juliacall and a Julia executable without
  importing juliacall; selecting ``backend="julia"`` without them raises one :class:`~pydso.ProblemError` that says
  what to install. Importing this module never starts Julia.
"""

from ._backend import JuliaBackend as JuliaBackend
from ._backend import default_project as default_project
from ._backend import julia_backend as julia_backend
from ._backend import julia_unavailable_reason as julia_unavailable_reason
from ._backend import require_julia as require_julia
from ._translate import SUPPORTED_PRIMITIVES as SUPPORTED_PRIMITIVES
from ._translate import JuliaModel as JuliaModel
from ._translate import ThetaLeaf as ThetaLeaf
from ._translate import theta_layout as theta_layout
from ._translate import translate_function as translate_function
from ._translate import translate_problem as translate_problem

__all__ = [
    "JuliaBackend",
    "JuliaModel",
    "ThetaLeaf",
    "SUPPORTED_PRIMITIVES",
    "default_project",
    "julia_backend",
    "julia_unavailable_reason",
    "require_julia",
    "theta_layout",
    "translate_function",
    "translate_problem",
]
