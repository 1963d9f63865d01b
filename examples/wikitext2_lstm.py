"""Experiment 3 of the GraB paper: a 2-layer LSTM language model on WikiText-2 in the pytorch/examples
``word_language_model`` setup, where the ordered units are the BPTT chunks.

    nice -n 19 python examples/wikitext2_lstm.py [--data ../shared/data] [--epochs 3] \\
        [--train-tokens 50000] [--valid-tokens 20000]
    python examples/wikitext2_lstm.py --quick     # 5,600 training tokens (10 chunks), 2 epochs: a smoke test

As in pytorch/examples: the vocabulary is built over train+valid+test (33,278 words), the training
stream is cut into ``--batch-size`` columns and then into chunks of ``--bptt`` time steps; one chunk
([bptt, batch] tokens) is one SGD step. Paper settings: embedding = hidden = 32, 2 LSTM layers, plain
SGD with lr 5, gradient-norm clip 0.25. GraB orders the chunks: after each step, the chunk's gradient
(one row of d = #parameters) goes to ``sampler.step`` (``--capture exact``), or, with ``--capture watch``,
``sampler.watch(model, granularity="batch")`` reads it inside the plain ``loss.backward()`` and folds it
to a short sketch (a backward is one unit here: the chunk's [bptt, batch] tokens, as the paper orders them). Because the chunks are visited out of order, the
LSTM state starts from zero at every training chunk (carrying it across shuffled chunks would feed the
state of an unrelated chunk); validation runs in order with the state carried, as pytorch/examples does.
Records per epoch the full-pass training loss (mean token cross-entropy over all training chunks),
validation perplexity, and the wall time. Writes out/wikitext2_lstm.{csv,png,md}.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List

import _common as C
import torch
from torch import nn


class Corpus:
    """pytorch/examples ``data.Corpus``: word ids of each split, ``<eos>`` appended to every line."""

    def __init__(self, root):
        self.word2idx: Dict[str, int] = {}
        self.splits = {s: self._tokenize(C.load_wikitext2_lines(root, s)) for s in ("train", "valid", "test")}

    def _tokenize(self, lines: List[str]) -> torch.Tensor:
        ids = []
        w2i = self.word2idx
        for line in lines:
            for w in line.split() + ["<eos>"]:
                if w not in w2i:
                    w2i[w] = len(w2i)
                ids.append(w2i[w])
        return torch.tensor(ids, dtype=torch.int64)


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()  # [T, bsz]


def chunk(data: torch.Tensor, i: int, bptt: int):
    """pytorch/examples ``get_batch``: inputs data[i : i + n] and flattened next-word targets."""
    n = min(bptt, data.size(0) - 1 - i)
    return data[i : i + n], data[i + 1 : i + 1 + n].reshape(-1)


@torch.no_grad()
def train_pass_loss(model, data: torch.Tensor, starts: List[int], bptt: int, ntokens: int, group: int = 64):
    """(sum of token cross-entropies as a float64 tensor on data's device, token count) over the chunks at
    ``starts``, each from a zero state as in training. Chunks of full length are stacked side by side
    along the batch dimension (the LSTM treats batch columns independently), so one forward pass covers
    ``group`` chunks; a shorter last chunk runs alone."""
    crit = nn.CrossEntropyLoss()
    tot, cnt = torch.zeros((), dtype=torch.float64, device=data.device), 0
    for k in range(0, len(starts), group):
        part = starts[k : k + group]
        full = [i for i in part if i + bptt <= data.size(0) - 1]
        for sub in [full] + [[i] for i in part if i not in full]:
            if not sub:
                continue
            xs, ys = zip(*(chunk(data, i, bptt) for i in sub))
            x = torch.cat(xs, dim=1)
            y = torch.cat([t.view(x.size(0), -1) for t in ys], dim=1).reshape(-1)
            out, _ = model(x)
            tot += crit(out.view(-1, ntokens), y).double() * len(y)
            cnt += len(y)
    return tot, cnt


class RNNModel(nn.Module):
    """pytorch/examples ``RNNModel`` (LSTM variant, untied weights)."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.encoder.weight.data.uniform_(-0.1, 0.1)
        self.decoder.weight.data.uniform_(-0.1, 0.1)
        self.decoder.bias.data.zero_()

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden


def main(argv=None):
    p = C.base_parser(__doc__, epochs=3, out="out/wikitext2_lstm")
    p.add_argument("--batch-size", type=int, default=16, help="columns of the training stream")
    p.add_argument("--eval-batch-size", type=int, default=10)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--emsize", type=int, default=32)
    p.add_argument("--nhid", type=int, default=32)
    p.add_argument("--nlayers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=5.0)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--train-tokens", type=int, default=50_000, help="first N training tokens (0 = all 2,088,628)")
    p.add_argument("--valid-tokens", type=int, default=20_000, help="first N validation tokens (0 = all 217,646)")
    p.add_argument(
        "--eval-group",
        type=int,
        default=64,
        help="chunks per forward of the full-pass training loss (its logits take group x 35 x 16 x 33,278 "
        "floats: 4.8 GB at 64; lower it to run several processes on one GPU)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.train_tokens, args.valid_tokens, args.epochs = 5_600, 3_500, min(args.epochs, 2)
    torch.set_num_threads(args.threads)

    corpus = Corpus(C.data_root(args.data))
    train_ids = corpus.splits["train"]
    valid_ids = corpus.splits["valid"]
    if args.train_tokens:
        train_ids = train_ids[: args.train_tokens]
    if args.valid_tokens:
        valid_ids = valid_ids[: args.valid_tokens]
    train_data = batchify(train_ids, args.batch_size).to(args.device)
    valid_data = batchify(valid_ids, args.eval_batch_size).to(args.device)
    starts = list(range(0, train_data.size(0) - 1, args.bptt))  # unit u = chunk starting at starts[u]
    ntokens = len(corpus.word2idx)
    crit = nn.CrossEntropyLoss()

    def make_model():
        return RNNModel(ntokens, args.emsize, args.nhid, args.nlayers, args.dropout)

    @torch.no_grad()
    def evaluate(model):
        # Sums stay on the device (float64) and are read once: a float() per chunk would sync a GPU each time.
        tot, cnt = train_pass_loss(model, train_data, starts, args.bptt, ntokens, group=args.eval_group)
        vtot, vcnt, hidden = torch.zeros_like(tot), 0, None
        for i in range(0, valid_data.size(0) - 1, args.bptt):
            x, y = chunk(valid_data, i, args.bptt)
            out, hidden = model(x, hidden)
            vtot += crit(out.view(-1, ntokens), y).double() * len(y)
            vcnt += len(y)
        return {
            "train_loss": float(tot) / cnt,
            "val_metric": math.exp(float(vtot) / vcnt),
            "metric": "valid perplexity",
        }

    n_units = len(starts)
    orderings = C.select_orderings(args.orderings.split(","), n_units, C.n_params(make_model()))

    def train_one(ordering, seed):
        torch.manual_seed(seed)
        model = make_model().to(args.device)
        params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        sampler = C.make_sampler(n_units, ordering, seed)
        watching = args.capture == "watch" and sampler.balances
        if watching:  # one chunk per backward: the whole gradient is the unit's row
            sampler.watch(model, granularity="batch")
        timer = C.Timer()
        t0 = time.perf_counter()
        model.eval()
        yield {"epoch": 0, **evaluate(model), "train_seconds": 0.0, "wall_seconds": 0.0}
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            model.train()
            with timer:
                for u in sampler:
                    x, y = chunk(train_data, starts[u], args.bptt)
                    opt.zero_grad(set_to_none=True)
                    out, _ = model(x)
                    loss = crit(out.view(-1, ntokens), y)
                    loss.backward()
                    # Watching, the hooks took the row (the sketch of the gradient before clipping).
                    if not sampler.balances:
                        sampler.skip(1)
                    elif not watching:  # this unit's gradient, one row per parameter (no copy into one vector)
                        sampler.step({k: p.grad.detach().unsqueeze(0) for k, p in params})
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                    opt.step()
                if watching:
                    sampler.synchronize()  # the epoch's last row, inside the timed part
            model.eval()
            yield {
                "epoch": epoch + 1,
                **evaluate(model),
                "train_seconds": timer.total,
                "wall_seconds": time.perf_counter() - t0,
            }

    rows = C.run_grid(train_one, orderings, C.seed_range(args), args.epochs, "wikitext2_lstm", args.out + ".csv")
    title = (
        f"WikiText-2 LSTM (2x{args.nhid}, {len(train_ids)} train tokens = "
        f"{n_units} chunks of {args.bptt}x{args.batch_size}), "
        f"SGD lr {args.lr}, clip {args.clip}"
    )
    C.report(rows, "valid perplexity", title, args.out, higher_is_better=False)
    return rows


if __name__ == "__main__":
    main()
