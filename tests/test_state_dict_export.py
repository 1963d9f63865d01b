"""The state dict is exported incrementally: the epoch's order once per epoch, the next order's placed
blocks (and the recursive leaf codes) topped up from per-epoch buffers, so a checkpoint per batch costs
O(d + B), not O(n). These tests hold that export to what a full export gives, and check that a dict
handed out earlier never changes when the sampler goes on."""

import copy

import numpy as np
import pytest
import torch
import torchgrab
from conftest import assert_same_state, save_load
from torchgrab import GraBSampler

ORDERINGS = [o for o in torchgrab.orderings() if o != "mean"]
N, D, PER_STEP, EPOCHS = 13, 3, 3, 3
VECTORS = np.random.default_rng(9).normal(size=(N, D)).astype(np.float32)


def make(ordering, unit_size=1):
    return GraBSampler(n=N, ordering=ordering, seed=4, unit_size=unit_size)


def run(s, steps, export_every=None):
    """Drive `s` for `steps` steps of PER_STEP rows (a partial step ends each epoch); export after
    every `export_every`-th step. Returns the exported dicts."""
    out, k = [], 0
    while True:
        it = iter(s)
        batch = []
        for i in it:
            batch.append(i)
            if len(batch) == PER_STEP:
                s.step(VECTORS[batch])
                batch, k = [], k + 1
                if export_every and k % export_every == 0:
                    out.append(s.state_dict())
                if k == steps:
                    return out
        if batch:
            s.step(VECTORS[batch])
            k += 1
            if export_every and k % export_every == 0:
                out.append(s.state_dict())
            if k == steps:
                return out


STEPS = EPOCHS * -(-N // PER_STEP)
CASES = [(o, 1) for o in ORDERINGS] + [("grab", 3), ("pair", 2)]


@pytest.mark.parametrize("ordering,unit_size", CASES, ids=[f"{o}-u{u}" for o, u in CASES])
def test_handed_out_state_dicts_never_change(ordering, unit_size):
    s = make(ordering, unit_size)
    dicts = run(s, STEPS, export_every=1)
    copies = [copy.deepcopy(d) for d in dicts]
    # Step further (into later epochs, whose buffers are new), then compare with the early copies.
    run(s, STEPS)
    for k, (d, c) in enumerate(zip(dicts, copies)):
        assert_same_state(d, c, f"dict {k}")


@pytest.mark.parametrize("ordering,unit_size", CASES, ids=[f"{o}-u{u}" for o, u in CASES])
def test_incremental_export_equals_a_first_export(ordering, unit_size):
    """A sampler that exported after every step (topped-up buffers) gives the same dict as one that
    never exported before (buffers filled in one go), and it resumes to the same dict."""
    every = run(make(ordering, unit_size), STEPS, export_every=1)
    for j, d in enumerate(run(make(ordering, unit_size), STEPS, export_every=2)):
        assert_same_state(d, every[2 * j + 1], f"exported every other step, after step {2 * j + 2}")
    for k in range(1, STEPS + 1):
        first = make(ordering, unit_size)
        run(first, k)
        assert_same_state(every[k - 1], first.state_dict(), f"after step {k}")
        resumed = make(ordering, unit_size)
        resumed.load_state_dict(save_load(every[k - 1]))
        assert_same_state(resumed.state_dict(), every[k - 1], f"resumed after step {k}")


def test_a_step_exports_no_order_again():
    """Within an epoch, exports share the epoch's order and the placed blocks' buffer (no O(n) copy);
    a new epoch gets new buffers."""
    s = make("grab")
    it = iter(s)
    idx = [next(it) for _ in range(6)]
    s.step(VECTORS[idx[:3]])
    a = s.state_dict()["native"]
    s.step(VECTORS[idx[3:]])
    b = s.state_dict()["native"]
    assert a["current"].data_ptr() == b["current"].data_ptr()
    placed_a = len(a["assembly"]["next"]) + len(a["assembly"]["next_back"])
    placed_b = len(b["assembly"]["next"]) + len(b["assembly"]["next_back"])
    assert (placed_a, placed_b) == (3, 6)
    assert a["assembly"]["next"].numel() == 0 or (a["assembly"]["next"].data_ptr() == b["assembly"]["next"].data_ptr())
    run(s, 5)  # into the next epoch
    c = s.state_dict()["native"]
    assert c["epochs_begun"] == 2 and c["current"].data_ptr() != a["current"].data_ptr()


def test_unit_steps_refresh_the_cached_state():
    """With unit_size > 1, a step must show in the next state dict (the cache follows the native
    sampler's own count of changes)."""
    s = make("grab", unit_size=3)
    it = iter(s)
    idx = [next(it) for _ in range(6)]
    before = s.state_dict()
    s.step(VECTORS[idx])
    after = s.state_dict()
    assert after["native"]["balance"] is not None and before["native"]["balance"] is None


def test_version_1_state_dicts_still_load():
    """Version 1 stored the whole next-order buffer and the bitmap of placed units."""
    s = make("grab")
    run(s, 6)
    v2 = s.state_dict()
    v1 = copy.deepcopy(v2)
    a = v1["native"]["assembly"]
    front, back = a.pop("next"), a.pop("next_back")
    nxt = torch.zeros(N, dtype=torch.int32)
    nxt[: len(front)] = front
    nxt[N - len(back) :] = back
    words = np.zeros(-(-N // 64), np.uint64)
    for i in torch.cat([front, back]).tolist():
        words[i // 64] |= np.uint64(1) << np.uint64(i % 64)
    a["next"], a["taken"] = nxt, torch.from_numpy(words.view(np.int64))
    v1["native"]["version"] = 1
    t = make("grab")
    t.load_state_dict(save_load(v1))
    assert_same_state(t.state_dict(), v2)
