"""The output projection's product, with a weight gradient on XLA CPU's fast matmul path.

Autodiff writes the gradient of x @ w with respect to w as one dot contracting the rows of
both operands. For a vocabulary-wide w, XLA's CPU backend runs that form on a slower kernel
than the same product with x transposed first, so the output projection uses `matmul`, whose
backward transposes x first (the chunked loss head calls `transposed` itself). For the blocks'
own layers (F <= 4·D) the two forms run alike. On accelerators the transpose is the plain one
autodiff would have folded away. No benchmark times the two forms alone;
`benchmarks/train_step_vs_torch.py` times the CPU train step they are part of.
"""

from __future__ import annotations

import jax
from jax import Array


def transposed(x_ND: Array) -> Array:
    """x.T; on a CPU materialised, so that XLA does not fold it back into the consuming dot."""
    if jax.default_backend() == "cpu":
        return jax.lax.optimization_barrier(x_ND.T)
    return x_ND.T


@jax.custom_vjp
def matmul(x_ND: Array, w_DF: Array) -> Array:
    """x [N, D] @ w [D, F]: autodiff's value and gradients, the w gradient as transposed(x) @ g."""
    return x_ND @ w_DF


def _matmul_fwd(x_ND, w_DF):
    return matmul(x_ND, w_DF), (x_ND, w_DF)


def _matmul_bwd(residuals, g_NF):
    x_ND, w_DF = residuals
    dx_ND = jax.lax.dot_general(g_NF, w_DF, (((1,), (1,)), ((), ())))
    return dx_ND.astype(x_ND.dtype), (transposed(x_ND) @ g_NF).astype(w_DF.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
