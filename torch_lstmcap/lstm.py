"""The LSTM and its hand-written gradient.

One step of the LSTM, for a batch of N inputs x: (N, D) and a state prev_h, prev_c: (N, H):

    a = x @ Wx + prev_h @ Wh + b                  (N, 4H), the four gate blocks in GATE_ORDER
    i, f, o = sigmoid(a_i), sigmoid(a_f), sigmoid(a_o)
    g = tanh(a_g)
    next_c = f * prev_c + i * g
    next_h = o * tanh(next_c)

`lstm_step` runs one step (`LSTMStepFunction`) and `lstm_forward` a whole sequence
(`LSTMSequenceFunction`); both carry a backward written by hand and checked against autograd
in the tests. `LSTM` is the layer that holds Wx: (D, 4H), Wh: (H, 4H) and b: (4H,) and converts
to and from `torch.nn.LSTM`.

On CPU in float32 and float64, `LSTMSequenceFunction` runs the gate arithmetic of each step
in a fused C++ kernel, built on first use with torch.utils.cpp_extension and cached by torch;
the PyTorch operations it replaces stay as the reference the tests check it against, and run
when the kernel cannot be built, for other dtypes and devices, and when the environment sets
LSTMCAP_FUSED=0. On CPU in float32 the matrix products go through oneDNN
(`torch_lstmcap.products`), as torch.nn.LSTM's do; LSTMCAP_FUSED=0 puts them back on torch.mm.

Both Functions compute in the dtype of their inputs. Under `torch.autocast` the public
functions first cast every floating input to the autocast dtype, so the forward and the
backward run in that one dtype. The backwards are not themselves differentiable: asking for a
second derivative raises an error.
"""

import contextlib
import functools
import hashlib
import logging
import math
import os
import subprocess

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .products import PLAIN_PYTORCH_ENV, add_matmul_, addmm, linear_for, matmul

__all__ = [
    "GATE_ORDER",
    "LSTM",
    "LSTMSequenceFunction",
    "LSTMStepFunction",
    "lstm_forward",
    "lstm_step",
    "split_gates",
]

logger = logging.getLogger(__name__)

GATE_ORDER = ("i", "f", "o", "g")
"""The order of the four H-wide gate blocks along the last dimension of a, Wx, Wh and b."""

# torch.nn.LSTM stacks the same four blocks as i, f, g, o.
_TORCH_GATE_ORDER = ("i", "f", "g", "o")

# g is last, so the three sigmoid gates i, f, o form one contiguous block [0, 3H) that a single
# sigmoid_ call activates, and the tanh gate g is the block [3H, 4H).
_INPUT_GATE = GATE_ORDER.index("i")
_FORGET_GATE = GATE_ORDER.index("f")
_OUTPUT_GATE = GATE_ORDER.index("o")
_TANH_GATE = GATE_ORDER.index("g")


def split_gates(a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split gate blocks into views, in GATE_ORDER.

    Args:
        a: (..., 4H) pre-activations, activated gates or their gradients.

    Returns:
        The views (i, f, o, g), each (..., H).
    """
    return a.chunk(len(GATE_ORDER), dim=-1)


def _activate_gates_(a: Tensor) -> Tensor:
    """Apply sigmoid to i, f, o and tanh to g, in place. a: (..., 4H)."""
    split = _TANH_GATE * (a.shape[-1] // len(GATE_ORDER))
    a[..., :split].sigmoid_()
    a[..., split:].tanh_()
    return a


# The fused kernel: one pass over the rows of a step's (N, 4H) gate block per step, forward and
# backward, in place of the separate PyTorch operations of LSTMSequenceFunction, whose comments
# carry the derivation. Rows may be strided (a step's slice of the (N, T, .) buffers); columns
# must be contiguous. Written with ATen's vector types, so that one source serves float32 and
# float64, with AVX2 where the CPU has it. Its sigmoid and tanh round differently from
# torch.sigmoid and torch.tanh by an ulp or two, well inside the tests' tolerances.
_FUSED_SOURCE = r"""
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace {

using at::vec::Vectorized;

// sigmoid(a) = 1 / (1 + exp(-a)) with ATen's fast exp: a polynomial within 2 ulp for float,
// Sleef's exp for double. The polynomial turns NaN into a number, so NaN is passed through:
// a NaN must reach the loss.
template <typename scalar_t>
Vectorized<scalar_t> sigmoid(Vectorized<scalar_t> a) {
  const auto s = (Vectorized<scalar_t>(1) + a.neg().exp_u20()).reciprocal();
  return Vectorized<scalar_t>::blendv(s, a, a.isnan());
}

// tanh(a) = 2 sigmoid(2a) - 1: one exp instead of Sleef's tanh, which made the forward step
// twice as slow. Exact to a few ulp of 1: about 1e-7 in float32 and 1e-16 in float64.
template <typename scalar_t>
Vectorized<scalar_t> tanh(Vectorized<scalar_t> a) {
  const Vectorized<scalar_t> one(1), two(2);
  return two * sigmoid(two * a) - one;
}

// Calls f(j, count) for the columns [j, j + count) of an H-wide gate block, in vector-wide
// chunks and one shorter tail.
template <typename scalar_t, typename F>
void for_each_chunk(int64_t H, const F& f) {
  constexpr int64_t width = Vectorized<scalar_t>::size();
  int64_t j = 0;
  for (; j + width <= H; j += width) f(j, width);
  if (j < H) f(j, H - j);
}

void check_rows(const at::Tensor& t, const at::Tensor& gates, int64_t cols, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == gates.size(0) && t.size(1) == cols &&
                  t.stride(1) == 1 && t.scalar_type() == gates.scalar_type() && t.is_cpu(),
              name, ": expected a CPU tensor (N, ", cols, ") with contiguous rows like gates");
}

// Rows per thread at least, so that a thread gets some 32768 elements, the grain of ATen's own
// element-wise kernels: small batches stay on one thread.
int64_t row_grain(int64_t H) {
  return std::max<int64_t>(1, 32768 / (4 * H));
}

// The loop of LSTMSequenceFunction.forward for one step t, row by row, with the equations of
// the module docstring: a_t = (x_t Wx + b) + prev_h Wh from its two parts, the input part
// `gates` and the recurrent part; activate it into `gates`, then next_c = f * prev_c + i * g,
// tanh(next_c) and next_h = o * tanh(next_c).
void forward_step(const at::Tensor& gates, const at::Tensor& recurrent,
                  const at::Tensor& prev_c, const at::Tensor& next_c,
                  const at::Tensor& tanh_next_c, const at::Tensor& next_h) {
  const int64_t N = gates.size(0), H = gates.size(1) / 4;
  check_rows(gates, gates, 4 * H, "gates");
  check_rows(recurrent, gates, 4 * H, "recurrent");
  check_rows(prev_c, gates, H, "prev_c");
  check_rows(next_c, gates, H, "next_c");
  check_rows(tanh_next_c, gates, H, "tanh_next_c");
  check_rows(next_h, gates, H, "next_h");
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_forward_step", [&] {
    using Vec = Vectorized<scalar_t>;
    at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* a = gates.data_ptr<scalar_t>() + n * gates.stride(0);
        const scalar_t* r = recurrent.data_ptr<scalar_t>() + n * recurrent.stride(0);
        const scalar_t* c_in = prev_c.data_ptr<scalar_t>() + n * prev_c.stride(0);
        scalar_t* c_out = next_c.data_ptr<scalar_t>() + n * next_c.stride(0);
        scalar_t* tanh_c = tanh_next_c.data_ptr<scalar_t>() + n * tanh_next_c.stride(0);
        scalar_t* h_out = next_h.data_ptr<scalar_t>() + n * next_h.stride(0);
        for_each_chunk<scalar_t>(H, [&](int64_t j, int64_t count) {
          // Gate blocks i, f, o, g at [0, H), [H, 2H), [2H, 3H), [3H, 4H) (GATE_ORDER).
          Vec i = sigmoid(Vec::loadu(a + j, count) + Vec::loadu(r + j, count));
          Vec f = sigmoid(Vec::loadu(a + H + j, count) + Vec::loadu(r + H + j, count));
          Vec o = sigmoid(Vec::loadu(a + 2 * H + j, count) + Vec::loadu(r + 2 * H + j, count));
          Vec g = tanh(Vec::loadu(a + 3 * H + j, count) + Vec::loadu(r + 3 * H + j, count));
          Vec c = f * Vec::loadu(c_in + j, count) + i * g;
          Vec tanh_cv = tanh(c);
          i.store(a + j, count);
          f.store(a + H + j, count);
          o.store(a + 2 * H + j, count);
          g.store(a + 3 * H + j, count);
          c.store(c_out + j, count);
          tanh_cv.store(tanh_c + j, count);
          // The same single product as the PyTorch path, so the backward's recomputed
          // prev_h = o * tanh(c) matches next_h bit for bit.
          (o * tanh_cv).store(h_out + j, count);
        });
      }
    });
  });
}

// The loop of LSTMSequenceFunction.backward for one step t, row by row, from the activated
// gates, c_{t-1}, tanh(c_t) and dh = grad_h + grad_h_next (the gradient of the output h_t and
// the one through the step after, da_{t+1} Wh^T, as two parts): dc += dh * o (1 - tanh(c_t)^2),
// the path through h_t = o * tanh(c_t); then da = (dc * local_i, dc * local_f, dh * local_o,
// dc * local_g) with the local factors derived in the backward's comments; then dc <- dc * f,
// the gradient reaching c_{t-1}.
void backward_step(const at::Tensor& gates, const at::Tensor& prev_c,
                   const at::Tensor& tanh_next_c, const at::Tensor& grad_h,
                   const at::Tensor& grad_h_next, const at::Tensor& grad_c,
                   const at::Tensor& grad_gates) {
  const int64_t N = gates.size(0), H = gates.size(1) / 4;
  check_rows(gates, gates, 4 * H, "gates");
  check_rows(prev_c, gates, H, "prev_c");
  check_rows(tanh_next_c, gates, H, "tanh_next_c");
  check_rows(grad_h, gates, H, "grad_h");
  check_rows(grad_h_next, gates, H, "grad_h_next");
  check_rows(grad_c, gates, H, "grad_c");
  check_rows(grad_gates, gates, 4 * H, "grad_gates");
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_backward_step", [&] {
    using Vec = Vectorized<scalar_t>;
    const Vec one(1);
    at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* a = gates.data_ptr<scalar_t>() + n * gates.stride(0);
        const scalar_t* c_in = prev_c.data_ptr<scalar_t>() + n * prev_c.stride(0);
        const scalar_t* tanh_c = tanh_next_c.data_ptr<scalar_t>() + n * tanh_next_c.stride(0);
        const scalar_t* dh_row = grad_h.data_ptr<scalar_t>() + n * grad_h.stride(0);
        const scalar_t* dh_next = grad_h_next.data_ptr<scalar_t>() + n * grad_h_next.stride(0);
        scalar_t* dc_row = grad_c.data_ptr<scalar_t>() + n * grad_c.stride(0);
        scalar_t* da = grad_gates.data_ptr<scalar_t>() + n * grad_gates.stride(0);
        for_each_chunk<scalar_t>(H, [&](int64_t j, int64_t count) {
          Vec i = Vec::loadu(a + j, count);
          Vec f = Vec::loadu(a + H + j, count);
          Vec o = Vec::loadu(a + 2 * H + j, count);
          Vec g = Vec::loadu(a + 3 * H + j, count);
          Vec tanh_cv = Vec::loadu(tanh_c + j, count);
          Vec dh = Vec::loadu(dh_row + j, count) + Vec::loadu(dh_next + j, count);
          // dc += dh * cell_from_h, cell_from_h = o (1 - tanh(c_t)^2)
          Vec dc = Vec::loadu(dc_row + j, count) + dh * o * (one - tanh_cv * tanh_cv);
          // local_i = g i (1 - i)
          (dc * g * i * (one - i)).store(da + j, count);
          // local_f = c_{t-1} f (1 - f)
          (dc * Vec::loadu(c_in + j, count) * f * (one - f)).store(da + H + j, count);
          // local_o = tanh(c_t) o (1 - o), times dh: o reaches the loss only through h_t
          (dh * tanh_cv * o * (one - o)).store(da + 2 * H + j, count);
          // local_g = i (1 - g^2)
          (dc * i * (one - g * g)).store(da + 3 * H + j, count);
          // dc_{t-1} = dc * f
          (dc * f).store(dc_row + j, count);
        });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("forward_step(Tensor(a!) gates, Tensor recurrent, Tensor prev_c, Tensor(b!) next_c, "
        "Tensor(c!) tanh_next_c, Tensor(d!) next_h) -> ()", &forward_step);
  m.def("backward_step(Tensor gates, Tensor prev_c, Tensor tanh_next_c, Tensor grad_h, "
        "Tensor grad_h_next, Tensor(a!) grad_c, Tensor(b!) grad_gates) -> ()", &backward_step);
}
"""

# Limitation: the fused kernel is CPU-only and float32/float64-only; bfloat16 and CUDA run the
# gate arithmetic as separate PyTorch operations.
_FUSED_DTYPES = (torch.float32, torch.float64)


def _fused_cflags() -> list[str]:
    """Compiler flags: optimised, OpenMP for at::parallel_for (torch's own OpenMP runtime runs
    it), and the widest vectors torch itself uses on this CPU, AVX-512 or AVX2 (ATen's vector
    types then use them, with Sleef's exp from libtorch)."""
    flags = ["-O3", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
        return [*flags, *avx512, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if capability == "AVX2":
        return [*flags, "-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return [*flags, "-DCPU_CAPABILITY=DEFAULT"]


@functools.cache
def _fused_ops() -> object | None:
    """Build (on first use; torch caches the build) and load the fused kernel.

    Returns:
        The namespace of the kernel's ops under torch.ops, or None when it cannot be built.
    """
    flags = _fused_cflags()
    key = "\n".join([torch.__version__, _FUSED_SOURCE, *flags])
    # The source's hash in the name: an edited source builds anew instead of loading a stale one.
    name = f"torch_lstmcap_gates_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    logger.info("loading the fused LSTM kernel %s (built on first use)", name)
    try:
        # On a machine without CUDA, importing torch's extension builder warns that it found no
        # CUDA runtime; this kernel is CPU-only, so the warning says nothing to the user.
        builder_log = logging.getLogger("torch.utils.cpp_extension")
        level = builder_log.level
        builder_log.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load_inline
        finally:
            builder_log.setLevel(level)

        # The kernel includes only the ATen headers it needs: torch/extension.h alone would
        # take most of a minute to compile.
        load_inline(
            name,
            _FUSED_SOURCE,
            extra_cflags=flags,
            is_python_module=False,
            no_implicit_headers=True,
        )
    except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning(
            "the fused LSTM kernel is unavailable, using PyTorch operations instead: %s", error
        )
        return None
    return getattr(torch.ops, name)


def _fused_ops_for(x: Tensor) -> object | None:
    """The fused kernel's ops when they apply to x (CPU, float32 or float64, not disabled by
    LSTMCAP_FUSED=0, and built), else None."""
    if x.device.type != "cpu" or x.dtype not in _FUSED_DTYPES:
        return None
    if os.environ.get(PLAIN_PYTORCH_ENV, "1") == "0":
        return None
    return _fused_ops()


def _shape_text(dims: str, sizes: tuple[int, ...]) -> str:
    return f"{dims} = {sizes}" if sizes else dims


def _check(name: str, tensor: object, dims: str, sizes: tuple[int, ...], like: Tensor) -> None:
    """Raise ValueError unless tensor is a tensor of the given sizes on like's dtype and device.

    dims names the dimensions, e.g. "(N, H)", for the message.
    """
    expected = _shape_text(dims, sizes)
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a tensor of shape {expected}, got {type(tensor)}")
    if tuple(tensor.shape) != sizes:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    if tensor.dtype != like.dtype:
        raise ValueError(f"{name} must have dtype {like.dtype} like x, got {tensor.dtype}")
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on device {like.device} like x, got {tensor.device}")


def _check_input(x: object, dims: str) -> Tensor:
    """Check that x is a floating tensor with len(dims) dimensions; return it."""
    ndim = dims.count(",") + 1
    if not isinstance(x, Tensor) or x.dim() != ndim:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x)
        raise ValueError(f"x must have shape {dims}, got {got}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got {x.dtype}")
    return x


def _check_recurrent_weight(Wh: object, x: Tensor) -> int:
    """Check Wh: (H, 4H) against x's dtype and device; return H."""
    if not isinstance(Wh, Tensor) or Wh.dim() != 2 or Wh.shape[1] != 4 * Wh.shape[0]:
        got = tuple(Wh.shape) if isinstance(Wh, Tensor) else type(Wh)
        raise ValueError(f"Wh must have shape (H, 4H), got {got}")
    H = Wh.shape[0]
    if H == 0:
        raise ValueError("Wh must have shape (H, 4H) with H >= 1, got (0, 0)")
    _check("Wh", Wh, "(H, 4H)", (H, 4 * H), x)
    return H


def _check_weights(Wx: object, Wh: object, b: object, x: Tensor) -> int:
    """Check Wx: (D, 4H), Wh: (H, 4H), b: (4H,) against x: (..., D); return H."""
    H = _check_recurrent_weight(Wh, x)
    _check("Wx", Wx, "(D, 4H)", (x.shape[-1], 4 * H), x)
    _check("b", b, "(4H,)", (4 * H,), x)
    return H


def _autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast the floating tensors to the autocast dtype when autocast is on for their device.

    Casting before the Function (not inside it) records the casts in the graph, so gradients
    reach float32 parameters in their own dtype, while forward and backward both run in the
    autocast dtype.
    """
    device_type = tensors[0].device.type if isinstance(tensors[0], Tensor) else "cpu"
    if not torch.amp.is_autocast_available(device_type):
        return tensors
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors
    )


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast on device, so the Functions compute in their inputs' dtype.

    Where it is off already, nothing is entered: entering torch.autocast costs tens of
    microseconds, and a decoder runs a step Function for every word it writes.
    """
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class LSTMStepFunction(torch.autograd.Function):
    """One LSTM step with a hand-written backward.

    forward(x, prev_h, prev_c, Wx, Wh, b, packed_Wh) -> (next_h, next_c)
        x: (N, D), prev_h: (N, H), prev_c: (N, H), Wx: (D, 4H), Wh: (H, 4H), b: (4H,)
        next_h: (N, H), next_c: (N, H)

    With Wx and b None, x is the input part of the pre-activation, x @ Wx + b: (N, 4H),
    already computed (a decoder looks it up per word; see ``lstm_step``). packed_Wh, if not
    None, is ``products.pack_weight(Wh.t())``, which the forward product reads in place of Wh.

    The gate arithmetic is one pass of the fused kernel where it applies, as in the sequence
    Function, instead of seven element-wise operations, each a pass over memory and a
    parallel region of its own: a beam search runs a step for every word it writes.
    """

    @staticmethod
    def forward(ctx, x, prev_h, prev_c, Wx, Wh, b, packed_Wh=None):
        projected = Wx is None and b is None
        _check_input(x, "(N, 4H)" if projected else "(N, D)")
        H = _check_recurrent_weight(Wh, x) if projected else _check_weights(Wx, Wh, b, x)
        N = x.shape[0]
        if projected:
            _check("x", x, "(N, 4H)", (N, 4 * H), x)
        _check("prev_h", prev_h, "(N, H)", (N, H), x)
        _check("prev_c", prev_c, "(N, H)", (N, H), x)
        if packed_Wh is not None:
            _check("packed_Wh", packed_Wh, "(4H, H)", (4 * H, H), x)

        product = linear_for(x)
        fused = _fused_ops_for(x)
        with _autocast_off(x.device):
            if fused is not None:
                # One pass of the fused kernel: it adds the input part of the pre-activation
                # to the recurrent one as it reads them and writes the activated gates over the
                # recurrent product, a fresh tensor (the input part may be the caller's x).
                gates = matmul(prev_h, Wh, product, packed=packed_Wh)  # (N, 4H)
                input_part = x.contiguous() if projected else matmul(x, Wx, product, b)
                next_c, tanh_next_c, next_h = (prev_c.new_empty(N, H) for _ in range(3))
                fused.forward_step(
                    gates, input_part, prev_c.contiguous(), next_c, tanh_next_c, next_h
                )
            else:
                if projected:
                    gates = addmm(x, prev_h, Wh, product, packed_Wh)  # (N, 4H)
                else:
                    input_part = matmul(x, Wx, product, b)
                    gates = add_matmul_(input_part, prev_h, Wh, product, packed_Wh)
                _activate_gates_(gates)
                i, f, o, g = split_gates(gates)
                next_c = torch.addcmul(f * prev_c, i, g)
                tanh_next_c = next_c.tanh()
                next_h = o * tanh_next_c

        ctx.product = product
        ctx.save_for_backward(x, prev_h, prev_c, Wx, Wh, gates, tanh_next_c)
        return next_h, next_c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_next_h, grad_next_c):
        x, prev_h, prev_c, Wx, Wh, gates, tanh_next_c = ctx.saved_tensors
        # packed_Wh, a seventh input when given, is a copy of Wh's values and takes no gradient.
        need_x, need_prev_h, need_prev_c, need_Wx, need_Wh, need_b = ctx.needs_input_grad[:6]
        grad_x = grad_prev_h = grad_prev_c = grad_Wx = grad_Wh = grad_b = None

        with _autocast_off(x.device):
            i, f, o, g = split_gates(gates)

            # next_c reaches the loss directly and through next_h = o * tanh(next_c):
            # dnext_c += dnext_h * o * tanh'(next_c), with tanh' = 1 - tanh^2 from the saved
            # tanh(next_c).
            dnext_c = torch.addcmul(grad_next_c, grad_next_h, o * (1 - tanh_next_c.square()))

            # Gradients with respect to the activated gates:
            #   next_h = o * tanh(next_c)          ->  do = dnext_h * tanh(next_c)
            #   next_c = f * prev_c + i * g        ->  di = dnext_c * g
            #                                          df = dnext_c * prev_c
            #                                          dg = dnext_c * i
            grad_gates = torch.empty_like(gates)
            di, df, do, dg = split_gates(grad_gates)
            torch.mul(dnext_c, g, out=di)
            torch.mul(dnext_c, prev_c, out=df)
            torch.mul(grad_next_h, tanh_next_c, out=do)
            torch.mul(dnext_c, i, out=dg)

            # Through the nonlinearities, with derivatives from the saved outputs:
            #   sigmoid'(a) = s * (1 - s) for s in i, f, o;  tanh'(a_g) = 1 - g^2.
            # grad_gates becomes da, the gradient of the pre-activation a.
            split = _TANH_GATE * gates.shape[1] // len(GATE_ORDER)
            sigmoid_gates = gates[:, :split]
            grad_gates[:, :split].mul_(sigmoid_gates * (1 - sigmoid_gates))
            dg.mul_(1 - g.square())
            da = grad_gates

            # a = x @ Wx + prev_h @ Wh + b, so each gradient is one matrix product; with Wx
            # and b None, a = x + prev_h @ Wh and dx = da.
            product = ctx.product
            if need_x:
                grad_x = da if Wx is None else matmul(da, Wx.t(), product)
            if need_prev_h:
                grad_prev_h = matmul(da, Wh.t(), product)
            if need_Wx:
                grad_Wx = matmul(x.t(), da, product)
            if need_Wh:
                grad_Wh = matmul(prev_h.t(), da, product)
            if need_b:
                grad_b = da.sum(0)
            # next_c = f * prev_c + ...  ->  dprev_c = dnext_c * f
            if need_prev_c:
                grad_prev_c = dnext_c * f

        return grad_x, grad_prev_h, grad_prev_c, grad_Wx, grad_Wh, grad_b, None


class LSTMSequenceFunction(torch.autograd.Function):
    """An LSTM over a whole sequence with a hand-written backward.

    forward(x, h0, c0, Wx, Wh, b) -> (h, h_n, c_n)
        x: (N, T, D), h0: (N, H), c0: (N, H), Wx: (D, 4H), Wh: (H, 4H), b: (4H,)
        h: (N, T, H) the hidden state of every step, h_n: (N, H) and c_n: (N, H) the last state.

    The input projection x @ Wx + b of all T steps is one matrix product before the loop; each
    step adds prev_h @ Wh in place into its slice of that buffer and activates it there, so the
    buffer ends up holding the activated gates the backward needs. The backward loop produces
    da for every step; after it, dx is one matrix product and dWx, dWh and db together another.

    Saved for the backward: x, h0, Wx, Wh, the gates (N, T, 4H), the cell states entering each
    step (N, T, H) and their tanh (N, T, H). The hidden states are not saved: the backward
    recomputes prev_h = o * tanh(c) of the step before, bit for bit.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, Wx, Wh, b):
        _check_input(x, "(N, T, D)")
        N, T, D = x.shape
        if T == 0:
            raise ValueError("x must have shape (N, T, D) with T >= 1, got T = 0")
        H = _check_weights(Wx, Wh, b, x)
        _check("h0", h0, "(N, H)", (N, H), x)
        _check("c0", c0, "(N, H)", (N, H), x)

        product = linear_for(x)
        with _autocast_off(x.device):
            gates = matmul(x.reshape(N * T, D), Wx, product, b).view(N, T, 4 * H)
            # cells[:, t] is the cell state entering step t; the state after the last step,
            # c_n, is kept apart because the backward does not need it.
            cells = x.new_empty(N, T, H)
            cells[:, 0] = c0
            c_n = x.new_empty(N, H)
            tanh_cells = x.new_empty(N, T, H)
            h = x.new_empty(N, T, H)

            # The gate arithmetic of a step is one pass of the fused kernel where it applies;
            # otherwise (the reference) it is separate PyTorch operations, each a pass over
            # memory and, with several threads, a parallel region of its own.
            fused = _fused_ops_for(x)
            prev_h = h0
            for t in range(T):
                a = gates[:, t]
                next_c = cells[:, t + 1] if t + 1 < T else c_n
                if fused is not None:
                    # The kernel adds the recurrent part prev_h Wh to a as it reads it.
                    recurrent = matmul(prev_h, Wh, product)
                    fused.forward_step(a, recurrent, cells[:, t], next_c, tanh_cells[:, t], h[:, t])
                else:
                    add_matmul_(a, prev_h, Wh, product)
                    _activate_gates_(a)
                    i, f, o, g = split_gates(a)
                    torch.mul(f, cells[:, t], out=next_c)
                    next_c.addcmul_(i, g)
                    torch.tanh(next_c, out=tanh_cells[:, t])
                    torch.mul(o, tanh_cells[:, t], out=h[:, t])
                prev_h = h[:, t]

        ctx.fused_ops = fused
        ctx.product = product
        ctx.save_for_backward(x, h0, Wx, Wh, gates, cells, tanh_cells)
        return h, h[:, -1].clone(), c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, grad_h_n, grad_c_n):
        x, h0, Wx, Wh, gates, cells, tanh_cells = ctx.saved_tensors
        need_x, need_h0, need_c0, need_Wx, need_Wh, need_b = ctx.needs_input_grad
        grad_x = grad_h0 = grad_c0 = grad_Wx = grad_Wh = grad_b = None
        N, T, D = x.shape
        H = Wh.shape[0]
        split = _TANH_GATE * H

        with _autocast_off(x.device):
            i, f, o, g = split_gates(gates)  # each (N, T, H)
            sigmoid_gates = gates[..., :split]

            # Per step, with dh the gradient reaching h_t (from the output h and, through
            # a_{t+1} = x_{t+1} Wx + h_t Wh + b, from the step after) and dc the gradient
            # reaching c_t from the step after (dc_{t+1} * f_{t+1}):
            #   h_t = o * tanh(c_t)         ->  do = dh * tanh(c_t)
            #                                   and the path into the cell gradient through h_t:
            #                                   dc += dh * o * (1 - tanh(c_t)^2)
            #   c_t = f * c_{t-1} + i * g   ->  di = dc * g,  df = dc * c_{t-1},  dg = dc * i,
            #                                   dc_{t-1} = dc * f
            # and through the nonlinearities, from the saved outputs, into da:
            #   sigmoid'(a) = s (1 - s) for s in i, f, o;  tanh'(a_g) = 1 - g^2.
            # So da = (dc * local_i, dc * local_f, dh * local_o, dc * local_g) with
            #   local_i = g i (1 - i),  local_f = c_{t-1} f (1 - f),
            #   local_o = tanh(c_t) o (1 - o),  local_g = i (1 - g^2),
            # and dc += dh * cell_from_h with cell_from_h = o (1 - tanh(c_t)^2). None of these
            # factors depends on dh or dc: they are computed here for all steps at once, in a
            # few large operations, and the loop over time multiplies local by dc and dh in
            # place, turning it into da without a buffer of its own. The fused kernel computes
            # the same factors as it goes, in one pass per step, into a buffer for da.
            fused, product = ctx.fused_ops, ctx.product
            if fused is None:
                local = torch.empty_like(gates)
                local_i, local_f, local_o, local_g = split_gates(local)
                torch.addcmul(
                    sigmoid_gates, sigmoid_gates, sigmoid_gates, value=-1, out=local[..., :split]
                )
                local_i.mul_(g)
                local_f.mul_(cells)
                local_o.mul_(tanh_cells)
                torch.mul(i, g, out=local_g)
                torch.addcmul(i, local_g, g, value=-1, out=local_g)
                cell_from_h = torch.mul(o, tanh_cells)
                torch.addcmul(o, cell_from_h, tanh_cells, value=-1, out=cell_from_h)
                da = local
                # i and f are adjacent in GATE_ORDER, so one broadcast product covers both.
                local_if = local[..., _INPUT_GATE * H : (_FORGET_GATE + 1) * H]
            else:
                da = torch.empty_like(gates)
                # The kernel reads rows with unit stride.
                grad_h, grad_h_n = grad_h.contiguous(), grad_h_n.contiguous()

            dc = grad_c_n.clone(memory_format=torch.contiguous_format)
            Wh_t = Wh.t()
            for t in reversed(range(T)):
                if fused is not None:
                    # The kernel adds the two parts of dh as it reads them.
                    grad_h_next = grad_h_n if t == T - 1 else matmul(da[:, t + 1], Wh_t, product)
                    fused.backward_step(
                        gates[:, t],
                        cells[:, t],
                        tanh_cells[:, t],
                        grad_h[:, t],
                        grad_h_next,
                        dc,
                        da[:, t],
                    )
                else:
                    if t == T - 1:
                        dh = grad_h[:, t] + grad_h_n
                    else:
                        dh = addmm(grad_h[:, t], da[:, t + 1], Wh_t, product)
                    dc.addcmul_(dh, cell_from_h[:, t])
                    local_if[:, t].view(N, 2, H).mul_(dc.unsqueeze(1))
                    local_g[:, t].mul_(dc)
                    local_o[:, t].mul_(dh)
                    dc.mul_(f[:, t])

            # a = x Wx + prev_h Wh + b over all steps, so
            #   dx = da Wx^T,   dWx = x^T da,   dWh = prev_h^T da,   db = 1^T da.
            # The three weight gradients share their right factor da: they are one product,
            # [x | prev_h | 1]^T da, which reads da once and sums db on the way.
            da_flat = da.view(N * T, 4 * H)
            if need_x:
                grad_x = matmul(da_flat, Wx.t(), product).view(N, T, D)
            if need_h0:
                grad_h0 = matmul(da[:, 0], Wh_t, product)
            if need_c0:
                grad_c0 = dc
            widths = {"Wx": D * need_Wx, "Wh": H * need_Wh, "b": int(need_b)}
            if any(widths.values()):
                left = x.new_empty(N * T, sum(widths.values()))
                columns = dict(zip(widths, left.split(list(widths.values()), dim=1), strict=True))
                if need_Wx:
                    columns["Wx"].copy_(x.reshape(N * T, D))
                if need_Wh:
                    # prev_h: h0, then h_t = o * tanh(c_t) of every step but the last,
                    # recomputed with the forward's single product, so bit for bit.
                    prev_h = columns["Wh"].view(N, T, H)
                    prev_h[:, 0] = h0
                    torch.mul(o[:, :-1], tanh_cells[:, :-1], out=prev_h[:, 1:])
                if need_b:
                    columns["b"].fill_(1)
                weight_grads = matmul(left.t(), da_flat, product)  # (D + H + 1, 4H), as needed
                parts = weight_grads.split(list(widths.values()), dim=0)
                grad_Wx, grad_Wh, grad_b = (
                    part if widths[name] else None for name, part in zip(widths, parts, strict=True)
                )
                if need_b:
                    grad_b = grad_b.view(4 * H)

        return grad_x, grad_h0, grad_c0, grad_Wx, grad_Wh, grad_b


def lstm_step(
    x: Tensor,
    prev_h: Tensor,
    prev_c: Tensor,
    Wx: Tensor | None,
    Wh: Tensor,
    b: Tensor | None,
    packed_Wh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run one LSTM step.

    Args:
        x: (N, D) input; or, with Wx and b None, (N, 4H) its part of the pre-activation,
            x @ Wx + b, computed beforehand. A decoder whose inputs are word embeddings can
            keep that product for every word of its vocabulary and look rows up.
        prev_h: (N, H) previous hidden state.
        prev_c: (N, H) previous cell state.
        Wx: (D, 4H) input weights, gate blocks in GATE_ORDER; or None.
        Wh: (H, 4H) recurrent weights, gate blocks in GATE_ORDER.
        b: (4H,) bias, gate blocks in GATE_ORDER; None exactly when Wx is.
        packed_Wh: ``products.pack_weight(Wh.t())``: (4H, H), or None. A decoder that steps
            many times with the same Wh packs it once, and oneDNN's product reads it without
            copying Wh into its own layout at every step (same values, less time).

    Returns:
        next_h: (N, H) and next_c: (N, H).

    Raises:
        ValueError: an argument has the wrong shape, dtype or device.
    """
    inputs = _autocast_inputs(x, prev_h, prev_c, Wx, Wh, b)
    if inputs[4] is not Wh:
        packed_Wh = None  # autocast cast Wh to another dtype; the packed copy is the old one
    return LSTMStepFunction.apply(*inputs, packed_Wh)


def lstm_forward(
    x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor, c0: Tensor | None = None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Run an LSTM over a batch of sequences.

    Args:
        x: (N, T, D) inputs, batch first.
        h0: (N, H) initial hidden state.
        Wx: (D, 4H) input weights, gate blocks in GATE_ORDER.
        Wh: (H, 4H) recurrent weights, gate blocks in GATE_ORDER.
        b: (4H,) bias, gate blocks in GATE_ORDER.
        c0: (N, H) initial cell state; zeros when None.

    Returns:
        h: (N, T, H) the hidden state after every step, and (h_n, c_n): (N, H) each, the
        state after the last step.

    Raises:
        ValueError: an argument has the wrong shape, dtype or device.
    """
    if c0 is None and isinstance(h0, Tensor):
        c0 = torch.zeros_like(h0)
    h, h_n, c_n = LSTMSequenceFunction.apply(*_autocast_inputs(x, h0, c0, Wx, Wh, b))
    return h, (h_n, c_n)


def _reorder_gates(weight: Tensor, source: tuple[str, ...], target: tuple[str, ...]) -> Tensor:
    """Permute the four gate blocks along dim 0 of weight: (4H, ...) from source to target."""
    blocks = weight.chunk(len(source), dim=0)
    return torch.cat([blocks[source.index(gate)] for gate in target], dim=0)


class LSTM(nn.Module):
    """A single-layer, batch-first LSTM on `lstm_forward`.

    Parameters: Wx: (D, 4H), Wh: (H, 4H), b: (4H,), gate blocks in GATE_ORDER. Wx and Wh are
    drawn from uniform(-1/sqrt(H), 1/sqrt(H)) as in torch.nn.LSTM; b is zero except the forget
    gate block, which starts at forget_bias (1.0 by default) so that early in training the cell
    keeps its state instead of forgetting it.

    Args:
        input_size: D.
        hidden_size: H.
        forget_bias: initial value of the forget gate bias.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        forget_bias: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.forget_bias = forget_bias
        self.Wx = nn.Parameter(torch.empty(input_size, 4 * hidden_size, **factory))
        self.Wh = nn.Parameter(torch.empty(hidden_size, 4 * hidden_size, **factory))
        self.b = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.Wx.uniform_(-bound, bound)
            self.Wh.uniform_(-bound, bound)
            self.b.zero_()
            split_gates(self.b)[GATE_ORDER.index("f")].fill_(self.forget_bias)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the layer over x.

        Args:
            x: (N, T, D) inputs.
            state: (h0, c0), each (N, H); zeros when None.

        Returns:
            h: (N, T, H) and (h_n, c_n), each (N, H).
        """
        if state is None:
            h0 = x.new_zeros(x.shape[0], self.hidden_size)
            c0 = h0
        else:
            h0, c0 = state
        return lstm_forward(x, h0, self.Wx, self.Wh, self.b, c0=c0)

    @classmethod
    def from_torch(cls, module: nn.LSTM) -> "LSTM":
        """Build an LSTM with the weights of a single-layer, unidirectional torch.nn.LSTM.

        The layer is batch first whatever module.batch_first says; the two biases of
        torch.nn.LSTM are summed into b.

        Raises:
            ValueError: module has more than one layer, two directions or a projection.
        """
        if module.num_layers != 1 or module.bidirectional or module.proj_size != 0:
            raise ValueError(
                "from_torch needs a single-layer, unidirectional nn.LSTM without projection, "
                f"got num_layers={module.num_layers}, bidirectional={module.bidirectional}, "
                f"proj_size={module.proj_size}"
            )
        weight_ih = module.weight_ih_l0.detach()
        layer = cls(
            module.input_size, module.hidden_size, device=weight_ih.device, dtype=weight_ih.dtype
        )
        with torch.no_grad():
            layer.Wx.copy_(_reorder_gates(weight_ih, _TORCH_GATE_ORDER, GATE_ORDER).t())
            layer.Wh.copy_(
                _reorder_gates(module.weight_hh_l0.detach(), _TORCH_GATE_ORDER, GATE_ORDER).t()
            )
            if module.bias:
                bias = module.bias_ih_l0.detach() + module.bias_hh_l0.detach()
                layer.b.copy_(_reorder_gates(bias, _TORCH_GATE_ORDER, GATE_ORDER))
            else:
                layer.b.zero_()
        return layer

    def to_torch(self) -> nn.LSTM:
        """Return a batch-first torch.nn.LSTM computing the same function.

        b goes into bias_ih_l0; bias_hh_l0 is zero.
        """
        module = nn.LSTM(
            self.input_size,
            self.hidden_size,
            batch_first=True,
            device=self.Wx.device,
            dtype=self.Wx.dtype,
        )
        with torch.no_grad():
            module.weight_ih_l0.copy_(_reorder_gates(self.Wx.t(), GATE_ORDER, _TORCH_GATE_ORDER))
            module.weight_hh_l0.copy_(_reorder_gates(self.Wh.t(), GATE_ORDER, _TORCH_GATE_ORDER))
            module.bias_ih_l0.copy_(_reorder_gates(self.b, GATE_ORDER, _TORCH_GATE_ORDER))
            module.bias_hh_l0.zero_()
        return module
