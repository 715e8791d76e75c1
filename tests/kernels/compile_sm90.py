"""Compile the residual ∇-DB kernels for an H100 (sm_90) down to a cubin, without a GPU.

The interpreter executes kernels as NumPy and accepts code the GPU compiler rejects (scoping of constexpr
branches, scalar-argument handling, dtype promotion). Run as a script with TRITON_INTERPRET unset; prints
"compiled N" on success. Used by tests/kernels/test_residual_db.py::test_kernels_compile_for_sm90.
"""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run with TRITON_INTERPRET unset: the interpreter replaces the compiler")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastnabla.kernels import residual_db as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SCALAR_PTRS = ("co_ptr", "iv_ptr", "cx_ptr", "term_ptr", "pw_ptr", "stats_ptr")
INT_ARGS = ("B", "N", "CHUNK", "n_blocks", "s_go")


def compile_kernel(fn, consts, cd, dt):
    """cd: compute dtype of loss/partials/upstream gradient; dt: dtype of the sample tensors."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("loss_ptr", "part_ptr", "go_ptr"):
            sig[name] = "*" + cd
        elif name in SCALAR_PTRS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dt
        elif name in INT_ARGS or name.startswith("s_"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return triton.compile(ASTSource(fn, sig, consts), target=TARGET, options={"num_warps": 4})


ALL_ON = dict(CFG=True, STRENGTH=True, FLOW_NEXT=True, TERMINAL=True, REVERSE=True, REV_REF=True, FLOW_CUR=True,
              TRUST=True, RETURNS=False, WEIGHT=True, STATS=True, G_OUT=True, G_FN=True, G_FC=True, FINALIZE=False)
LAMBDA_ONE = dict(ALL_ON, CFG=False, STRENGTH=False, REVERSE=False, REV_REF=False, FLOW_CUR=False, TRUST=False,
                  WEIGHT=False, STATS=False, G_FC=False, FINALIZE=True)
# the returns recipe (ALGORITHM §5b): λ = 1, no reverse residual, L_A instead of L_T
RETURNS = dict(ALL_ON, STRENGTH=False, REVERSE=False, REV_REF=False, FLOW_CUR=False, G_FC=False, RETURNS=True)
NOTHING = {k: False for k in ALL_ON}


def main():
    n = 0
    for dt, cd, f64 in (("bf16", "fp32", False), ("fp32", "fp32", False), ("fp64", "fp64", True)):
        for flags in (ALL_ON, LAMBDA_ONE, RETURNS, NOTHING) if dt == "bf16" else (ALL_ON,):
            compile_kernel(K._residual_db_fwd_kernel, dict(BLOCK=1024, F64=f64, **flags), cd, dt)
            n += 1
        # a one-element sample: Triton specialises an integer argument equal to 1 into a constant
        compile_kernel(K._residual_db_fwd_kernel, dict(BLOCK=16, F64=f64, N=1, CHUNK=16, **ALL_ON), cd, dt)
        n += 1
        for returns in (False, True) if dt == "bf16" else (False,):
            compile_kernel(K._residual_db_reduce_kernel, dict(BLOCK_B=128, F64=f64, FLOW_NEXT=True, TERMINAL=True,
                                                              REVERSE=not returns, TRUST=True, RETURNS=returns,
                                                              STATS=True), cd, dt)
            n += 1
        compile_kernel(K._scale_grads_kernel, dict(BLOCK=1024, F64=f64, G_OUT=True, OUT1=True, OUT2=True, FN=True,
                                                   FC=True), cd, dt)
        n += 1
    print(f"compiled {n}")


if __name__ == "__main__":
    main()
