"""Tests of the oneDNN products: they equal torch's own, forward and backward, and step aside
where they do not apply."""

import copy

import pytest
import torch
import torch.nn.functional as F

from torch_lstmcap import products

needs_onednn = pytest.mark.skipif(
    products.onednn_linear() is None, reason="this torch build has no oneDNN"
)


def leaves(*shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes
    ]


def graph_names(y):
    """Names of the autograd nodes behind y."""
    names, pending = set(), [y.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None:
            names.add(type(node).__name__)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return names


@needs_onednn
@pytest.mark.parametrize("leading", [(7,), (3, 5), (1,)])
def test_linear_matches_f_linear_forward_and_backward(leading):
    x, weight, bias = leaves((*leading, 24), (40, 24), (40,))
    grad_y = torch.randn(*leading, 40)

    ours = products.linear(x, weight, bias)
    grads = torch.autograd.grad(ours, (x, weight, bias), grad_y)
    reference = F.linear(x, weight, bias)
    expected = torch.autograd.grad(reference, (x, weight, bias), grad_y)

    assert ours.shape == (*leading, 40)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "weight", "bias"), grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@needs_onednn
def test_linear_goes_through_onednn_and_computes_only_requested_gradients():
    x, weight, bias = leaves((6, 8), (5, 8), (5,))
    x.requires_grad_(False)

    y = products.linear(x, weight, bias)
    assert "LinearFunctionBackward" in graph_names(y)
    y.sum().backward()

    assert x.grad is None
    torch.testing.assert_close(weight.grad, torch.ones(6, 5).t() @ x)
    torch.testing.assert_close(bias.grad, torch.full((5,), 6.0))


@pytest.mark.parametrize("case", ["float64", "plain-pytorch", "autocast"])
def test_linear_falls_back_to_f_linear(case, monkeypatch):
    dtype = torch.float64 if case == "float64" else torch.float32
    x, weight, bias = leaves((4, 8), (3, 8), (3,), dtype=dtype)
    if case == "plain-pytorch":
        monkeypatch.setenv(products.PLAIN_PYTORCH_ENV, "0")

    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = products.linear(x, weight, bias)
        assert y.dtype == torch.bfloat16
    else:
        y = products.linear(x, weight, bias)
        torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=0, atol=0)
    assert "LinearFunctionBackward" not in graph_names(y)


@needs_onednn
def test_matmul_addmm_and_add_matmul_match_torch_for_transposed_operands():
    a, b, bias, out = (t.detach() for t in leaves((9, 6), (4, 6), (4,), (9, 4)))
    op = products.linear_for(a)
    assert op is not None

    torch.testing.assert_close(products.matmul(a, b.t(), op), a @ b.t())
    torch.testing.assert_close(products.matmul(a, b.t(), op, bias), a @ b.t() + bias)
    expected = out + a @ b.t()
    torch.testing.assert_close(products.add_matmul_(out.clone(), a, b.t(), op), expected)
    torch.testing.assert_close(products.addmm(out, a, b.t(), op), expected)
    torch.testing.assert_close(products.addmm(out, a, b.t(), None), expected)
    assert products.linear_for(a.double()) is None


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_packed_weight_gives_the_same_products(rows):
    a, weight, bias, out = (t.detach() for t in leaves((rows, 24), (40, 24), (40,), (rows, 40)))
    op = products.linear_for(a)
    packed = products.pack_weight(weight)
    assert packed is not None and packed.shape == weight.shape

    expected = a @ weight.t() + bias
    torch.testing.assert_close(products.matmul(a, weight.t(), op, bias, packed), expected)
    torch.testing.assert_close(
        products.addmm(out, a, weight.t(), op, packed), out + expected - bias
    )
    got = products.add_matmul_(out.clone(), a, weight.t(), op, packed)
    torch.testing.assert_close(got, out + expected - bias)
    with torch.no_grad():
        torch.testing.assert_close(products.linear(a, weight, bias, packed), expected)
        # The packed copy is what is read: one of another weight gives that weight's product.
        other = products.pack_weight(2 * weight)
        torch.testing.assert_close(products.linear(a, weight, bias, other), 2 * expected - bias)
    with pytest.raises(ValueError, match="not the transpose"):
        products.matmul(a, weight, op, packed=packed)


@needs_onednn
def test_linear_with_a_packed_weight_still_records_gradients():
    x, weight, bias = leaves((5, 8), (3, 8), (3,))
    packed = products.pack_weight(weight)

    y = products.linear(x, weight, bias, packed)
    assert "LinearFunctionBackward" in graph_names(y)
    y.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(5, 3).t() @ x.detach())


def test_pack_weight_is_none_where_onednn_does_not_apply(monkeypatch):
    assert products.pack_weight(torch.randn(4, 3, dtype=torch.float64)) is None
    monkeypatch.setenv(products.PLAIN_PYTORCH_ENV, "0")
    assert products.pack_weight(torch.randn(4, 3)) is None


needs_onednn_convolution = pytest.mark.skipif(
    not products.PackedConv2d.applies_to(torch.ones(1)),
    reason="this torch build has no oneDNN convolution",
)


@needs_onednn_convolution
@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, stride, padding, groups, relu6, with_bias",
    [
        (3, 8, 3, 2, 1, 1, True, True),  # a stem
        (8, 8, 5, 1, 2, 8, True, True),  # depthwise
        (8, 16, 1, 1, 0, 1, False, True),  # pointwise, no activation
        (8, 8, 4, 2, 1, 8, True, False),  # depthwise, stride 2, even kernel, no bias
    ],
)
def test_packed_convolution_equals_conv2d_and_relu6(
    in_channels, out_channels, kernel, stride, padding, groups, relu6, with_bias
):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(out_channels, in_channels // groups, kernel, kernel, generator=generator)
    bias = torch.randn(out_channels, generator=generator) if with_bias else None
    x = 3 * torch.randn(2, in_channels, 13, 12, generator=generator)
    conv = products.PackedConv2d(weight, bias, (stride,) * 2, (padding,) * 2, (1, 1), groups, relu6)

    expected = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    if relu6:
        expected = F.relu6(expected)
        assert (expected == 0).any() and (expected == 6).any(), "both ends clip"
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(conv(channels_last), expected, atol=1e-5, rtol=1e-5)
        # Each batch size gets a weight packed for it; only a few are kept.
        for rows in (1, 3, 4, 5, 6, 2):
            batch = torch.cat([x] * 3)[:rows]
            want = torch.cat([expected] * 3)[:rows]
            torch.testing.assert_close(conv(batch), want, atol=1e-5, rtol=1e-5)
        assert 0 < len(conv._packed) <= conv.MAX_PACKED_SHAPES
        # A copy packs its own weight; moved to float64 it runs F.conv2d on the plain one.
        torch.testing.assert_close(copy.deepcopy(conv)(x), conv(x), atol=0, rtol=0)
        as_float64 = copy.deepcopy(conv).double()
        # A copy made off oneDNN has nothing to pack and runs F.conv2d too.
        torch.testing.assert_close(copy.deepcopy(as_float64)(x.double()), as_float64(x.double()))
    torch.testing.assert_close(as_float64(x.double()).float(), expected, atol=1e-5, rtol=1e-5)
    assert set(conv.state_dict()) == ({"weight", "bias"} if with_bias else {"weight"})


@needs_onednn_convolution
def test_packed_convolution_follows_its_weight_and_gives_gradients():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 4, 3, 3, generator=generator)
    x = torch.randn(2, 4, 9, 9, generator=generator)
    conv = products.PackedConv2d(weight, None, (1, 1), (1, 1), (1, 1), 1, relu6=False)
    with torch.inference_mode():
        conv(x)  # packs the weight for this shape

    # Loading other weights, or changing them in place, packs again.
    conv.load_state_dict({"weight": 2 * weight})
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, 2 * weight, None, 1, 1))
    with torch.no_grad():
        conv.weight.mul_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, weight, None, 1, 1))

    # Export records F.conv2d, which the exported program can replay.
    with torch.no_grad():
        exported = torch.export.export(conv, (x,)).module()
        torch.testing.assert_close(exported(x), F.conv2d(x, weight, None, 1, 1))

    # oneDNN's operation has no backward: asked for a gradient, the module takes F.conv2d.
    x.requires_grad_()
    grad_y = torch.randn(2, 6, 9, 9, generator=generator)
    (grad_x,) = torch.autograd.grad(conv(x), x, grad_y)
    (expected,) = torch.autograd.grad(F.conv2d(x, weight, None, 1, 1), x, grad_y)
    torch.testing.assert_close(grad_x, expected)
