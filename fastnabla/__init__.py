"""fastnabla: fast ∇-GFlowNet (residual ∇-DB) finetuning of diffusion models toward differentiable rewards.

The two public building blocks a trainer needs (ALGORITHM §4):

- ``transition_coefficients(scheduler, timesteps, eta)``: the affine transition of a diffusers sampler;
- ``residual_db_loss(out, out_ref, ...)``: the per-transition residual ∇-DB loss (Triton on CUDA).
"""
from fastnabla.loss import residual_db_loss
from fastnabla.transitions import TransitionCoefficients, transition_coefficients

__version__ = "0.1.0"
__all__ = ["residual_db_loss", "transition_coefficients", "TransitionCoefficients", "__version__"]
