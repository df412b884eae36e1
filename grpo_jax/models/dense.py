"""The decoder's weight matmuls, `dense(x, w)`: x [..., K] @ w [K, N] -> [..., N].

Two things set them apart from a plain einsum:

- Their outputs are named `DENSE_NAME` (`jax.ad_checkpoint.checkpoint_name`), so a remat policy
  can keep them whatever computes them (`transformer._REMAT_POLICIES["dots"]`).
- On CPU the weight gradient dW = x^T @ dy (a contraction over the token axis, the leading axis
  of both operands) is written as a plain [M, K] x [K, N] matmul on an explicitly transposed copy
  of the narrower of x and dy. Left to itself, XLA:CPU ran these products as Eigen dots (outside
  the XNNPACK/YNNPACK matmul fusions that run everything else), after transposing copies of the
  wide operand, e.g. the [tokens, 2 * d_ff] gate/up gradient (the train step's figures:
  docs/performance.md, "Weight gradients on CPU"). Accelerators run transposed operands
  natively (cuBLAS, the TPU MXU), so there the plain einsum's gradient is used.

Which form a model uses is `ModelConfig.cpu_weight_grad`, set from `grpo_jax.platform` on the
host: nothing here asks JAX for its backend while tracing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

DENSE_NAME = "dense"


def dense(x, w, *, cpu_weight_grad: bool = False):
    """x [..., K] @ w [K, N] -> [..., N] (dtype of the operands), output named `DENSE_NAME`.

    `cpu_weight_grad`: the weight gradient as a plain matmul on a transposed copy (module
    docstring), for XLA:CPU. Same values either way.
    """
    y = _dense_transposed_grad(x, w) if cpu_weight_grad else _matmul(x, w)
    return checkpoint_name(y, DENSE_NAME)


def _matmul(x, w):
    return jnp.einsum("...k,kn->...n", x, w)


@jax.custom_vjp
def _dense_transposed_grad(x, w):
    return _matmul(x, w)


def _fwd(x, w):
    return _matmul(x, w), (x, w)


def _materialized_transpose(a_MN):
    # The barrier keeps XLA from folding the transpose back into the matmul's dimension numbers
    # (which would recreate the contraction over the leading axes this function avoids).
    return jax.lax.optimization_barrier(a_MN.T)


def _bwd(residuals, dy):
    x, w = residuals
    k, n = w.shape
    dx = jnp.einsum("...n,kn->...k", dy, w)
    x_TK, dy_TN = x.reshape(-1, k), dy.reshape(-1, n)
    if k <= n:
        dw = _materialized_transpose(x_TK) @ dy_TN
    else:  # transpose the narrower dy; the [N, K] result's transpose is weight-sized, not token-sized
        dw = (_materialized_transpose(dy_TN) @ x_TK).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense_transposed_grad.defvjp(_fwd, _bwd)
