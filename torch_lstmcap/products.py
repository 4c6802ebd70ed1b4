"""Matrix products on the CPU through oneDNN, where torch's own go through MKL.

torch.mm and F.linear on the CPU call MKL, which on AMD processors runs its AVX2 code even
where the CPU has AVX-512; oneDNN (which torch.nn.LSTM and the convolutions already use)
picks its kernels by the instruction set alone. On the 2-core AMD EPYC development machine
oneDNN's products take 0.45-0.5x the time of MKL's at the LSTM's and the output layer's
shapes. On Intel processors MKL runs its AVX-512 code and the gap should be small (not
measured).

`linear_for(x)` says whether oneDNN applies to x (CPU, float32, not switched off by
LSTMCAP_FUSED=0, the switch that puts the whole package on plain PyTorch operations);
`matmul`, `addmm` and `add_matmul_` take what it returns and fall back to torch's own
product when it is None. `linear` is F.linear with a hand-written backward over the same
products, for the captioner's output layer.
"""

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["add_matmul_", "addmm", "linear", "linear_for", "matmul", "onednn_linear"]

PLAIN_PYTORCH_ENV = "LSTMCAP_FUSED"
"""Set to 0, the package runs plain PyTorch operations only: no fused kernel, no oneDNN."""


@functools.cache
def onednn_linear() -> object | None:
    """oneDNN's product as torch exposes it, ``op(a, w, bias, "none", [], "") = a @ w^T +
    bias`` for a (M, K), w (P, K) of any strides, or None where this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def linear_for(x: Tensor) -> object | None:
    """oneDNN's product when it applies to x (CPU, float32, not switched off), else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if os.environ.get(PLAIN_PYTORCH_ENV, "1") == "0":
        return None
    return onednn_linear()


def matmul(a: Tensor, b: Tensor, op: object | None, bias: Tensor | None = None) -> Tensor:
    """a @ b (+ bias): a (M, K), b (K, P), bias (P,) -> (M, P), through the oneDNN op from
    linear_for, or torch's own product when op is None."""
    if op is not None:
        return op(a, b.t(), bias, "none", [], "")
    return a @ b if bias is None else torch.addmm(bias, a, b)


def addmm(input: Tensor, a: Tensor, b: Tensor, op: object | None) -> Tensor:
    """input + a @ b, a new tensor: input (M, P), a (M, K), b (K, P)."""
    if op is None:
        return torch.addmm(input, a, b)
    return op(a, b.t(), None, "none", [], "").add_(input)


def add_matmul_(out: Tensor, a: Tensor, b: Tensor, op: object | None) -> Tensor:
    """out += a @ b in place: out (M, P), a (M, K), b (K, P)."""
    if op is None:
        return out.addmm_(a, b)
    return out.add_(op(a, b.t(), None, "none", [], ""))


class LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b through oneDNN, x: (M, K), W: (P, K), b: (P,) -> y: (M, P).

    dx = dy @ W, dW = dy^T @ x, db = dy summed over the rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, op: object) -> Tensor:
        ctx.op = op
        ctx.save_for_backward(x, weight)
        return op(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        op = ctx.op
        need_x, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_x = matmul(grad_y, weight, op) if need_x else None
        grad_weight = matmul(grad_y.t(), x, op) if need_weight else None
        grad_bias = grad_y.sum(0) if need_bias else None
        return grad_x, grad_weight, grad_bias, None


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """F.linear(x, weight, bias), through oneDNN where linear_for(x) applies.

    Args:
        x: (..., K); weight: (P, K); bias: (P,).

    Returns:
        (..., P).
    """
    op = linear_for(x) if weight.dtype == bias.dtype == x.dtype else None
    if op is None or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    return LinearFunction.apply(rows, weight, bias, op).view(*x.shape[:-1], weight.shape[0])
