"""watch() with a model on CUDA (skipped without a GPU; run on a lent machine by scripts/gpu_watch.sh):
the sketches stay on the device, the rows equal the CPU's, and a training step needs no device sync."""

import numpy as np
import pytest
import torch
from conftest import assert_rows_follow_autocast, autocast_step
from torch import nn
from torchgrab import GraBSampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 64),
        nn.LayerNorm(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _wide_model():
    # A 768 -> 10 layer: its input side is count-sketched (index_add_ on the device).
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))


class _Tokens(nn.Module):
    """Images as tokens through three blocks of equally shaped Linear layers and LayerNorms: the layers
    whose inputs are projected together at the end of the forward, and the norms sketched as one
    group (on a GPU nothing keeps them apart: no CPU size limit)."""

    def __init__(self, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, width)
        self.q, self.k, self.v = (nn.ModuleList(nn.Linear(width, width) for _ in range(3)) for _ in range(3))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.embed(x.flatten(2).transpose(1, 2))  # [B, side * side, width]
        for q, k, v, norm in zip(self.q, self.k, self.v, self.norms):
            h = norm(h + torch.tanh(q(h)) * torch.sigmoid(k(h)) + v(h))
        return self.head(h.mean(1))


class _PixelBags(nn.Module):
    """Each image's pixels quantized to 21 ids, pooled by an EmbeddingBag: as [B, L] ids, and end to end
    with offsets (the text classification tutorials' call), then a Linear layer."""

    def __init__(self, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.rows = nn.EmbeddingBag(21, width, mode="mean", padding_idx=0)
        self.ends = nn.EmbeddingBag(21, width, mode="sum")
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        ids = ((x.flatten(1).tanh() + 1) * 10).long()  # [B, L] in 0..20
        offsets = torch.arange(ids.shape[0], device=ids.device) * ids.shape[1]
        return self.head(torch.cat([self.rows(ids), self.ends(ids.flatten(), offsets)], dim=1))


class _PixelRows(nn.Module):
    """Each image read row by row (``side`` steps of 3 * side numbers) by a 2-layer bidirectional LSTM, and
    its first rows (a length per image, packed) by a GRU; then a Linear layer."""

    def __init__(self, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(12, width, 2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(12, width, batch_first=True)
        self.head = nn.Linear(3 * width, 10)

    def forward(self, x):
        seq = x.permute(0, 2, 1, 3).flatten(2)  # [B, side, 3 * side]
        out, _ = self.lstm(seq)
        lengths = 1 + torch.arange(seq.shape[0]) % seq.shape[1]  # (on the CPU, as packing wants them)
        _, h = self.gru(nn.utils.rnn.pack_padded_sequence(seq, lengths, batch_first=True, enforce_sorted=False))
        return self.head(torch.cat([out.mean(1), h[-1]], 1))


class _Normed(nn.Module):
    """Layers whose weight a parametrization computes: a convolution normalized over its kernel taps
    (weight_norm dim=2, as Wav2Vec2's positional convolution), a spectral_norm Linear layer, a head."""

    def __init__(self, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, width, 3, padding=1), dim=2)
        self.fc = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(width * 16, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.conv(x)).flatten(1))))


def _rows(device, steps=4, sketch=8, make=_model, side=8):
    model = make().to(device)
    x = torch.randn(64, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2)).to(device)
    s = GraBSampler(n=64, ordering="grab", seed=0)
    got = []
    step = s.step
    s.step = lambda rows, **kw: (got.append(np.array(rows)), step(rows, **kw))[1]
    h = s.watch(model, sketch=sketch, budget=None)
    if make is _wide_model:
        assert h._sketches[model[1]].p_in.count
    order = list(iter(s))
    for k in range(steps):
        i = torch.as_tensor(order[16 * k : 16 * (k + 1)], device=device)
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
    h.flush()
    return np.concatenate(got), s.state_dict()["native"]


@pytest.mark.parametrize(
    "make, side, sketch",
    [(_model, 8, 8), (_wide_model, 16, 32), (_Tokens, 4, 8), (_PixelBags, 4, 8), (_PixelRows, 4, 8), (_Normed, 4, 8)],
    ids=["conv-mlp", "count", "tokens", "bags", "recurrent", "parametrized"],
)
def test_rows_on_cuda_equal_the_cpu_rows(make, side, sketch):
    cpu, _ = _rows("cpu", make=make, side=side, sketch=sketch)
    gpu, _ = _rows("cuda", make=make, side=side, sketch=sketch)
    assert cpu.shape == gpu.shape == (64, cpu.shape[1])
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * np.abs(cpu).max())


def autocast_rows_and_gradients(make, side, device, dtype, sketch):
    """conftest.autocast_step on one batch of 16 images of ``side`` pixels through ``make()``."""
    model = make().to(device)
    x = torch.randn(16, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2)).to(device)
    return autocast_step(model, x, y, nn.functional.cross_entropy, sketch, device, dtype, n=16, budget=None)


@pytest.mark.parametrize("sketch", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("make, side", [(_model, 8), (_Tokens, 4)], ids=["conv-mlp", "tokens"])
def test_rows_under_cuda_autocast_are_float32_sums_of_its_gradients(make, side, dtype, sketch):
    # The hooks form the rows with autocast off (torchgrab/_autocast.py): float32 products of the
    # half-precision inputs and output gradients autocast's forward and backward made. Their mean is the
    # batch gradient autocast made, up to its own rounding of the weight-gradient products, and no farther
    # from the float32 model's gradient than autocast's is.
    rows, mixed, full = autocast_rows_and_gradients(make, side, "cuda", dtype, sketch)
    assert_rows_follow_autocast(rows, mixed, full, within=0.05, farther=1.1, slack=1e-4)


@pytest.mark.parametrize("make, side", [(_model, 8), (_Tokens, 4)], ids=["conv-mlp", "tokens"])
def test_training_steps_do_not_synchronize_the_device(make, side):
    model = make().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(512, 3, side, side, device="cuda")
    y = torch.randint(0, 10, (512,), device="cuda")
    s = GraBSampler(n=512, ordering="grab", seed=0)
    h = s.watch(model)
    it = iter(s)
    batches = [torch.as_tensor([next(it) for _ in range(32)], device="cuda") for _ in range(16)]
    # The first step moves the seeded projections to the device (once per watch), a copy from pageable
    # host memory; the steps after it must not wait for the device.
    nn.functional.cross_entropy(model(x[batches[0]]), y[batches[0]]).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        for i in batches[1:15]:
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    h.flush()
    assert s.pending == 32  # the 16th batch was taken from the sampler but not trained on
    assert s.state_dict()["stepped"] == 15 * 32


class _LSTMLM(nn.Module):
    """The WikiText-2 example's shape in small: a backward is one unit (a chunk), balanced by its gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn, self.out = nn.Embedding(50, 8), nn.LSTM(8, 8, 2), nn.Linear(8, 50)

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0])


def _unit_rows(device, steps=6, sync_check=False):
    model = _LSTMLM().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.randint(0, 50, (12, 7, 4), generator=torch.Generator().manual_seed(3)).to(device)
    s = GraBSampler(n=12, ordering="grab", seed=0)
    got = []
    step = s.step
    s.step = lambda rows, **kw: (got.append(np.array(rows)), step(rows, **kw))[1]
    h = s.watch(model, granularity="batch", sketch=4)
    it = iter(s)
    for k in range(steps):
        u = next(it)
        if sync_check and k == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(data[u])
            nn.functional.cross_entropy(out[:-1].reshape(-1, 50), data[u][1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            if sync_check:
                torch.cuda.set_sync_debug_mode("default")
    h.flush()
    return np.concatenate(got)


def test_batch_granularity_rows_on_cuda_equal_the_cpu_rows_without_a_sync():
    cpu = _unit_rows("cpu")
    gpu = _unit_rows("cuda")
    assert cpu.shape == gpu.shape and cpu.shape[0] == 6
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * np.abs(cpu).max())
    _unit_rows("cuda", sync_check=True)  # raises if a step synchronizes the device
