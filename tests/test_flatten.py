"""capture/flatten.py: which flattened layer inputs hold the batch's examples as runs of rows, by their
autograd history, and watch() on a layer that takes such rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_watch import assert_rows, ce, exact_rows, one_step, watched
from torch import nn
from torchgrab import UnsupportedModelError
from torchgrab.capture.flatten import flattened_batch

B, T, C = 3, 4, 5


def _made(*shape):
    """A tensor made from data by a layer, as a model's hidden states are: it has a history, and holds the
    examples (a parameter, or what reshaping it gives, holds none)."""
    return F.linear(torch.randn(*shape), torch.randn(shape[-1], shape[-1], requires_grad=True))


def _hidden(t=T):
    return _made(B, t, C)


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
    # The tokens cut into windows and the windows merged with the batch, [B, 4, C] -> [2B, 2, C]: the merge
    # takes the leading part of the tokens' dimension, and each example is still 2 consecutive rows.
    assert flattened_batch(torch.tanh(h).reshape(B * 2, 2, C), B) == 2
    assert flattened_batch(_made(B, 6, 2).reshape(B * 2, 6), B) == 2
    # SAM's attention: qkv [B, N, 3 * heads * C] split, permuted to [3, B, heads, N, C] and reshaped to
    # [3, B * heads, N, C]: the batch merged with the heads at dimension 1, then unbound.
    heads, n = 2, 5
    qkv = _made(B, n, 3 * heads * 4).view(B, n, 3, heads, 4).permute(2, 0, 3, 1, 4)
    q = qkv.reshape(3, B * heads, n, 4).unbind(0)[0]
    assert flattened_batch(q, B) == heads
    # The heads first, then the batch: each head's rows hold every example, interleaved.
    by_head = _made(B, n, heads * 4).view(B, n, heads, 4).permute(2, 0, 1, 3).reshape(heads * B, n, 4)
    assert flattened_batch(by_head, B) is None


def test_rows_that_are_not_the_batchs_examples_in_runs_are_not():
    h = _hidden(t=B)  # T == B: shapes alone cannot tell the two flattenings apart
    assert flattened_batch(h.transpose(0, 1).reshape(-1, C), B) is None  # [T, B, C] flattened: interleaved
    assert flattened_batch(h.permute(1, 0, 2).contiguous().view(-1, C), B) is None
    assert flattened_batch(torch.tanh(h.transpose(-3, -2) * 2.0).reshape(-1, C), B) is None  # behind others
    assert flattened_batch(h.transpose(1, 2).transpose(1, 2).reshape(-1, C), B) == B  # dimension 0 kept
    flat = _hidden().reshape(-1, C)
    assert flattened_batch(flat.transpose(0, 1).softmax(0).transpose(0, 1), B) == T  # over the features
    assert flattened_batch(flat.transpose(0, 1).softmax(1).transpose(0, 1), B) is None  # over the rows
    assert flattened_batch(flat.cumsum(0), B) is None  # operations that mix the rows
    assert flattened_batch(torch.roll(flat, 1, dims=0), B) is None
    assert flattened_batch(F.pad(flat, (0, 0, 0, B)), B) is None  # B padding rows: B * (T + 1), not theirs
    seq = flat.view(1, 1, B * T, C)  # the rows as the positions attention mixes
    assert flattened_batch(F.scaled_dot_product_attention(seq, seq, seq).view(B * T, C), B) is None
    assert flattened_batch(torch.tanh(flat @ flat.t()) @ flat, B) is None
    assert flattened_batch(F.layer_norm(flat, (B * T, C)), B) is None  # normalized over the rows too
    assert flattened_batch(flat + flat.flip(0), B) is None  # one path carries them reversed
    assert flattened_batch(torch.randn(B * T, C), B) is None  # no history to read
    assert flattened_batch(flat[: B * T - 1], B) is None  # not a whole number of rows per example
    assert flattened_batch(flat, B * T) is None  # one row per example: nothing flattened
    x = torch.randn(B * T, C, requires_grad=True)
    assert flattened_batch(F.linear(x, torch.randn(2, C)), B) is None  # from a leaf, not from the batch


def test_what_holds_no_example_is_taken_as_shared_by_the_rows():
    # Swin's attention adds a relative-position table, indexed by a buffer of positions, plus a mask tiled
    # over the windows: neither holds an example. An embedding's lookup does, though its only input is the
    # table.
    flat = _hidden().reshape(-1, C)
    table = torch.randn(7, requires_grad=True)
    bias = table[torch.arange(C) % 7].view(1, C) + torch.zeros(B * T, C)
    assert flattened_batch(flat + bias, B) == T
    assert flattened_batch(flat @ torch.randn(C, 4, requires_grad=True), B) == T
    assert flattened_batch(flat * _made(1, C), B) == T  # broadcast over the rows: one row shared by all
    looked_up = nn.Embedding(10, 4)(torch.randint(0, 10, (C,)))
    assert flattened_batch(flat @ looked_up, B) is None
    assert flattened_batch(torch.addmm(torch.zeros(4), flat, torch.randn(C, 4, requires_grad=True)), B) == T
    assert flattened_batch(torch.addmm(torch.zeros(4), flat, looked_up), B) is None
    # The rows in the middle of a batched product whose right factor holds no example (SAM's relative
    # positions, by einsum).
    w = torch.randn(1, C, 4, requires_grad=True)
    assert flattened_batch(torch.bmm(flat.unsqueeze(0), w).squeeze(0), B) == T
    assert flattened_batch(torch.bmm(flat.unsqueeze(0), looked_up.unsqueeze(0)).squeeze(0), B) is None


def _windows(x, ws, batch_major=True):
    """[B, H, W, C] -> [B * windows, ws * ws, C] as Swin cuts windows (batch_major), or window-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    x = x.permute(0, 1, 3, 2, 4, 5) if batch_major else x.permute(1, 3, 0, 2, 4, 5)
    return x.contiguous().view(-1, ws * ws, c)


def _attention(xw, qkv, heads, fused):
    """timm's window attention up to its output projection's input."""
    n, t, c = xw.shape
    q, k, v = qkv(xw).reshape(n, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if fused:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    return out.transpose(1, 2).reshape(n, t, c)


@pytest.mark.parametrize("fused", [True, False])
def test_windows_of_every_example_stacked_are_found_through_the_attention(fused):
    # Swin: a reshape of the batch-first image into windows, with the batch kept first, then a Linear layer
    # on them (whose rows are windows times tokens), attention batched over the windows, a transpose and a
    # reshape back: the rows of both the qkv and the output projection's inputs are example after example.
    x = _made(B, 8, 8, 4)
    xw = _windows(F.layer_norm(x, (4,)), 4)
    assert flattened_batch(xw, B) == 4
    qkv = nn.Linear(4, 12)
    assert flattened_batch(_attention(xw, qkv, 2, fused), B) == 4
    assert flattened_batch(F.pad(torch.roll(x, (2, 2), dims=(1, 2)), (0, 0, 0, 4)).reshape(B * 8, 12, 4), B) == 8
    assert flattened_batch(xw[:, :8], B) == 4  # sliced along another dimension
    assert flattened_batch(xw.split(2, dim=-1)[1], B) == 4
    one = _windows(_made(1, 8, 8, 4), 4)  # a batch of one: its dimension of size one merged with the rest
    assert flattened_batch(one, 1) == 4 and flattened_batch(_attention(one, qkv, 2, fused), 1) == 4
    assert flattened_batch(xw[3:], B) is None  # sliced along the rows (9 left: 3 per example, not theirs)
    assert flattened_batch(torch.cat([xw[6:], xw[:6]]), B) is None  # joined along the rows, out of order


def test_a_slice_that_keeps_the_rows_whole_is_read_through_and_one_that_cuts_them_is_not():
    # Older torch records x[:, :8] as a slice x[:] along the rows, then the cut along dimension 1; the
    # first keeps every row and their order, so the rows are read through it. aten.slice records it here.
    xw = _windows(F.layer_norm(_made(B, 8, 8, 4), (4,)), 4)
    whole = torch.ops.aten.slice(xw, 0, 0, 2**63 - 1)
    assert whole.grad_fn.name() == "SliceBackward0"
    assert flattened_batch(whole[:, :8], B) == 4
    assert flattened_batch(torch.ops.aten.slice(xw, 0, 0, xw.shape[0], 1)[:, :8], B) == 4  # end = size
    assert flattened_batch(torch.ops.aten.slice(xw, 0, 0, xw.shape[0] - 4), B) is None  # an example cut off
    assert flattened_batch(torch.ops.aten.slice(xw, 0, 0, xw.shape[0], 2), B) is None  # every other row


def test_windows_stacked_window_by_window_are_not():
    # The same windows stacked window-major: rows of the three examples interleaved. With as many windows
    # down as examples (2 x 2 windows of 4 x 4, B = 2), the reshape's shapes alone look like the batch's.
    x = _made(2, 8, 8, 4)
    xw = _windows(x, 4, batch_major=False)
    assert flattened_batch(xw, 2) is None
    assert flattened_batch(_attention(xw, nn.Linear(4, 12), 2, True), 2) is None
    assert flattened_batch(_windows(x, 4), 2) == 4


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


@pytest.mark.parametrize("b", [B, 1])
@pytest.mark.parametrize("sketch", [None, 4])
def test_a_layer_on_flattened_rows_gets_each_examples_gradient(sketch, b):
    # (b = 1: an epoch's last batch may hold one example, whose batch dimension of size one is merged
    # with the rest; it was refused mid-run.)
    torch.manual_seed(0)
    model = _TokenHead()
    ids, y = torch.randint(0, 20, (b, T)), torch.randint(0, 3, (b, T))
    rows, expected, _, handle = one_step(model, ids, y, _tag_loss, sketch)
    assert_rows(rows, expected)
    assert rows.shape == (b, handle.width)


def test_the_reading_of_a_layers_rows_is_remembered_for_later_steps():
    torch.manual_seed(0)
    model = _TokenHead()
    sampler, handle, spy = watched(model, sketch=None)
    batches = [(torch.randint(0, 20, (B, T)), torch.randint(0, 3, (B, T))) for _ in range(2)]
    for ids, y in batches:
        _tag_loss(model(ids), y).backward()
        model.zero_grad()
    handle.flush()
    assert sorted(sk.name for sk, *_ in handle._flat) == ["fc", "norm", "out"]
    rows = torch.cat([torch.as_tensor(r) for r in spy.rows])
    for i, (ids, y) in enumerate(batches):
        assert_rows(rows[i * B : (i + 1) * B], exact_rows(handle, model, _tag_loss, ids, y)[0])


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
