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

oneDNN first copies a plain weight into its own blocked layout, at every product. A weight
read many times without changing, as a decoder's are at every step of a search, can be copied
once with `pack_weight` and passed beside the plain one (``packed=``); the products then give
the same numbers, in much less time where the rows are few (a beam search over one
photograph), where that copy is most of the product's work.

`PackedConv2d` does the same for a convolution of the image encoder's inference copy, with
the ReLU6 after it applied by oneDNN as the convolution writes its output.
"""

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "add_matmul_",
    "addmm",
    "linear",
    "linear_for",
    "matmul",
    "onednn_linear",
    "pack_weight",
    "PackedConv2d",
    "values_key",
]

PLAIN_PYTORCH_ENV = "LSTMCAP_FUSED"
"""Set to 0, the package runs plain PyTorch operations only: no fused kernel, no oneDNN."""

# Limitation: the oneDNN operations below are torch's private ones (torch.ops.mkldnn.*, as
# torch.compile uses them); requirements.txt pins the torch they were written against. Where
# one is missing, its caller falls back to torch's own operation, but a changed signature
# would raise instead.


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


@functools.cache
def _onednn_reorder() -> object | None:
    """oneDNN's weight packing as torch exposes it, or None where this torch build lacks it."""
    if onednn_linear() is None:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight.default
    except (AttributeError, RuntimeError):
        return None


def linear_for(x: Tensor) -> object | None:
    """oneDNN's product when it applies to x (CPU, float32, not switched off), else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if os.environ.get(PLAIN_PYTORCH_ENV, "1") == "0":
        return None
    return onednn_linear()


def pack_weight(weight: Tensor) -> Tensor | None:
    """weight: (P, K) copied into oneDNN's blocked layout, for products ``x @ weight^T`` that
    read it many times; None where oneDNN does not apply to it (see ``linear_for``).

    The copy holds the values the weight has now: pack again after changing it. It carries
    no gradient.
    """
    reorder = _onednn_reorder()
    if reorder is None or linear_for(weight) is None or weight.dim() != 2:
        return None
    with torch.no_grad():
        return reorder(weight.detach().contiguous(), None)


def values_key(tensor: Tensor) -> tuple:
    """A key that changes whenever tensor's values may have: its storage, dtype, device and
    version counter, for copies such as packed weights to be made again.

    A tensor made under inference_mode has no version counter (None here); it can only be
    changed in place under inference_mode, unseen by the key.
    """
    version = None if tensor.is_inference() else tensor._version
    return tensor.data_ptr(), version, tensor.dtype, tensor.device


def _weight_t(b: Tensor, packed: Tensor | None) -> Tensor:
    """The (P, K) operand of oneDNN's product for a @ b, b: (K, P): packed, if given."""
    if packed is None:
        return b.t()
    if tuple(packed.shape) != (b.shape[1], b.shape[0]):
        raise ValueError(
            f"packed weight {tuple(packed.shape)} is not the transpose of {tuple(b.shape)}"
        )
    return packed


def matmul(
    a: Tensor,
    b: Tensor,
    op: object | None,
    bias: Tensor | None = None,
    packed: Tensor | None = None,
) -> Tensor:
    """a @ b (+ bias): a (M, K), b (K, P), bias (P,) -> (M, P), through the oneDNN op from
    linear_for, or torch's own product when op is None.

    packed: ``pack_weight(b.t())``, read by oneDNN in place of b; ignored when op is None.
    """
    if op is not None:
        return op(a, _weight_t(b, packed), bias, "none", [], "")
    return a @ b if bias is None else torch.addmm(bias, a, b)


def addmm(
    input: Tensor, a: Tensor, b: Tensor, op: object | None, packed: Tensor | None = None
) -> Tensor:
    """input + a @ b, a new tensor: input (M, P), a (M, K), b (K, P); packed as in matmul."""
    if op is None:
        return torch.addmm(input, a, b)
    return op(a, _weight_t(b, packed), None, "none", [], "").add_(input)


def add_matmul_(
    out: Tensor, a: Tensor, b: Tensor, op: object | None, packed: Tensor | None = None
) -> Tensor:
    """out += a @ b in place: out (M, P), a (M, K), b (K, P); packed as in matmul."""
    if op is None:
        return out.addmm_(a, b)
    return out.add_(op(a, _weight_t(b, packed), None, "none", [], ""))


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


def linear(x: Tensor, weight: Tensor, bias: Tensor, packed: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through oneDNN where linear_for(x) applies.

    Args:
        x: (..., K); weight: (P, K); bias: (P,).
        packed: ``pack_weight(weight)``, read in place of weight when no gradient is
            recorded (the backward needs the plain weight).

    Returns:
        (..., P).
    """
    op = linear_for(x) if weight.dtype == bias.dtype == x.dtype else None
    if op is None or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if packed is not None and not torch.is_grad_enabled():
        y = matmul(rows, weight.t(), op, bias, packed)
    else:
        y = LinearFunction.apply(rows, weight, bias, op)
    return y.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def _onednn_convolution() -> tuple[object, object] | None:
    """oneDNN's convolution with a fused activation and its weight packing, as torch exposes
    them, or None where this torch build lacks them."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return (
            torch.ops.mkldnn._convolution_pointwise.default,
            torch._C._nn.mkldnn_reorder_conv2d_weight,
        )
    except (AttributeError, RuntimeError):
        return None


class PackedConv2d(nn.Module):
    """A 2-d convolution, optionally followed by ReLU6, for inference on the CPU in float32.

    oneDNN runs it on a copy of the weight in its own blocked layout, made once for each input
    shape it meets (the best layout depends on the batch size; a few shapes are kept) and
    made again after the weight changes, and clips to [0, 6] as it writes the output instead
    of in a second pass over it. It runs F.conv2d on the plain weight, which it keeps, where
    ``applies_to`` the weight no longer holds (the module moved with ``to()``, or
    LSTMCAP_FUSED=0), where a gradient is asked for (oneDNN's operation has no backward), and
    under torch.jit.trace, torch.export and torch.compile.

    Args:
        weight: (C', C / groups, kh, kw); bias: (C',) or None; stride, padding, dilation,
            groups: as for F.conv2d (padding on both sides of each dimension);
        relu6: clip the output to [0, 6].
    """

    MAX_PACKED_SHAPES = 4

    def __init__(
        self, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups, relu6
    ):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups = groups
        self.relu6 = relu6
        self._packed: dict[tuple, Tensor] = {}

    @staticmethod
    def applies_to(weight: Tensor) -> bool:
        """Whether a convolution with this weight can run on oneDNN here: CPU, float32, a
        torch with oneDNN, and not switched off by LSTMCAP_FUSED=0."""
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return False
        return os.environ.get(PLAIN_PYTORCH_ENV, "1") != "0" and _onednn_convolution() is not None

    def _packed_weight(self, input_shape: tuple[int, ...]) -> Tensor:
        weight = self.weight
        key = (*values_key(weight), input_shape)  # loading or changing the weight packs again
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= self.MAX_PACKED_SHAPES:
                self._packed.clear()
            _, reorder = _onednn_convolution()
            with torch.no_grad():
                plain = weight.contiguous().to_mkldnn()
                geometry = (self.padding, self.stride, self.dilation, self.groups)
                packed = reorder(plain, *geometry, list(input_shape))
            self._packed[key] = packed
        return packed

    def __getstate__(self) -> dict:
        # oneDNN's tensors cannot be copied or pickled: a copy packs its own weights.
        return {**self.__dict__, "_packed": {}}

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C', H', W'), channels-last from oneDNN."""
        weight, bias = self.weight, self.bias
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        # Tracing and export record F.conv2d: they cannot follow the packed weights.
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if self.applies_to(weight) and self.applies_to(x) and not (wants_grad or tracing):
            op, _ = _onednn_convolution()
            packed = self._packed_weight(tuple(x.shape))
            geometry = (self.padding, self.stride, self.dilation, self.groups)
            attr, scalars = ("hardtanh", [0.0, 6.0]) if self.relu6 else ("none", [])
            return op(x, packed, bias, *geometry, attr, scalars, "")
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu6(y) if self.relu6 else y
