"""GraBSampler.backward: per-example gradients into the sampler, their mean into .grad."""

import pytest
import torch
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
