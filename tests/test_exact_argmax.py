"""ExactArgmax: the fp32 lm_head's greedy token from a bf16 screening pass and an fp32 recheck of the close tokens."""

import pytest
import torch

import hf_jetspec.exact_argmax as exact_argmax_module
from hf_jetspec.exact_argmax import ERROR_UNITS, ExactArgmax, exact_argmax_for


def lm_head(vocab=4096, hidden=64, seed=0, bias=False):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(vocab, 1) * 3)  # rows of very different norms
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_equals_the_fp32_argmax_on_random_and_near_tied_rows(bias):
    layer = lm_head(bias=bias)
    argmax = ExactArgmax(layer)
    torch.manual_seed(1)
    hidden = torch.randn(64, 64) * 4
    # near-ties below bf16's resolution: a row whose top two logits differ by ~1e-4 (rows of W nearly equal)
    with torch.no_grad():
        layer.weight[7] = layer.weight[3] + 1e-5 * torch.randn(64)
        hidden[:8] = layer.weight[3] * 5
    argmax = ExactArgmax(layer)
    with torch.no_grad():
        expected = layer(hidden).argmax(-1)
    assert argmax(hidden).tolist() == expected.tolist()
    assert argmax.fallbacks == 0
    # one row at a time, too (different batch shapes)
    assert [int(argmax(hidden[i : i + 1])) for i in range(8)] == expected[:8].tolist()


def test_the_bound_holds_with_room():
    layer = lm_head(bias=True)
    argmax = ExactArgmax(layer)
    hidden = torch.randn(32, 64) * 10
    with torch.no_grad():
        exact = layer(hidden)
        approx = torch.nn.functional.linear(hidden.to(torch.bfloat16), argmax.low).float() + layer.bias
    scale = argmax.unit * hidden.norm(dim=1, keepdim=True) * argmax.norms
    assert float(((approx - exact).abs() / scale).max()) < ERROR_UNITS / 2


def test_flat_rows_fall_back_to_full_fp32_logits():
    layer = lm_head(bias=True)
    with torch.no_grad():
        layer.weight.fill_(0.01)
        layer.bias.zero_()
        layer.weight[11] += 1e-6  # the exact argmax, invisible in bf16
    argmax = ExactArgmax(layer, max_candidates=16)
    hidden = torch.ones(2, 64)
    assert argmax(hidden).tolist() == [11, 11] and argmax.fallbacks == 2


def test_built_once_per_weight_and_only_where_bf16_is_faster(monkeypatch):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = lm_head(vocab=128, hidden=16)

        def get_output_embeddings(self):
            return self.head

    model = Model()
    monkeypatch.setattr(exact_argmax_module, "bf16_matmul_is_fast", lambda device: True)
    first = exact_argmax_for(model)
    assert first is not None and exact_argmax_for(model) is first
    with torch.no_grad():
        model.head.weight.mul_(2)  # an in-place change of the weights rebuilds the bf16 copy
    assert exact_argmax_for(model) is not first
    monkeypatch.setattr(exact_argmax_module, "bf16_matmul_is_fast", lambda device: False)
    assert exact_argmax_for(Model()) is None
    with pytest.raises(ValueError, match="fp32"):
        ExactArgmax(lm_head().to(torch.bfloat16))
