"""Seq2seq with attention, end to end on seqfast: numbers written in words -> digits.

Encoder: a bidirectional GRU over packed variable-length batches. Decoder: a GRUCell whose state is the query of a
Luong ("general") attention over the encoder states (keys and values), with input feeding. Trained with teacher
forcing on sentences generated on the fly; decoded greedily and with beam search on held-out numbers.

    python examples/seq2seq_translate.py --steps 600 --out examples/results --impl seqfast

Writes OUT/attention.png (attention of a few test sentences) and OUT/metrics.json, and prints the training throughput
of the same model and data run by seqfast's modules and by torch's own (same weights, interleaved rounds).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seqfast  # noqa: E402
from seqfast.reference.seq2seq_attention import LuongAttention as TorchLuongAttention  # noqa: E402 (torch's side)
from number_words import (BOS, EOS, PAD, SOURCE_VOCAB, TARGET_INDEX, TARGET_VOCAB, NumberTask,  # noqa: E402
                          decode_digits, to_words)

PAD_ID, BOS_ID, EOS_ID = TARGET_INDEX[PAD], TARGET_INDEX[BOS], TARGET_INDEX[EOS]
MAX_TARGET = 7  # 6 digits + EOS


class Translator(torch.nn.Module):
    def __init__(self, impl, embed=64, hidden=128):
        super().__init__()
        nn = seqfast.nn if impl == "seqfast" else torch.nn
        self.hidden = hidden
        self.src_embed = torch.nn.Embedding(len(SOURCE_VOCAB), embed, padding_idx=0)
        self.encoder = nn.GRU(embed, hidden, batch_first=True, bidirectional=True)
        self.bridge = torch.nn.Linear(2 * hidden, hidden)
        self.tgt_embed = torch.nn.Embedding(len(TARGET_VOCAB), embed)
        self.decoder = nn.GRUCell(embed + 2 * hidden, hidden)
        self.attention = (seqfast.nn.LuongAttention(hidden, 2 * hidden, score="general") if impl == "seqfast"
                          else TorchLuongAttention(hidden, 2 * hidden))
        self.readout = torch.nn.Linear(3 * hidden, len(TARGET_VOCAB))

    def encode(self, src, lengths):
        """-> encoder states [B, S, 2H], mask [B, S] (True = a real word), initial decoder state [B, H]."""
        packed = pack_padded_sequence(self.src_embed(src), lengths, batch_first=True, enforce_sorted=False)
        out, h_n = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        mask = torch.arange(src.size(1))[None, :] < lengths[:, None]
        return out, mask, torch.tanh(self.bridge(torch.cat([h_n[0], h_n[1]], -1)))

    def step(self, y, h, context, enc, mask):
        """One decoder step: previous token y [B], state h [B, H], previous context [B, 2H]."""
        h = self.decoder(torch.cat([self.tgt_embed(y), context], -1), h)
        context, weights = self.attention(h, enc, mask)
        return self.readout(torch.cat([h, context], -1)), h, context, weights

    def forward(self, src, lengths, tgt):
        """Teacher forcing: logits [B, T, V] for predicting tgt [B, T] from BOS + tgt[:, :-1]."""
        enc, mask, h = self.encode(src, lengths)
        context = enc.new_zeros(src.size(0), enc.size(-1))
        y = torch.full((src.size(0),), BOS_ID)
        logits = []
        for t in range(tgt.size(1)):
            out, h, context, _ = self.step(y, h, context, enc, mask)
            logits.append(out)
            y = tgt[:, t]
        return torch.stack(logits, 1)


@torch.no_grad()
def greedy(model, src, lengths, max_len=MAX_TARGET):
    """-> token ids [B, max_len], attention weights [B, max_len, S]."""
    enc, mask, h = model.encode(src, lengths)
    context = enc.new_zeros(src.size(0), enc.size(-1))
    y = torch.full((src.size(0),), BOS_ID)
    tokens, attn = [], []
    for _ in range(max_len):
        out, h, context, weights = model.step(y, h, context, enc, mask)
        y = out.argmax(-1)
        tokens.append(y)
        attn.append(weights)
    return torch.stack(tokens, 1), torch.stack(attn, 1)


@torch.no_grad()
def beam_search(model, src, lengths, beam=4, max_len=MAX_TARGET):
    """Batched beam search (sum of log-probabilities; a finished hypothesis is extended by PAD at no cost)."""
    B = src.size(0)
    enc, mask, h = (t.repeat_interleave(beam, 0) for t in model.encode(src, lengths))
    context = enc.new_zeros(B * beam, enc.size(-1))
    y = torch.full((B * beam,), BOS_ID)
    scores = torch.full((B, beam), float("-inf"))
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    tokens = torch.zeros(B * beam, 0, dtype=torch.long)
    finished = torch.zeros(B * beam, dtype=torch.bool)
    for _ in range(max_len):
        out, h, context, _ = model.step(y, h, context, enc, mask)
        logp = torch.log_softmax(out, -1)
        logp[finished] = float("-inf")
        logp[finished, PAD_ID] = 0.0
        vocab = logp.size(-1)
        top, index = (scores.reshape(-1, 1) + logp).reshape(B, beam * vocab).topk(beam, 1)
        parent = (torch.arange(B)[:, None] * beam + index // vocab).reshape(-1)
        y = (index % vocab).reshape(-1)
        h, context, tokens, finished = h[parent], context[parent], tokens[parent], finished[parent]
        tokens = torch.cat([tokens, y[:, None]], 1)
        finished = finished | (y == EOS_ID)
        scores = top
        if finished.all():
            break
    best = scores.argmax(1) + torch.arange(B) * beam
    return tokens[best]


def exact_match(model, task, decoder, batch=250):
    hits = 0
    for i in range(0, len(task.test_numbers), batch):
        numbers = task.test_numbers[i:i + batch]
        src, lengths, _ = task.encode(numbers)
        ids = decoder(model, src, lengths)
        ids = ids[0] if isinstance(ids, tuple) else ids
        hits += sum(decode_digits(row) == str(n) for row, n in zip(ids, numbers))
    return hits / len(task.test_numbers)


def train_step(model, optimizer, batch):
    src, lengths, tgt = batch
    logits = model(src, lengths, tgt)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=PAD_ID)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def throughput(state, batches, rounds):
    """Training sentences per second of the same model (same weights, same batches) run by seqfast's modules and by
    torch's, interleaved round by round; the median round of each."""
    models = {impl: Translator(impl) for impl in ("seqfast", "torch")}
    optimizers = {}
    for impl, model in models.items():
        model.load_state_dict(state)
        optimizers[impl] = torch.optim.Adam(model.parameters(), lr=1e-4)
        train_step(model, optimizers[impl], batches[0])  # warm-up
    times = {impl: [] for impl in models}
    for r in range(rounds):
        for impl in (("seqfast", "torch") if r % 2 == 0 else ("torch", "seqfast")):
            start = time.perf_counter()
            for batch in batches:
                train_step(models[impl], optimizers[impl], batch)
            times[impl].append(time.perf_counter() - start)
    sentences = sum(b[0].size(0) for b in batches)
    return {impl: sentences / sorted(t)[len(t) // 2] for impl, t in times.items()}


def plot_attention(model, task, path, count=4):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    numbers = task.test_numbers[:count]
    src, lengths, _ = task.encode(numbers)
    ids, attn = greedy(model, src, lengths)
    fig, axes = plt.subplots(1, count, figsize=(4 * count, 3.6))
    for ax, n, row, weights, length in zip(axes, numbers, ids, attn, lengths):
        out = list(decode_digits(row)) + [EOS]
        ax.imshow(weights[:len(out), :length].numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(length), to_words(n), rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(out)), out)
        ax.set_title(f"{n}", fontsize=10)
    fig.suptitle("seqfast attention (decoder step x source word)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--impl", choices=["seqfast", "torch"], default="seqfast")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--throughput-rounds", type=int, default=5, help="0 skips the seqfast-vs-torch timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = NumberTask(test_size=args.test_size, seed=args.seed)
    model = Translator(args.impl)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=max(args.steps, 1),
                                                   pct_start=0.1)
    metrics = {"impl": args.impl, "steps": args.steps, "batch": args.batch, "threads": torch.get_num_threads(),
               "torch": torch.__version__}

    if args.throughput_rounds:
        batches = [task.encode(task.sample_train(args.batch)) for _ in range(5)]
        rate = throughput(model.state_dict(), batches, args.throughput_rounds)
        metrics["train_sentences_per_s"] = rate
        print(f"training throughput, same model and batches: seqfast {rate['seqfast']:.0f} sentences/s, torch "
              f"{rate['torch']:.0f} sentences/s ({rate['seqfast'] / rate['torch']:.2f}x)")

    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"training ({args.impl})", mininterval=1.0)
    loss = float("nan")
    for step in progress:
        loss = train_step(model, optimizer, task.encode(task.sample_train(args.batch)))
        schedule.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss:.4f}")
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    metrics["final_loss"] = loss

    model.eval()
    metrics["greedy_exact_match"] = exact_match(model, task, greedy)
    metrics["beam_exact_match"] = exact_match(model, task, lambda m, s, l: beam_search(m, s, l, args.beam))
    metrics["beam"] = args.beam
    metrics["test_sentences"] = len(task.test_numbers)
    print(f"{args.steps} steps in {metrics['train_seconds']} s; exact match on {len(task.test_numbers)} held-out "
          f"numbers: greedy {metrics['greedy_exact_match']:.1%}, beam {args.beam} {metrics['beam_exact_match']:.1%}")
    for n in task.test_numbers[:3]:
        src, lengths, _ = task.encode([n])
        print(f"  {' '.join(to_words(n))} -> {decode_digits(greedy(model, src, lengths)[0][0])}")

    os.makedirs(args.out, exist_ok=True)
    plot_attention(model, task, os.path.join(args.out, "attention.png"))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


if __name__ == "__main__":
    main()
