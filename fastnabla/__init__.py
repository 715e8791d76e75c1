"""fastnabla: fast ∇-GFlowNet (residual ∇-DB) finetuning of diffusion models toward differentiable rewards.

The two public building blocks a trainer needs (ALGORITHM §4):

- ``transition_coefficients(scheduler, timesteps, eta)``: the affine transition of a diffusers sampler;
- ``residual_db_loss(out, out_ref, ...)``: the per-transition residual ∇-DB loss (Triton on CUDA);
  ``residual_db_loss_cfg(out_uncond, out_cond, w, out_ref, ...)`` fuses classifier-free guidance into it.
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _checkout_kernels() -> None:
    """Bind ``fastnabla.kernels`` to the repository's ``kernels/`` folder when running from a checkout.

    An installed package has the folder copied in as ``fastnabla/kernels`` (setup.py's package_dir) and needs
    nothing. The folder has no ``__init__.py``, so it never imports as a top-level ``kernels`` package in front of
    Hugging Face's (processes started from the repository root have the root on sys.path); without one, neither
    a bare checkout nor the editable install's finder can map it, so it is registered here.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    folder = _os.path.join(_os.path.dirname(here), "kernels")
    if _os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(_os.path.join(folder, "residual_db.py")):
        return
    spec = _importlib_util.spec_from_loader(__name__ + ".kernels", None, is_package=True)
    spec.submodule_search_locations = [folder]
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    globals()["kernels"] = module


_checkout_kernels()

from fastnabla._dependency_logs import quiet_dependency_logs  # noqa: E402
from fastnabla.loss import residual_db_loss, residual_db_loss_cfg  # noqa: E402
from fastnabla.transitions import TransitionCoefficients, transition_coefficients  # noqa: E402

quiet_dependency_logs()

__version__ = "0.1.0"
__all__ = ["residual_db_loss", "residual_db_loss_cfg", "transition_coefficients", "TransitionCoefficients", "__version__"]
