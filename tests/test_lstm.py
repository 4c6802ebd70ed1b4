"""Tests of the hand-written LSTM: gradcheck, parity with autograd and torch.nn.LSTM, gate order,
partial gradients, grad modes, layouts, dtypes, autocast, argument errors and CUDA.

Every test runs twice: with the fused CPU kernel of the sequence Function and on its PyTorch
path (LSTMCAP_FUSED=0), the reference the kernel is checked against."""

import logging
import math

import pytest
import torch
from torch import nn

from torch_lstmcap import lstm as lstm_module
from torch_lstmcap import products
from torch_lstmcap.lstm import (
    GATE_ORDER,
    LSTM,
    LSTMSequenceFunction,
    LSTMStepFunction,
    lstm_forward,
    lstm_step,
)

CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
)
DEVICES = ["cpu", CUDA]
INPUT_NAMES = ("x", "h0", "c0", "Wx", "Wh", "b")


@pytest.fixture(autouse=True, params=["fused", "pytorch"])
def gate_path(request, monkeypatch):
    """Run the test with the fused kernel, or on the PyTorch path; skip the fused run when the
    kernel cannot be built here (the library then logs a warning and uses the PyTorch path)."""
    if request.param == "pytorch":
        monkeypatch.setenv("LSTMCAP_FUSED", "0")
    else:
        monkeypatch.delenv("LSTMCAP_FUSED", raising=False)
        if lstm_module._fused_ops() is None:
            pytest.skip("the fused LSTM kernel does not build here")
    return request.param


def make_inputs(N, T, D, H, dtype=torch.float64, device="cpu", seed=0):
    """Random (x: (N, T, D), h0, c0: (N, H), Wx: (D, 4H), Wh: (H, 4H), b: (4H,)), leaves."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(N, T, D), (N, H), (N, H), (D, 4 * H), (H, 4 * H), (4 * H,)]
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64)
        .to(device=device, dtype=dtype)
        .requires_grad_()
        for shape in shapes
    ]


def reference_lstm(x, h0, c0, Wx, Wh, b):
    """The LSTM written out from its definition, gates at [0,H) i, [H,2H) f, [2H,3H) o,
    [3H,4H) g, differentiated by autograd. Returns h: (N, T, H), h_n, c_n: (N, H)."""
    H = h0.shape[1]
    prev_h, prev_c = h0, c0
    hs = []
    for t in range(x.shape[1]):
        a = x[:, t] @ Wx + prev_h @ Wh + b
        i = torch.sigmoid(a[:, :H])
        f = torch.sigmoid(a[:, H : 2 * H])
        o = torch.sigmoid(a[:, 2 * H : 3 * H])
        g = torch.tanh(a[:, 3 * H :])
        prev_c = f * prev_c + i * g
        prev_h = o * torch.tanh(prev_c)
        hs.append(prev_h)
    return torch.stack(hs, dim=1), prev_h, prev_c


def ours(x, h0, c0, Wx, Wh, b):
    h, (h_n, c_n) = lstm_forward(x, h0, Wx, Wh, b, c0=c0)
    return h, h_n, c_n


def step_loop(x, h0, c0, Wx, Wh, b):
    prev_h, prev_c = h0, c0
    hs = []
    for t in range(x.shape[1]):
        prev_h, prev_c = lstm_step(x[:, t], prev_h, prev_c, Wx, Wh, b)
        hs.append(prev_h)
    return torch.stack(hs, dim=1), prev_h, prev_c


def outputs_and_grads(fn, inputs, seed=1):
    """Run fn on inputs, backpropagate random gradients of h, h_n and c_n; return
    (outputs, gradients of the inputs, None where an input needs none)."""
    outputs = fn(*inputs)
    generator = torch.Generator().manual_seed(seed)
    grads = [
        torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out) for out in outputs
    ]
    wanted = [tensor for tensor in inputs if tensor.requires_grad]
    computed = iter(torch.autograd.grad(outputs, wanted, grads))
    input_grads = [next(computed) if tensor.requires_grad else None for tensor in inputs]
    return [out.detach() for out in outputs], input_grads


def assert_all_close(actual, expected, **tolerance):
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if e is None:
            assert a is None, f"item {index}"
        else:
            torch.testing.assert_close(a, e, msg=lambda m, i=index: f"item {i}: {m}", **tolerance)


@pytest.mark.parametrize("N, D, H", [(1, 3, 1), (2, 3, 4), (3, 1, 2), (1, 1, 1)])
def test_step_gradcheck(N, D, H):
    x, h, c, Wx, Wh, b = make_inputs(N, 1, D, H)
    x = x[:, 0].detach().requires_grad_()
    assert torch.autograd.gradcheck(LSTMStepFunction.apply, (x, h, c, Wx, Wh, b))


@pytest.mark.parametrize("N, H", [(1, 1), (3, 2)])
def test_step_gradcheck_with_the_input_gates_given(N, H):
    # Wx and b None: x is x @ Wx + b already, (N, 4H), as a decoder's per-word table gives it.
    _, h, c, _, Wh, _ = make_inputs(N, 1, 1, H)
    input_gates = torch.randn(N, 4 * H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LSTMStepFunction.apply, (input_gates, h, c, None, Wh, None))


def test_step_with_the_input_gates_given_equals_the_full_step():
    x, h, c, Wx, Wh, b = make_inputs(3, 1, 5, 4)
    x = x[:, 0].detach().requires_grad_()
    full = lstm_step(x, h, c, Wx, Wh, b)
    full_grads = torch.autograd.grad(sum(out.sum() for out in full), (x, h, c, Wh))
    input_gates = torch.addmm(b, x, Wx)
    given = lstm_step(input_gates, h, c, None, Wh, None)
    given_grads = torch.autograd.grad(sum(out.sum() for out in given), (x, h, c, Wh))
    assert_all_close(given, full, atol=1e-12, rtol=0)
    assert_all_close(given_grads, full_grads, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4H\)"):
        lstm_step(input_gates[:, :-1], h, c, None, Wh, None)


@pytest.mark.parametrize("fused_kernel", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize("given_input_gates", [False, True])
def test_step_with_a_packed_recurrent_weight_is_the_same_step(
    given_input_gates, fused_kernel, gate_path, monkeypatch
):
    # A decoder packs Wh once (products.pack_weight); the step must not change, and its
    # gradients, which read the plain Wh, neither. On the PyTorch path there is no packing.
    # Without the fused kernel, oneDNN's products still read the packed copy.
    if not fused_kernel:
        monkeypatch.setattr(lstm_module, "_fused_ops_for", lambda x: None)
    x, h, c, Wx, Wh, b = make_inputs(3, 1, 5, 4, dtype=torch.float32)
    x = x[:, 0].detach().requires_grad_()
    packed_Wh = products.pack_weight(Wh.t())
    if gate_path == "fused" and products.onednn_linear() is not None:
        assert packed_Wh is not None
    if given_input_gates:
        x, Wx, b = torch.addmm(b, x, Wx).detach().requires_grad_(), None, None
    inputs = [t for t in (x, h, c, Wx, Wh, b) if t is not None]

    plain = lstm_step(x, h, c, Wx, Wh, b)
    plain_grads = torch.autograd.grad(sum(out.sum() for out in plain), inputs)
    packed = lstm_step(x, h, c, Wx, Wh, b, packed_Wh)
    packed_grads = torch.autograd.grad(sum(out.sum() for out in packed), inputs)
    assert_all_close(packed, plain, atol=1e-6, rtol=1e-6)
    assert_all_close(packed_grads, plain_grads, atol=0, rtol=0)
    if packed_Wh is not None:
        # The product reads the packed copy: packing another weight changes the step.
        with torch.no_grad():
            other_Wh = 2 * Wh
            expected = lstm_step(x, h, c, Wx, other_Wh, b)
            got = lstm_step(x, h, c, Wx, Wh, b, products.pack_weight(other_Wh.t()))
        assert_all_close(got, expected, atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The packed copy is float32; under autocast the step casts Wh and leaves it out.
        autocast = lstm_step(x, h, c, Wx, Wh, b, packed_Wh)
    assert autocast[0].dtype == torch.bfloat16
    if packed_Wh is not None:
        with pytest.raises(ValueError, match=r"packed_Wh must have shape \(4H, H\)"):
            lstm_step(x, h, c, Wx, Wh, b, products.pack_weight(Wh))


@pytest.mark.parametrize(
    "N, T, D, H", [(1, 1, 1, 1), (2, 1, 3, 2), (1, 4, 2, 1), (3, 3, 2, 4), (2, 20, 3, 2)]
)
def test_sequence_gradcheck(N, T, D, H):
    inputs = make_inputs(N, T, D, H)
    assert torch.autograd.gradcheck(LSTMSequenceFunction.apply, tuple(inputs))


@pytest.mark.parametrize("fn", [ours, step_loop], ids=["lstm_forward", "lstm_step"])
def test_backward_twice_gives_same_gradients(fn):
    # Through a retained graph, the second backward sees what the first one saw: the backward
    # may not modify what the forward saved.
    inputs = make_inputs(2, 5, 3, 4)
    h, h_n, c_n = fn(*inputs)
    loss = h.sin().sum() + h_n.sum() + c_n.square().sum()
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs)
    assert_all_close(second, first, atol=0, rtol=0)


@pytest.mark.parametrize("fn", [ours, step_loop], ids=["lstm_forward", "lstm_step"])
def test_second_derivative_raises(fn):
    inputs = make_inputs(2, 3, 3, 2)
    h = fn(*inputs)[0]
    (grad_x,) = torch.autograd.grad(h.sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad_x.sum().backward()


def saved_bytes(fn, inputs):
    """Bytes of the distinct storages autograd keeps for the backward of fn(*inputs)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    return sum(storages.values())


def test_sequence_saves_no_more_than_autograd():
    inputs = make_inputs(8, 12, 6, 16)
    ours_bytes = saved_bytes(ours, inputs)
    assert 0 < ours_bytes <= saved_bytes(reference_lstm, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_step_loop_equals_sequence(device):
    inputs = make_inputs(3, 7, 5, 4, device=device)
    expected = outputs_and_grads(ours, inputs)
    actual = outputs_and_grads(step_loop, inputs)
    assert_all_close(actual[0], expected[0], atol=1e-12, rtol=1e-12)
    assert_all_close(actual[1], expected[1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("fn", [ours, step_loop], ids=["lstm_forward", "lstm_step"])
def test_parity_with_autograd(fn, dtype, tol, device):
    inputs = make_inputs(4, 6, 5, 7, dtype=dtype, device=device)
    expected = outputs_and_grads(reference_lstm, inputs)
    actual = outputs_and_grads(fn, inputs)
    assert_all_close(actual[0], expected[0], atol=tol, rtol=tol)
    assert_all_close(actual[1], expected[1], atol=tol, rtol=tol)


def run_on_path(fused, fn, inputs, monkeypatch):
    """outputs_and_grads(fn, inputs) with the fused kernel on or off."""
    monkeypatch.setenv("LSTMCAP_FUSED", "1" if fused else "0")
    return outputs_and_grads(fn, inputs)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    "N, T, D, H",
    # H below, at and past the vector width (its tail), and a batch of rows large enough for
    # the kernel to split it between threads.
    [(3, 5, 4, 7), (2, 3, 5, 8), (5, 4, 3, 19), (64, 3, 9, 130)],
)
@pytest.mark.parametrize("fn", [ours, step_loop], ids=["sequence", "steps"])
def test_fused_kernel_equals_pytorch_path(N, T, D, H, dtype, tol, fn, gate_path, monkeypatch):
    if gate_path != "fused":
        pytest.skip("compares the two paths once")
    inputs = make_inputs(N, T, D, H, dtype=dtype)
    with torch.no_grad():
        for tensor in inputs[3:]:
            tensor.mul_(1 / math.sqrt(H))
    fused = run_on_path(True, fn, inputs, monkeypatch)
    reference = run_on_path(False, fn, inputs, monkeypatch)
    # The kernel's exp and its fused multiply-adds round differently from PyTorch's operations
    # by an ulp or two; a gradient that sums many such terms (dWx over N*T rows) can cancel to
    # a small entry, so the absolute tolerance is relative to the tensor's largest entry.
    pairs = zip([*fused[0], *fused[1]], [*reference[0], *reference[1]], strict=True)
    for actual, expected in pairs:
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


def test_fused_kernel_is_used_unless_disabled(gate_path):
    inputs = make_inputs(2, 3, 4, 5, dtype=torch.float32)
    h = ours(*inputs)[0]
    assert (h.grad_fn.fused_ops is not None) == (gate_path == "fused")
    # Neither bfloat16 nor a device other than the CPU has a fused kernel.
    low = [tensor.detach().bfloat16().requires_grad_() for tensor in inputs]
    assert ours(*low)[0].grad_fn.fused_ops is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_input_gives_nan_state(dtype):
    # A NaN must reach the loss (training stops on it), not be squashed by an activation.
    inputs = [tensor.detach() for tensor in make_inputs(2, 3, 4, 9, dtype=dtype)]
    inputs[0][1, 1, 2] = float("nan")
    h, h_n, c_n = ours(*inputs)
    assert not h[0].isnan().any() and not h[1, 0].isnan().any()
    assert h[1, 1:].isnan().all() and h_n[1].isnan().all() and c_n[1].isnan().all()


def test_fused_kernel_build_failure_falls_back(gate_path, monkeypatch, caplog):
    if gate_path != "fused":
        pytest.skip("one run is enough")
    import torch.utils.cpp_extension

    def failing_build(*args, **kwargs):
        raise RuntimeError("Error building extension: no compiler")

    inputs = make_inputs(2, 4, 3, 5)
    expected = run_on_path(False, ours, inputs, monkeypatch)
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", failing_build)
    lstm_module._fused_ops.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="torch_lstmcap.lstm"):
            first = run_on_path(True, ours, inputs, monkeypatch)
            second = run_on_path(True, ours, inputs, monkeypatch)
    finally:
        lstm_module._fused_ops.cache_clear()
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no compiler" in warnings[0].getMessage()
    for actual in (first, second):
        assert_all_close(actual[0], expected[0], atol=0, rtol=0)
        assert_all_close(actual[1], expected[1], atol=0, rtol=0)


def from_torch_order(weight):
    """Reorder the blocks along dim 0 of an nn.LSTM weight: (4H, ...) from i, f, g, o to i, f,
    o, g."""
    i, f, g, o = weight.chunk(4, dim=0)
    return torch.cat([i, f, o, g], dim=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_parity_with_torch_lstm(dtype, tol, device):
    torch.manual_seed(0)
    module = nn.LSTM(5, 7, batch_first=True).to(device=device, dtype=dtype)
    layer = LSTM.from_torch(module)
    x, h0, c0 = make_inputs(4, 6, 5, 7, dtype=dtype, device=device)[:3]
    torch_params = list(module.parameters())  # weight_ih, weight_hh, bias_ih, bias_hh
    our_params = [layer.Wx, layer.Wh, layer.b]

    def run_torch(x, h0, c0, *params):
        h, (h_n, c_n) = module(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
        return h, h_n.squeeze(0), c_n.squeeze(0)

    def run_ours(x, h0, c0, *params):
        h, (h_n, c_n) = layer(x, (h0, c0))
        return h, h_n, c_n

    expected, expected_grads = outputs_and_grads(run_torch, [x, h0, c0, *torch_params])
    actual, actual_grads = outputs_and_grads(run_ours, [x, h0, c0, *our_params])
    assert_all_close(actual, expected, atol=tol, rtol=tol)
    assert_all_close(actual_grads[:3], expected_grads[:3], atol=tol, rtol=tol)

    grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh = expected_grads[3:]
    torch.testing.assert_close(grad_bias_ih, grad_bias_hh, atol=tol, rtol=tol)
    expected_param_grads = [
        from_torch_order(grad_weight_ih).t(),
        from_torch_order(grad_weight_hh).t(),
        from_torch_order(grad_bias_ih),
    ]
    assert_all_close(actual_grads[3:], expected_param_grads, atol=tol, rtol=tol)


def test_to_torch_round_trip_is_exact():
    layer = LSTM(3, 5)
    module = layer.to_torch()
    assert module.batch_first
    back = LSTM.from_torch(module)
    for name in ("Wx", "Wh", "b"):
        assert torch.equal(getattr(back, name), getattr(layer, name)), name
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(module(x)[0], layer(x)[0], atol=1e-6, rtol=1e-6)


def test_from_torch_without_bias():
    module = nn.LSTM(3, 2, bias=False, batch_first=True)
    layer = LSTM.from_torch(module)
    assert torch.count_nonzero(layer.b) == 0
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(layer(x)[0], module(x)[0])


@pytest.mark.parametrize(
    "module",
    [nn.LSTM(3, 2, num_layers=2), nn.LSTM(3, 2, bidirectional=True), nn.LSTM(3, 4, proj_size=2)],
    ids=["two_layers", "bidirectional", "projection"],
)
def test_from_torch_rejects_other_lstms(module):
    with pytest.raises(ValueError, match="single-layer, unidirectional"):
        LSTM.from_torch(module)


def test_gate_order():
    # With zero weights, a = b, and every gate has its own value. The expected state is written
    # from the definition with plain floats; swapping any two gates changes it.
    assert GATE_ORDER == ("i", "f", "o", "g")
    H = 1
    a = {"i": 0.3, "f": -1.2, "o": 2.0, "g": -0.7}
    b = torch.tensor([a["i"], a["f"], a["o"], a["g"]], dtype=torch.float64)
    Wx = torch.zeros(2, 4 * H, dtype=torch.float64)
    Wh = torch.zeros(H, 4 * H, dtype=torch.float64)
    x = torch.randn(1, 2, dtype=torch.float64)
    prev_h = torch.tensor([[0.5]], dtype=torch.float64)
    prev_c = torch.tensor([[1.5]], dtype=torch.float64)

    def sigmoid(value):
        return 1 / (1 + math.exp(-value))

    next_c = sigmoid(a["f"]) * 1.5 + sigmoid(a["i"]) * math.tanh(a["g"])
    next_h = sigmoid(a["o"]) * math.tanh(next_c)

    h, c = lstm_step(x, prev_h, prev_c, Wx, Wh, b)
    assert h.item() == pytest.approx(next_h, abs=1e-12)
    assert c.item() == pytest.approx(next_c, abs=1e-12)
    out, (h_n, c_n) = lstm_forward(x.unsqueeze(1), prev_h, Wx, Wh, b, c0=prev_c)
    assert h_n.item() == pytest.approx(next_h, abs=1e-12)
    assert c_n.item() == pytest.approx(next_c, abs=1e-12)

    # The layer's forget bias sits in the forget gate block of b.
    layer = LSTM(2, 3, forget_bias=1.0)
    expected_bias = torch.tensor([0.0, 1.0, 0.0, 0.0]).repeat_interleave(3)
    assert torch.equal(layer.b.detach(), expected_bias)


def test_gate_order_in_conversion():
    # nn.LSTM orders its blocks i, f, g, o: a bias that drives only its g block must drive
    # our g block.
    module = nn.LSTM(2, 1, batch_first=True)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.zero_()
        module.bias_ih_l0.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    layer = LSTM.from_torch(module)
    assert layer.b.tolist() == pytest.approx([0.1, 0.2, 0.4, 0.3])
    assert module.bias_ih_l0.tolist() == pytest.approx(layer.to_torch().bias_ih_l0.tolist())


@pytest.mark.parametrize(
    "wanted", [("x",), ("h0",), ("c0",), ("Wx",), ("Wh",), ("b",), ("x", "c0"), ("Wh", "b")]
)
@pytest.mark.parametrize("fn", [ours, step_loop], ids=["lstm_forward", "lstm_step"])
def test_only_some_inputs_require_grad(fn, wanted):
    inputs = make_inputs(2, 3, 4, 3)
    for name, tensor in zip(INPUT_NAMES, inputs, strict=True):
        tensor.requires_grad_(name in wanted)
    expected = outputs_and_grads(reference_lstm, inputs)
    actual = outputs_and_grads(fn, inputs)
    assert_all_close(actual[1], expected[1], atol=1e-12, rtol=1e-12)


def test_final_cell_state_gradient_reaches_every_input():
    inputs = make_inputs(2, 4, 3, 5)
    _, (_, c_n) = lstm_forward(inputs[0], inputs[1], *inputs[3:], c0=inputs[2])
    grads = torch.autograd.grad(c_n.sum(), inputs)
    expected = torch.autograd.grad(reference_lstm(*inputs)[2].sum(), inputs)
    assert_all_close(grads, expected, atol=1e-12, rtol=1e-12)
    assert all(grad.abs().sum() > 0 for grad in grads)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_grad_free_modes(mode):
    inputs = make_inputs(2, 5, 3, 4)
    expected_seq = ours(*inputs)
    expected_step = lstm_step(inputs[0][:, 0], *inputs[1:])
    with mode():
        actual_seq = ours(*inputs)
        actual_step = lstm_step(inputs[0][:, 0], *inputs[1:])
    for actual, expected in zip(
        [*actual_seq, *actual_step], [*expected_seq, *expected_step], strict=True
    ):
        assert not actual.requires_grad
        torch.testing.assert_close(actual, expected.detach(), atol=0, rtol=0)


def test_non_contiguous_inputs():
    N, T, D, H = 3, 4, 5, 2
    inputs = make_inputs(N, T, D, H)
    generator = torch.Generator().manual_seed(2)

    def strided(tensor):
        # The same values in a transposed, sliced layout.
        base = torch.randn((2, *tensor.shape[::-1]), generator=generator, dtype=tensor.dtype)
        base[0] = tensor.detach().permute(*reversed(range(tensor.dim())))
        view = base[0].permute(*reversed(range(tensor.dim())))
        return view.requires_grad_()

    strided_inputs = [strided(tensor) for tensor in inputs]
    assert not any(tensor.is_contiguous() for tensor in strided_inputs[:5])
    for fn in (ours, step_loop):
        expected = outputs_and_grads(fn, inputs)
        actual = outputs_and_grads(fn, strided_inputs)
        assert_all_close(actual[0], expected[0], atol=1e-14, rtol=1e-14)
        assert_all_close(actual[1], expected[1], atol=1e-14, rtol=1e-14)


def test_bfloat16_forward_and_backward():
    # bfloat16 keeps 8 bits of mantissa: over 6 steps the state stays within 0.05 of float64.
    inputs = make_inputs(4, 6, 5, 7)
    scaled = [tensor.detach() * 0.5 for tensor in inputs]
    expected = ours(*scaled)
    low = [tensor.bfloat16().requires_grad_() for tensor in scaled]
    for fn in (ours, step_loop):
        actual = fn(*low)
        for out, ref in zip(actual, expected, strict=True):
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0)
        grads = torch.autograd.grad(sum(out.sum() for out in actual), low)
        assert all(grad.dtype == torch.bfloat16 for grad in grads)


@pytest.mark.parametrize("fn", [ours, step_loop], ids=["lstm_forward", "lstm_step"])
def test_autocast_runs_in_one_dtype(fn):
    # Float32 inputs under bfloat16 autocast: outputs come out in bfloat16, gradients reach
    # the float32 leaves in float32 and match the float32 result to bfloat16 accuracy.
    inputs = make_inputs(4, 6, 5, 7, dtype=torch.float32)
    with torch.no_grad():
        for tensor in inputs:
            tensor.mul_(0.5)
    expected = outputs_and_grads(fn, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = outputs_and_grads(fn, inputs)
    for out, ref in zip(actual[0], expected[0], strict=True):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0)
    for grad, ref in zip(actual[1], expected[1], strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, ref, atol=0.1, rtol=0.05)


def test_layer_defaults():
    torch.manual_seed(0)
    layer = LSTM(6, 8)
    assert layer.Wx.shape == (6, 32) and layer.Wh.shape == (8, 32) and layer.b.shape == (32,)
    bound = 1 / math.sqrt(8)
    assert layer.Wx.abs().max() <= bound and layer.Wh.abs().max() <= bound
    assert layer.Wx.std() > bound / 3
    x = torch.randn(3, 4, 6)
    zeros = torch.zeros(3, 8)
    h, (h_n, c_n) = layer(x)
    h_explicit, (h_n_explicit, c_n_explicit) = layer(x, (zeros, zeros))
    assert h.shape == (3, 4, 8)
    assert torch.equal(h, h_explicit) and torch.equal(c_n, c_n_explicit)
    assert torch.equal(h[:, -1], h_n)


def test_errors_name_argument_and_shape():
    N, T, D, H = 2, 3, 4, 5
    x, h0, c0, Wx, Wh, b = (tensor.detach() for tensor in make_inputs(N, T, D, H))
    with pytest.raises(ValueError, match=r"x must have shape \(N, T, D\)"):
        lstm_forward(x[0], h0, Wx, Wh, b, c0=c0)
    with pytest.raises(ValueError, match=r"h0 must have shape \(N, H\) = \(2, 5\), got \(3, 5\)"):
        lstm_forward(x, torch.zeros(3, H, dtype=x.dtype), Wx, Wh, b)
    with pytest.raises(ValueError, match=r"c0 must have shape \(N, H\) = \(2, 5\)"):
        lstm_forward(x, h0, Wx, Wh, b, c0=c0[:, :4])
    with pytest.raises(ValueError, match=r"Wx must have shape \(D, 4H\) = \(4, 20\)"):
        lstm_forward(x, h0, Wx[:3], Wh, b, c0=c0)
    with pytest.raises(ValueError, match=r"Wh must have shape \(H, 4H\)"):
        lstm_forward(x, h0, Wx, Wh[:, :19], b, c0=c0)
    with pytest.raises(ValueError, match=r"b must have shape \(4H,\) = \(20,\)"):
        lstm_forward(x, h0, Wx, Wh, b[:19], c0=c0)
    with pytest.raises(ValueError, match=r"T >= 1"):
        lstm_forward(x[:, :0], h0, Wx, Wh, b, c0=c0)
    with pytest.raises(ValueError, match=r"prev_c must have shape \(N, H\) = \(2, 5\)"):
        lstm_step(x[:, 0], h0, c0[:1], Wx, Wh, b)
    with pytest.raises(ValueError, match=r"x must have shape \(N, D\)"):
        lstm_step(x, h0, c0, Wx, Wh, b)
    with pytest.raises(ValueError, match=r"Wh must have dtype torch.float64 like x"):
        lstm_step(x[:, 0], h0, c0, Wx, Wh.float(), b)
    with pytest.raises(ValueError, match=r"x must be a floating point tensor"):
        lstm_forward(x.long(), h0, Wx, Wh, b)
    with pytest.raises(ValueError, match=r"b must be on device cpu like x"):
        lstm_step(x[:, 0], h0, c0, Wx, Wh, b.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gradcheck_and_matches_cpu():
    inputs = make_inputs(2, 5, 3, 4, device="cuda")
    assert torch.autograd.gradcheck(LSTMSequenceFunction.apply, tuple(inputs))
    cpu_inputs = [tensor.detach().cpu().requires_grad_() for tensor in inputs]
    actual = outputs_and_grads(ours, inputs)
    expected = outputs_and_grads(ours, cpu_inputs)
    assert_all_close([t.cpu() for t in actual[0]], expected[0], atol=1e-12, rtol=1e-12)
    assert_all_close([t.cpu() for t in actual[1]], expected[1], atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_float16():
    layer = LSTM(5, 7).cuda()
    x = torch.randn(3, 4, 5, device="cuda")
    expected = layer(x)[0]
    with torch.autocast("cuda", dtype=torch.float16):
        actual = layer(x)[0]
    assert actual.dtype == torch.float16
    actual.float().sum().backward()
    assert layer.Wx.grad.dtype == torch.float32
    torch.testing.assert_close(actual.float(), expected, atol=5e-3, rtol=0)
