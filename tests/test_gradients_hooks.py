"""per_example_gradients(method="hooks") equals the vmap path (and the one-example-at-a-time definition)."""

import pytest
import torch
from torch import nn
from torchgrab import GraBSampler, UnsupportedModelError
from torchgrab.gradients import per_example_gradients


class LeNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(4, 5, 3, dilation=2, bias=False)
        self.fc = nn.Linear(5 * 16, 3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.max_pool2d(torch.relu(self.c2(x)), 1)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), LeNetish])
def test_hooks_equal_vmap(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(7, 6) if isinstance(model, nn.Sequential) else torch.randn(7, 3, 16, 16)
    y = torch.randint(0, 3, (7,))
    loss_fn = nn.CrossEntropyLoss()
    gv, lv = per_example_gradients(model, loss_fn, x, y)
    gh, lh = per_example_gradients(model, loss_fn, x, y, method="hooks")
    assert list(gv) == list(gh)
    for k in gv:
        assert gh[k].shape == gv[k].shape
        assert torch.allclose(gh[k], gv[k], atol=1e-5, rtol=1e-4), k
    assert torch.allclose(lh, lv, atol=1e-6)
    # The definition itself, one example at a time, for one parameter.
    model.zero_grad()
    loss_fn(model(x[2:3]), y[2:3]).backward()
    k = list(gv)[0]
    assert torch.allclose(gh[k][2], dict(model.named_parameters())[k].grad, atol=1e-5)


@pytest.mark.parametrize("method", ["vmap", "hooks"])
def test_inputs_that_require_grad_give_plain_gradients(method):
    # Adversarial training and input-gradient penalties hand over inputs that require grad. The vmap path
    # returned gradients tied to a graph through them (requires_grad=True, kept alive with the gradients;
    # .numpy() refused them); the hooks path never did. Both now give the same values as without.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    plain, _ = per_example_gradients(model, nn.CrossEntropyLoss(), x, y, method=method)
    grads, losses = per_example_gradients(model, nn.CrossEntropyLoss(), x.clone().requires_grad_(), y, method=method)
    for k, g in grads.items():
        assert not g.requires_grad and g.grad_fn is None, k
        assert torch.equal(g, plain[k]), k
    assert not losses.requires_grad


def test_shared_layer_sums_and_unsupported_layers_are_refused():
    torch.manual_seed(1)
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, nn.Tanh(), lin)
    x, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    gv, _ = per_example_gradients(shared, nn.CrossEntropyLoss(), x, y)
    # The vmap path leaves the model's own parameters in place (torch.func would swap in plain tensors).
    assert all(isinstance(p, nn.Parameter) for p in shared.parameters())
    assert shared[0].weight is lin.weight and isinstance(lin.weight, nn.Parameter)
    gh, _ = per_example_gradients(shared, nn.CrossEntropyLoss(), x, y, method="hooks")
    for k in gv:
        assert torch.allclose(gh[k], gv[k], atol=1e-5), k
    with pytest.raises(UnsupportedModelError, match="hooks"):
        per_example_gradients(nn.Sequential(nn.Linear(4, 4), nn.PReLU()), nn.CrossEntropyLoss(), x, y, method="hooks")


def test_backward_with_hooks_feeds_the_same_rows():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    orders = []
    for method in ("vmap", "hooks"):
        s = GraBSampler(n=8, ordering="grab", seed=0)
        list(s)
        model.zero_grad()
        s.backward(model, nn.CrossEntropyLoss(), x, y, method=method)
        orders.append((list(s), model[0].weight.grad.clone()))
    assert orders[0][0] == orders[1][0]
    assert torch.allclose(orders[0][1], orders[1][1], atol=1e-6)


@pytest.mark.parametrize(
    "shape,k,dil,pad,stride",
    [
        ((2, 3, 9, 11), (3, 3), (1, 1), (0, 0), (1, 1)),
        ((2, 3, 9, 11), (3, 2), (2, 1), (1, 2), (2, 3)),
        ((1, 1, 5, 5), (5, 5), (1, 1), (0, 0), (1, 1)),
        ((3, 2, 8, 7), (1, 3), (1, 3), (0, 3), (3, 1)),
    ],
)
def test_im2col_equals_unfold(shape, k, dil, pad, stride):
    from torchgrab.gradients import im2col

    torch.manual_seed(0)
    x = torch.randn(*shape)
    want = torch.nn.functional.unfold(x, k, dil, pad, stride)
    assert torch.equal(im2col(x, k, dil, pad, stride), want)


@pytest.mark.parametrize(
    "loss_fn,kind",
    [
        (nn.CrossEntropyLoss(), "class"),
        (nn.CrossEntropyLoss(label_smoothing=0.2), "class"),
        (nn.CrossEntropyLoss(ignore_index=1), "class"),  # a target equals it: the vmap fallback
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])), "class"),
        (nn.CrossEntropyLoss(), "prob"),
        (nn.MSELoss(), "same"),
        (nn.MSELoss(reduction="sum"), "same"),
        (nn.L1Loss(), "same"),
    ],
)
def test_per_example_losses_equal_the_batch_of_one_definition(loss_fn, kind):
    from torchgrab.gradients import per_example_losses

    torch.manual_seed(3)
    out = torch.randn(6, 3, requires_grad=True)
    if kind == "class":
        t = torch.tensor([0, 1, 2, 2, 0, 2])
    elif kind == "prob":
        t = torch.softmax(torch.randn(6, 3), 1)
    else:
        t = torch.randn(6, 3)
    got = per_example_losses(loss_fn, out, t)
    want = torch.stack([loss_fn(out[i : i + 1], t[i : i + 1]) for i in range(6)])
    assert got.shape == (6,)
    assert torch.allclose(got, want, atol=1e-6, equal_nan=True)
    # The gradients that flow back to the outputs agree too (they feed the per-example products).
    (ga,) = torch.autograd.grad(torch.nan_to_num(got).sum(), out)
    (gb,) = torch.autograd.grad(torch.nan_to_num(want).sum(), out)
    assert torch.allclose(ga, gb, atol=1e-6)


def test_a_weight_used_outside_its_module_is_refused_by_hooks():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            # The second use goes through the weight directly: no module call for the hooks to see.
            return torch.nn.functional.linear(torch.tanh(self.fc(x)), self.fc.weight)

    torch.manual_seed(0)
    model = Tied()
    x, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    with pytest.raises(UnsupportedModelError, match="tied or functionally applied"):
        per_example_gradients(model, nn.CrossEntropyLoss(), x, y, method="hooks")
    # Also under torch.autocast, where the identity is checked within 10% (autocast's own gradient is made
    # by half-precision products): the missed use is a whole term of the gradient.
    with pytest.raises(UnsupportedModelError, match="tied or functionally applied"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            per_example_gradients(Tied(), nn.CrossEntropyLoss(), x, y, method="hooks")
    # vmap sees every use.
    gv, _ = per_example_gradients(model, nn.CrossEntropyLoss(), x, y)
    model.zero_grad()
    nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    assert torch.allclose(gv["fc.weight"].sum(0), model.fc.weight.grad, atol=1e-5)


def test_the_hooks_identity_is_checked_once_per_model():
    from torchgrab import gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    assert model not in gradients._HOOKS_CHECKED
    per_example_gradients(model, nn.CrossEntropyLoss(), x, y, method="hooks")
    assert model in gradients._HOOKS_CHECKED


class SharedSeq(nn.Module):
    """A Linear layer used twice, on 3-D (batch, positions, features) input, and a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4 * 3 * 4, 3, bias=False)

    def forward(self, x):
        h = torch.relu(self.conv(x)).reshape(x.shape[0], 12, 4)
        h = self.lin(torch.tanh(self.lin(h)))
        return self.out(h.reshape(x.shape[0], -1))


def test_hooks_batch_means_equal_the_mean_of_the_rows_and_autograd():
    from torchgrab.gradients import hooks_capture

    torch.manual_seed(4)
    model = SharedSeq()
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
    grads, _, means = hooks_capture(model, nn.CrossEntropyLoss(), x, y)
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    assert list(means) == list(grads)
    for k, p in model.named_parameters():
        assert means[k].shape == p.shape
        assert torch.allclose(means[k], grads[k].mean(0), atol=1e-6), k
        assert torch.allclose(means[k], p.grad, atol=1e-6), k
    # GraBSampler.backward puts exactly those means in .grad.
    s = GraBSampler(n=5, ordering="grab", seed=0)
    list(s)
    model.zero_grad(set_to_none=True)
    s.backward(model, nn.CrossEntropyLoss(), x, y, method="hooks")
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, means[k]), k


class TokenModel(nn.Module):
    """Embedding (with a padding row), LayerNorm, Linear over positions, mean-pooled."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.pos = nn.Embedding(5, 6)
        self.norm = nn.LayerNorm(6)
        self.norm2 = nn.LayerNorm(6, bias=False)
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.norm(self.emb(ids) + self.pos(torch.arange(ids.shape[1]).expand_as(ids)))
        h = self.norm2(torch.tanh(self.lin(h)))
        return self.head(h.mean(1))


def test_hooks_equal_vmap_for_embedding_and_layernorm():
    torch.manual_seed(5)
    model = TokenModel()
    ids = torch.randint(0, 11, (6, 5))
    ids[0, :2] = 0  # padding rows get no gradient
    ids[1] = 3  # one row used at every position: its gradients add up
    y = torch.randint(0, 3, (6,))
    gv, _ = per_example_gradients(model, nn.CrossEntropyLoss(), ids, y)
    gh, _ = per_example_gradients(model, nn.CrossEntropyLoss(), ids, y, method="hooks")
    assert list(gv) == list(gh)
    for k in gv:
        assert torch.allclose(gh[k], gv[k], atol=1e-5, rtol=1e-4), k
    assert torch.count_nonzero(gh["emb.weight"][:, 0]) == 0


def test_embedding_options_hooks_cannot_follow_are_refused():
    for emb in (nn.Embedding(5, 2, max_norm=1.0), nn.Embedding(5, 2, scale_grad_by_freq=True)):
        model = nn.Sequential(emb, nn.Flatten(), nn.Linear(6, 2))
        with pytest.raises(UnsupportedModelError, match="nn.Embedding"):
            per_example_gradients(
                model, nn.CrossEntropyLoss(), torch.randint(0, 5, (4, 3)), torch.zeros(4).long(), method="hooks"
            )


def test_hooks_on_a_padded_bert_batch_equal_unpadded_one_example_passes():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    from hf_cases import tiny_bert_config

    cfg = tiny_bert_config(vocab_size=40, num_hidden_layers=2, intermediate_size=24, max_position_embeddings=16)
    cfg._attn_implementation = "eager"  # as examples/glue_finetune.py loads it
    model = transformers.BertForSequenceClassification(cfg)
    lengths = [7, 3, 5, 7]
    ids = torch.randint(5, 40, (4, 7))
    mask = torch.zeros(4, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    x = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    y = torch.tensor([0, 1, 1, 0])
    ce = nn.CrossEntropyLoss()

    def loss_fn(out, t):
        return ce(out.logits, t)

    gh, losses = per_example_gradients(model, loss_fn, x, y, method="hooks")
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    assert list(gh) == [k for k, _ in params]
    for i, n in enumerate(lengths):
        xi = {k: v[i : i + 1, :n] for k, v in x.items() if k != "attention_mask"}
        li = loss_fn(model(**xi), y[i : i + 1])
        assert torch.allclose(losses[i], li, atol=1e-5)
        grads = torch.autograd.grad(li, [p for _, p in params], allow_unused=True)
        for (k, p), g in zip(params, grads):
            want = torch.zeros_like(p) if g is None else g
            assert torch.allclose(gh[k][i], want, atol=1e-5, rtol=1e-4), (i, k)


def test_a_sequence_first_layer_is_refused_by_hooks():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):  # x: (B, T, 3), run through the layer as (T, B, 3)
            return self.lin(x.transpose(0, 1)).mean(0)

    x, y = torch.randn(4, 6, 3), torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedModelError, match="batch-first"):
        per_example_gradients(SeqFirst(), nn.CrossEntropyLoss(), x, y, method="hooks")


def test_a_non_embedding_layer_called_once_for_the_batch_is_refused_by_hooks():
    class Prototype(nn.Module):
        def __init__(self):
            super().__init__()
            self.proto = nn.Parameter(torch.randn(1, 4), requires_grad=False)
            self.proj = nn.Linear(4, 3)

        def forward(self, x):  # x: (B, 4); one projection of the prototype, shared by every example
            return x * self.proj(self.proto).sum()

    x, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    with pytest.raises(UnsupportedModelError, match="batch of 1 inside a batch of 5"):
        per_example_gradients(Prototype(), nn.CrossEntropyLoss(), x, y, method="hooks")
