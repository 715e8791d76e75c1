"""fastnabla: fast ∇-GFlowNet (residual ∇-DB) finetuning of diffusion models toward differentiable rewards.

The two public building blocks a trainer needs (ALGORITHM §4):

- ``transition_coefficients(scheduler, timesteps, eta)``: the affine transition of a diffusers sampler;
- ``residual_db_loss(out, out_ref, ...)``: the per-transition residual ∇-DB loss (Triton on CUDA);
  ``residual_db_loss_cfg(out_uncond, out_cond, w, out_ref, ...)`` fuses classifier-free guidance into it.
"""
from fastnabla.loss import residual_db_loss, residual_db_loss_cfg
from fastnabla.transitions import TransitionCoefficients, transition_coefficients

__version__ = "0.1.0"
__all__ = ["residual_db_loss", "residual_db_loss_cfg", "transition_coefficients", "TransitionCoefficients", "__version__"]
