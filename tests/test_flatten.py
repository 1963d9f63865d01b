"""capture/flatten.py: which flattened layer inputs hold the batch's examples as runs of rows, by their
autograd history, and watch() on a layer that takes such rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_watch import assert_rows, ce, one_step, watched
from torch import nn
from torchgrab import UnsupportedModelError
from torchgrab.capture.flatten import flattened_batch

B, T, C = 3, 4, 5


def _hidden(t=T):
    return torch.randn(B, t, C, requires_grad=True) * 1.0  # made in the model: it has a history


def test_rows_reshaped_from_the_batch_and_carried_row_by_row_are_found():
    h = _hidden()
    flat = h.reshape(-1, C)
    assert flattened_batch(flat, B) == T
    ln, fc1, fc2 = nn.LayerNorm(C), nn.Linear(C, 7), nn.Linear(7, C, bias=False)
    x = F.dropout(F.gelu(fc1(ln(flat))), 0.5, training=True)  # dropout: a product with a mask
    assert flattened_batch(x, B) == T
    x = torch.tanh(fc2(x)) * 2.0 + flat  # a residual: both paths carry the same rows
    assert flattened_batch(x, B) == T
    assert flattened_batch(x.view(B * T, C, 1), B) == T  # a view that keeps the rows
    assert flattened_batch(h.reshape(B * T * C, 1), B) == T * C  # any whole number of rows per example


def test_rows_that_are_not_the_batchs_examples_in_runs_are_not():
    h = _hidden(t=B)  # T == B: shapes alone cannot tell the two flattenings apart
    assert flattened_batch(h.transpose(0, 1).reshape(-1, C), B) is None  # [T, B, C] flattened: interleaved
    assert flattened_batch(h.permute(1, 0, 2).contiguous().view(-1, C), B) is None
    assert flattened_batch(torch.tanh(h.transpose(-3, -2) * 2.0).reshape(-1, C), B) is None  # behind others
    assert flattened_batch(h.transpose(1, 2).transpose(1, 2).reshape(-1, C), B) == B  # dimension 0 kept
    flat = _hidden().reshape(-1, C)
    assert flattened_batch(flat - flat.mean(0), B) is None  # an operation that mixes the rows
    assert flattened_batch(F.layer_norm(flat, (B * T, C)), B) is None  # normalized over the rows too
    assert flattened_batch(flat + flat.flip(0), B) is None  # one path carries them reversed
    assert flattened_batch(torch.randn(B * T, C), B) is None  # no history to read
    assert flattened_batch(flat[: B * T - 1], B) is None  # not a whole number of rows per example
    assert flattened_batch(flat, B * T) is None  # one row per example: nothing flattened
    x = torch.randn(B * T, C, requires_grad=True)
    assert flattened_batch(F.linear(x, torch.randn(2, C)), B) is None  # from a leaf, not from the batch


class _TokenHead(nn.Module):
    """A tagger that flattens its [B, T, E] hidden states before its last layers, as many heads do."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        flat = self.norm(h.reshape(-1, h.shape[-1]))
        return self.out(torch.relu(self.fc(flat))).view(ids.shape[0], -1, 3)


def _tag_loss(out, y, reduction="mean"):
    return ce(out.reshape(-1, 3), y.reshape(-1), reduction=reduction)


@pytest.mark.parametrize("sketch", [None, 4])
def test_a_layer_on_flattened_rows_gets_each_examples_gradient(sketch):
    torch.manual_seed(0)
    model = _TokenHead()
    ids, y = torch.randint(0, 20, (B, T)), torch.randint(0, 3, (B, T))
    rows, expected, _, handle = one_step(model, ids, y, _tag_loss, sketch)
    assert_rows(rows, expected)
    assert rows.shape == (B, handle.width)


@pytest.mark.parametrize("ordering", ["rr", "so"])
def test_an_ordering_without_rows_counts_the_models_batch_not_a_layers_rows(ordering):
    # rr and so take no rows, only how many examples each step had: that was the leading dimension of the
    # first layer output to get a gradient, here the last layer's B * T rows, so the sampler's cursor ran
    # T times too far. It is the model's batch now.
    torch.manual_seed(0)
    model = _TokenHead()
    ids, y = torch.randint(0, 20, (B, T)), torch.randint(0, 3, (B, T))
    sampler, handle, _ = watched(model, ordering=ordering)
    for _ in range(2):
        _tag_loss(model(ids), y).backward()
    handle.flush()
    assert sampler.pending == 64 - 2 * B


class _FlattensItsInput(nn.Module):
    """Flattens the data it is given: the rows have no history to show where they came from."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, 3)

    def forward(self, x):
        return self.fc(x.reshape(-1, C)).view(x.shape[0], -1, 3)


def test_flattened_rows_with_no_history_are_refused_with_the_reason():
    model = _FlattensItsInput()
    x, y = torch.randn(B, T, C), torch.randint(0, 3, (B, T))
    sampler, handle, spy = watched(model, sketch=4)
    with pytest.raises(
        UnsupportedModelError, match=r"'fc' got an input of shape \(12, 5\).*Rows that flatten the batch"
    ):
        _tag_loss(model(x), y).backward()
    handle.flush()
    assert spy.rows == [] and sampler.pending == 64
