"""Truncated BPTT: K = L equals full BPTT; K < L carries the state forward but cuts the gradient."""
import pytest
import torch

from hpcvid.learn.models import LSTMModel
from hpcvid.learn.tbptt import chunk_bounds, loss_weights, train_sequence, weighted_sequence_loss

torch.set_num_threads(1)


def _model(seed=0):
    torch.manual_seed(seed)
    model = LSTMModel(num_classes=3, input_dim=5, hidden=7, layers=2, dropout=0.0)
    return model


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_loss_weights_literal():
    assert torch.allclose(loss_weights(4, "linear"), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert torch.allclose(loss_weights(4, "uniform"), torch.full((4,), 0.25))
    assert loss_weights(3, "last").tolist() == [0.0, 0.0, 1.0]
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError):
        loss_weights(3, "quadratic")


def test_chunk_equal_to_length_is_full_bptt():
    x, y = torch.randn(4, 12, 5), torch.tensor([0, 1, 2, 1])
    weights = loss_weights(12, "linear")
    full = _model()
    weighted_sequence_loss(full(x), y, weights).backward()
    expected = _grads(full)

    tbptt = _model()
    captured = []
    result = train_sequence(tbptt, x, y, chunk=12, weights=weights,
                            after_backward=lambda: captured.append(_grads(tbptt)))
    assert result.chunks == 1 and len(captured) == 1
    for got, want in zip(captured[0], expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_short_chunks_carry_state_but_cut_gradients():
    torch.manual_seed(1)
    x, y = torch.randn(2, 12, 5), torch.tensor([0, 2])
    weights = loss_weights(12, "uniform")
    model = _model()

    # the state flows: changing the first chunk's input changes the last chunk's outputs
    changed = x.clone()
    changed[:, :4] += 1.0
    a = train_sequence(model, x, y, chunk=4, weights=weights, after_backward=model.zero_grad)
    b = train_sequence(model, changed, y, chunk=4, weights=weights, after_backward=model.zero_grad)
    assert not torch.allclose(a.logits[:, 8:], b.logits[:, 8:])

    # the gradient is cut: the last chunk's loss has no gradient w.r.t. earlier chunks' inputs
    inputs = x.clone().requires_grad_(True)
    per_chunk = []

    def after_backward():
        per_chunk.append(inputs.grad.clone())
        inputs.grad = None
        model.zero_grad()

    train_sequence(model, inputs, y, chunk=4, weights=weights, after_backward=after_backward)
    assert len(per_chunk) == 3
    last = per_chunk[2]
    assert torch.count_nonzero(last[:, :8]) == 0
    assert torch.count_nonzero(last[:, 8:]) > 0
    # ... whereas full BPTT does reach the first chunk from the last step's loss
    full_inputs = x.clone().requires_grad_(True)
    logits = model(full_inputs)
    weighted_sequence_loss(logits[:, 8:], y, weights[8:]).backward()
    assert torch.count_nonzero(full_inputs.grad[:, :8]) > 0
