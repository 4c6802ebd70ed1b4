"""Tests of the oneDNN products: they equal torch's own, forward and backward, and step aside
where they do not apply."""

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
