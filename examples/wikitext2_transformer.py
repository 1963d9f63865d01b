"""A transformer language model on WikiText-2, trained from scratch with SGD, in the layout of PyTorch's
language-modeling tutorial ("Language Modeling with nn.Transformer"): ``[T, B]`` token ids in,
``nn.TransformerEncoder`` with torch's default ``batch_first=False``, ``[T, B, V]`` logits out.

    nice -n 19 python examples/wikitext2_transformer.py [--data ../shared/data] [--epochs 5] \\
        [--train-tokens 100000] [--valid-tokens 20000]
    python examples/wikitext2_transformer.py --quick     # 7,000 training tokens (200 chunks): a smoke test

The examples GraB orders are independent chunks of ``--bptt`` tokens (no state runs from one chunk to
the next in a transformer): chunk u holds tokens [u bptt, (u + 1) bptt) and is trained to predict each
next token, under a causal mask. A DataLoader stacks ``--batch-size`` chunks side by side, ``[bptt, B]``,
and ``sampler.watch(model, batch_first=False)`` sketches each chunk's gradient inside the plain
``loss.backward()`` (the attention projections included), for ``grab`` and ``pair``; the other orderings
train the same loop without it. The tutorial's model (sinusoidal positions, embedding scaled by
sqrt(d), weights uniform in +-0.1) at a CPU-sized width; SGD with gradient-norm clip 0.5 as there, lr 1
(the tutorial's 5 made the loss rise at this width: 8.21 after 2 epochs on 30,000 tokens, against 7.04
with lr 1 and 7.22 with 0.5), without its learning-rate decay or dropout (a fixed objective, as in the
LSTM experiment). The
vocabulary is pytorch/examples' (train+valid+test, 33,278 words). Records per epoch the full-pass
training loss (mean token cross-entropy over all training chunks), the validation perplexity (over
validation chunks of the same length) and the wall time. Writes out/wikitext2_transformer.{csv,png,md}.
"""

from __future__ import annotations

import math
import time

import _common as C
import torch
from torch import nn
from torch.utils.data import DataLoader
from wikitext2_lstm import Corpus


class PositionalEncoding(nn.Module):
    """The tutorial's sinusoidal positions, added to [T, B, d] embeddings."""

    def __init__(self, d_model: int, max_len: int = 5000) -> None:
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.size(0)]


class TransformerModel(nn.Module):
    """The tutorial's ``TransformerModel``: [T, B] ids -> [T, B, ntoken] logits, sequence first."""

    def __init__(self, ntoken: int, d_model: int, nhead: int, d_hid: int, nlayers: int, dropout: float = 0.0):
        super().__init__()
        self.d_model = d_model
        self.embedding = nn.Embedding(ntoken, d_model)
        self.pos = PositionalEncoding(d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout)  # batch_first=False, torch's default
        self.encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = nn.Linear(d_model, ntoken)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.decoder.weight.data.uniform_(-0.1, 0.1)
        self.decoder.bias.data.zero_()

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(src.size(0), device=src.device)
        h = self.pos(self.embedding(src) * math.sqrt(self.d_model))
        return self.decoder(self.encoder(h, mask=mask, is_causal=True))


class Chunks(torch.utils.data.Dataset):
    """Chunk u of a token stream: inputs ids[u bptt : (u + 1) bptt], targets shifted by one token."""

    def __init__(self, ids: torch.Tensor, bptt: int) -> None:
        self.ids, self.bptt = ids, bptt
        self.n = (len(ids) - 1) // bptt

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, u: int):
        i = u * self.bptt
        return self.ids[i : i + self.bptt], self.ids[i + 1 : i + 1 + self.bptt]


def sequence_first(batch):
    """Collate chunks side by side: ([bptt, B] inputs, [bptt, B] targets), the tutorial's layout."""
    xs, ys = zip(*batch)
    return torch.stack(xs, dim=1), torch.stack(ys, dim=1)


@torch.no_grad()
def mean_loss(model: nn.Module, data: Chunks, device: str, group: int = 64) -> float:
    """Mean token cross-entropy over every chunk of ``data``, ``group`` chunks per forward."""
    crit = nn.CrossEntropyLoss(reduction="sum")
    tot, cnt = torch.zeros((), dtype=torch.float64, device=device), 0
    for x, y in DataLoader(data, batch_size=group, collate_fn=sequence_first):
        x, y = x.to(device), y.to(device)
        tot += crit(model(x).reshape(-1, model.decoder.out_features), y.reshape(-1)).double()
        cnt += y.numel()
    return float(tot) / cnt


def main(argv=None):
    p = C.base_parser(__doc__, epochs=5, out="out/wikitext2_transformer", capture=False)
    p.add_argument("--batch-size", type=int, default=20, help="chunks per step")
    p.add_argument("--bptt", type=int, default=35, help="tokens per chunk")
    p.add_argument("--emsize", type=int, default=64)
    p.add_argument("--nhead", type=int, default=2)
    p.add_argument("--nhid", type=int, default=128, help="feed-forward width")
    p.add_argument("--nlayers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1.0, help="the tutorial's 5 made the loss rise at this width")
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--train-tokens", type=int, default=100_000, help="first N training tokens (0 = all 2,088,628)")
    p.add_argument("--valid-tokens", type=int, default=20_000, help="first N validation tokens (0 = all 217,646)")
    p.set_defaults(orderings="rr,so,flipflop,grab,pair")
    args = p.parse_args(argv)
    if args.quick:
        args.train_tokens, args.valid_tokens, args.epochs = 7_001, 3_501, min(args.epochs, 2)
    torch.set_num_threads(args.threads)

    corpus = Corpus(C.data_root(args.data))
    train_ids, valid_ids = corpus.splits["train"], corpus.splits["valid"]
    if args.train_tokens:
        train_ids = train_ids[: args.train_tokens]
    if args.valid_tokens:
        valid_ids = valid_ids[: args.valid_tokens]
    train, valid = Chunks(train_ids, args.bptt), Chunks(valid_ids, args.bptt)
    ntokens = len(corpus.word2idx)
    crit = nn.CrossEntropyLoss()

    def make_model():
        return TransformerModel(ntokens, args.emsize, args.nhead, args.nhid, args.nlayers)

    def evaluate(model):
        model.eval()
        return {
            "train_loss": mean_loss(model, train, args.device),
            "val_metric": math.exp(mean_loss(model, valid, args.device)),
            "metric": "valid perplexity",
        }

    orderings = C.select_orderings(args.orderings.split(","), len(train), C.n_params(make_model()))

    def train_one(ordering, seed):
        torch.manual_seed(seed)
        model = make_model().to(args.device)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        sampler = C.make_sampler(len(train), ordering, seed)
        if sampler.balances:  # each chunk's gradient, sketched inside loss.backward(); [T, B] inputs
            sampler.watch(model, batch_first=False)
        loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, collate_fn=sequence_first)
        timer = C.Timer()
        t0 = time.perf_counter()
        yield {"epoch": 0, **evaluate(model), "train_seconds": 0.0, "wall_seconds": 0.0}
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            model.train()
            with timer:
                for x, y in loader:
                    x, y = x.to(args.device), y.to(args.device)
                    opt.zero_grad(set_to_none=True)
                    loss = crit(model(x).reshape(-1, ntokens), y.reshape(-1))
                    loss.backward()  # watch() reads the sketch here, before clipping
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                    opt.step()
                if sampler.balances:
                    sampler.synchronize()  # the epoch's last rows, inside the timed part
            yield {
                "epoch": epoch + 1,
                **evaluate(model),
                "train_seconds": timer.total,
                "wall_seconds": time.perf_counter() - t0,
            }

    rows = C.run_grid(train_one, orderings, C.seed_range(args), args.epochs, "wikitext2_transformer", args.out + ".csv")
    title = (
        f"WikiText-2 transformer ({args.nlayers} layers, d {args.emsize}, {len(train_ids)} train tokens = "
        f"{len(train)} chunks of {args.bptt}, batch {args.batch_size}), SGD lr {args.lr}, clip {args.clip}"
    )
    C.report(rows, "valid perplexity", title, args.out, higher_is_better=False)
    return rows


if __name__ == "__main__":
    main()
