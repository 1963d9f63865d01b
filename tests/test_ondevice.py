"""The on-device path (torchgrab.ondevice), forced on CPU tensors with device_path="always": its orders
equal the dense Rust kernel's on well-separated data, its state round-trips exactly through a state
dict, and refusals leave everything unchanged."""

import numpy as np
import pytest
import torch
import torchgrab
from torchgrab.errors import GraBError


def _vectors(n, d, seed=1):
    # Integer-valued rows: every inner product is exact in float32 and float64 alike, so no sign can
    # depend on rounding ("well-separated" in the strongest sense).
    rng = np.random.default_rng(seed)
    return rng.integers(-8, 9, size=(n, d)).astype(np.float32)


def _run(ordering, path, V, batch, epochs=4, segmented=False, stop_after=None):
    n = V.shape[0]
    s = torchgrab.GraBSampler(n=n, ordering=ordering, device_path=path, seed=3, dtype=torch.float64)
    orders = []
    for _ in range(epochs):
        order = list(s)
        orders.append(order)
        for lo in range(0, n, batch):
            rows = torch.from_numpy(V[order[lo : lo + batch]])
            if segmented:
                s.step({"w": rows[:, :5].contiguous(), "b": rows[:, 5:].contiguous()})
            else:
                s.step(rows)
    orders.append(list(s))
    return orders, s


@pytest.mark.parametrize("ordering", ["grab", "pair"])
@pytest.mark.parametrize("batch", [1, 7, 16])
def test_on_device_orders_equal_the_dense_kernel(ordering, batch):
    V = _vectors(64, 24)
    dense, _ = _run(ordering, "never", V, batch)
    device, s = _run(ordering, "always", V, batch)
    assert s._ondevice is not None
    assert dense == device
    # The orders really moved: balancing is not a no-op here.
    assert dense[1] != dense[2] or dense[2] != dense[3]


@pytest.mark.parametrize("ordering", ["grab", "pair"])
def test_segments_and_batching_do_not_change_on_device_orders(ordering):
    V = _vectors(50, 12, seed=5)
    one, _ = _run(ordering, "always", V, 50)
    many, _ = _run(ordering, "always", V, 3, segmented=True)
    assert one == many


@pytest.mark.parametrize("ordering", ["grab", "pair"])
def test_on_device_float32_gaussian_data_agrees_with_dense(ordering):
    # Gaussian float32 rows, float32 sums: different rounding, but with n = 40 << d no inner product
    # is within rounding distance of 0.
    rng = np.random.default_rng(7)
    V = rng.standard_normal((40, 300)).astype(np.float32)
    res = []
    for path in ("never", "always"):
        s = torchgrab.GraBSampler(n=40, ordering=ordering, device_path=path, seed=1)
        orders = []
        for _ in range(3):
            order = list(s)
            for lo in range(0, 40, 8):
                s.step(V[order[lo : lo + 8]])
            orders.append(order)
        orders.append(list(s))
        res.append(orders)
    assert res[0] == res[1]


@pytest.mark.parametrize("ordering", ["grab", "pair"])
def test_on_device_state_dict_mid_epoch_restores_exactly(ordering):
    V = _vectors(30, 10, seed=2)
    s = torchgrab.GraBSampler(n=30, ordering=ordering, device_path="always", seed=4)
    for _ in range(2):  # one full epoch so that grab's stale mean is non-zero
        order = list(s)
        s.step(torch.from_numpy(V[order[:15]]))
        s.step(torch.from_numpy(V[order[15:]]))
    it = iter(s)
    order = [next(it) for _ in range(30)]
    s.step(torch.from_numpy(V[order[:9]]))  # odd: pair keeps an open pair
    state = s.state_dict()
    assert all(t.device.type == "cpu" for t in state["ondevice"]["s"])
    t = torchgrab.GraBSampler(n=30, ordering=ordering, device_path="always", seed=99)
    t.load_state_dict(state)
    for k in ("s", "m", "m_next", "pending_grad"):
        for a, b in zip(s._ondevice.state()[k], t._ondevice.state()[k]):
            assert torch.equal(a, b)
    assert list(t) == order[9:]  # the restored sampler resumes the epoch after the stepped units
    for x in (s, t):
        x.step(torch.from_numpy(V[order[9:]]))
    assert list(s) == list(t)


def test_on_device_refusals_change_nothing():
    V = _vectors(20, 6)
    s = torchgrab.GraBSampler(n=20, ordering="pair", device_path="always")
    order = list(s)
    s.step(torch.from_numpy(V[order[:3]]))
    before = s.state_dict()
    bad = torch.from_numpy(V[order[3:7]]).clone()
    bad[1, 2] = float("nan")
    with pytest.raises(torchgrab.NonFiniteGradientError):
        s.step(bad)
    with pytest.raises(torchgrab.UnitIndexError):
        s.step(torch.from_numpy(V[[order[2]]]), indices=[order[2]])  # the open pair's unit again
    after = s.state_dict()
    assert after["stepped"] == before["stepped"]
    for k in ("s", "pending_grad"):
        for a, b in zip(before["ondevice"][k], after["ondevice"][k]):
            assert torch.equal(a, b)
    assert after["ondevice"]["pending_index"] == before["ondevice"]["pending_index"]


def test_paths_are_not_mixed_and_option_is_checked():
    with pytest.raises(GraBError):
        torchgrab.GraBSampler(n=4, device_path="gpu")
    s = torchgrab.GraBSampler(n=8, ordering="grab", device_path="auto")
    list(s)
    s.step(np.ones((2, 3), np.float32))  # CPU input in auto: the dense kernel
    assert s._ondevice is None


def test_split_products_equal_single_products():
    from torchgrab.ondevice import _products

    g = torch.Generator().manual_seed(0)
    for r, k, split in [(3, 40, 8), (5, 41, 8), (1, 17, 4), (4, 15, 8), (2, 64, 32)]:
        z = torch.randint(-8, 9, (r, k), generator=g).double()
        s = torch.randint(-8, 9, (k,), generator=g).double()
        u1, g1 = _products(z, s, None)
        u2, g2 = _products(z, s, split)
        assert torch.equal(u1, u2) and torch.equal(g1, g2), (r, k, split)


@pytest.mark.parametrize("ordering", ["grab", "pair"])
def test_split_products_give_the_dense_kernels_orders(ordering, monkeypatch):
    import torchgrab.ondevice as od

    # Chunks of 5 columns over blocks of 24 or 5 + 19 columns: batched chunks and a partial tail.
    monkeypatch.setattr(od, "DEFAULT_SPLIT_COLS", 5)
    V = _vectors(48, 24, seed=9)
    dense, _ = _run(ordering, "never", V, 8)
    split, s = _run(ordering, "always", V, 8)
    assert s._ondevice.split_cols == 5
    assert dense == split
    seg, _ = _run(ordering, "always", V, 8, segmented=True)
    assert dense == seg
