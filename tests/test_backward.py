"""GraBSampler.backward: per-example gradients into the sampler, their mean into .grad."""

import pytest
import torch
from conftest import assert_same_state
from torch import nn
from torchgrab import GraBSampler, UnsupportedModelError


def reference_grads(model, loss_fn, x, y):
    per = []
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        per.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    model.zero_grad()
    return per


def test_mean_gradient_loss_and_sampler_rows_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    per = reference_grads(model, loss_fn, x, y)

    sampler = GraBSampler(n=8, ordering="grab", first_epoch="identity")
    iter(sampler).__next__()  # only the first index is yielded...
    it = iter(sampler)
    idx = [next(it) for _ in range(8)]
    loss = sampler.backward(model, loss_fn, x, y)
    assert torch.allclose(loss, loss_fn(model(x), y), atol=1e-6)
    for k, p in model.named_parameters():
        mean = torch.stack([g[k] for g in per]).mean(0)
        assert torch.allclose(p.grad, mean, atol=1e-6), k

    # The sampler received exactly the per-example gradients: feed them by hand to a twin and compare.
    twin = GraBSampler(n=8, ordering="grab", first_epoch="identity")
    assert list(iter(twin)) == idx
    twin.step({k: torch.stack([g[k] for g in per]) for k in per[0]})
    assert torch.allclose(
        sampler.state_dict()["native"]["balance"]["s"], twin.state_dict()["native"]["balance"]["s"], atol=1e-5
    )
    assert list(sampler) == list(twin)


def test_frozen_parameters_cost_nothing_and_grads_accumulate():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    sampler = GraBSampler(n=4, ordering="pair")
    list(sampler)
    x, y = torch.randn(4, 4), torch.randint(0, 2, (4,))
    sampler.backward(model, nn.functional.cross_entropy, x[:2], y[:2])
    sampler.backward(model, nn.functional.cross_entropy, x[2:], y[2:])
    assert model[0].weight.grad is None
    assert sampler._native.dim == 4 * 2 + 2  # only the trainable last layer
    g_first_half = model[2].weight.grad.clone()
    model.zero_grad()
    nn.functional.cross_entropy(model(x[:2]), y[:2]).backward()
    g1 = model[2].weight.grad.clone()
    model.zero_grad()
    nn.functional.cross_entropy(model(x[2:]), y[2:]).backward()
    assert torch.allclose(g_first_half, g1 + model[2].weight.grad, atol=1e-6)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, input_ids, attention_mask):
        h = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1) * self.scale
        return self.out(self.drop(h))


def test_dict_inputs_buffers_and_dropout():
    model = DictModel().train()
    sampler = GraBSampler(n=6, ordering="grab")
    list(sampler)
    inputs = {"input_ids": torch.randint(0, 20, (6, 5)), "attention_mask": torch.ones(6, 5)}
    loss = sampler.backward(model, nn.functional.cross_entropy, inputs, torch.randint(0, 2, (6,)))
    assert torch.isfinite(loss)
    assert sampler.pending == 0
    assert all(p.grad is not None for p in model.parameters())


def test_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x1, x2):
            return self.a(x1) + self.a(x2)

    sampler = GraBSampler(n=4, ordering="grab")
    list(sampler)
    loss = sampler.backward(Two(), nn.functional.mse_loss, (torch.randn(4, 3), torch.randn(4, 3)), torch.randn(4, 2))
    assert loss.ndim == 0


def test_batchnorm_in_training_mode_is_refused_with_advice():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    sampler = GraBSampler(n=4)
    list(sampler)
    before = sampler.state_dict()
    with pytest.raises(UnsupportedModelError, match="GroupNorm|eval mode"):
        sampler.backward(model, nn.functional.cross_entropy, torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert sampler.pending == 4
    assert str(sampler.state_dict()) == str(before)
    model.eval()  # in eval mode BatchNorm is a per-example affine map: fine
    sampler.backward(model, nn.functional.cross_entropy, torch.randn(4, 3), torch.randint(0, 2, (4,)))


def test_rr_backward_is_a_plain_backward():
    model = nn.Linear(3, 2)
    sampler = GraBSampler(n=4, ordering="rr")
    list(sampler)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    loss = sampler.backward(model, nn.functional.cross_entropy, x, y)
    g = model.weight.grad.clone()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert torch.allclose(g, model.weight.grad) and sampler.pending == 0 and loss.ndim == 0


def _sequence_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))


@pytest.mark.parametrize("kind", ["mlp", "sequence", "conv"])
def test_hooks_under_autocast_give_float32_rows_of_its_gradients(kind):
    # sampler.backward inside the user's torch.autocast block: the layers' inputs and output gradients are
    # bfloat16 beside float32 weights, and the per-example products raised a dtype error; the identity
    # check against autocast's (half-precision) batch gradient then refused every model.
    torch.manual_seed(0)
    model, shape = {
        "mlp": (nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), (6,)),
        "sequence": (_sequence_model(), (4, 6)),
        "conv": (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(64, 3)), (2, 6, 6)),
    }[kind]
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    per = reference_grads(model, loss_fn, x, y)  # float32
    sampler = GraBSampler(n=8, ordering="grab")
    list(iter(sampler))
    got = []
    step = sampler.step
    sampler.step = lambda g, **kw: (got.append({k: v.clone() for k, v in g.items()}), step(g, **kw))[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sampler.backward(model, loss_fn, x, y, method="hooks")
    (rows,) = got
    for k, p in model.named_parameters():
        assert rows[k].dtype == p.grad.dtype == torch.float32
        exact = torch.stack([g[k] for g in per]).reshape(8, -1)
        mine = rows[k].reshape(8, -1)
        cos = nn.functional.cosine_similarity(mine, exact, dim=1)
        assert cos.min() > 0.98, (k, cos)
        torch.testing.assert_close(p.grad, rows[k].mean(0))  # the training gradient is the rows' mean


def test_vmap_that_torch_func_cannot_run_under_autocast_is_refused_and_changes_nothing():
    model = _sequence_model()
    x, y = torch.randn(8, 4, 6), torch.randint(0, 3, (8,))
    sampler = GraBSampler(n=8, ordering="grab")
    list(iter(sampler))
    before = sampler.state_dict()
    with pytest.raises(UnsupportedModelError, match=r"method='vmap' failed under torch.autocast.*method='hooks'"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sampler.backward(model, nn.CrossEntropyLoss(), x, y)
    assert_same_state(sampler.state_dict(), before)
    assert all(p.grad is None for p in model.parameters())
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    sampler.backward(model, nn.CrossEntropyLoss(), x, y)  # outside autocast: the same call works
