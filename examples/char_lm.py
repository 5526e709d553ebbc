"""Character-level language model on public-domain text (examples/data/*.txt), trained with
fastlstm.LSTM, torch.nn.LSTM, or both in turn from the same initial weights and batches.

    python examples/char_lm.py                       # --impl both: train each, compare, plot
    python examples/char_lm.py --impl fastlstm --epochs 20 --hidden 256 --layers 2
    python examples/char_lm.py --device cuda --batch 128

The model is written with torch.nn.LSTM; fastlstm.replace_lstm swaps it in place, keeping the
weights, which is all a user of torch.nn.LSTM has to change. Prints a loss/time table and a sample
of generated text, and saves a plot of the training-loss curves and the time per epoch
(--plot, default examples/char_lm.png).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fastlstm

HERE = Path(__file__).resolve().parent


class CharLM(nn.Module):
    def __init__(self, vocab_size: int, embed: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        # Dropout on the LSTM's input and output, not between its layers (nn.LSTM's own dropout):
        # then both implementations draw the same random masks and train identically.
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens, state=None):
        out, state = self.lstm(self.drop(self.embed(tokens)), state)
        return self.head(self.drop(out)), state


def load_corpus(data: Path) -> str:
    files = sorted(data.glob("*.txt")) if data.is_dir() else [data]
    if not files:
        raise SystemExit(f"no .txt files in {data}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [N, seq_len + 1] windows: inputs are [:, :-1], targets [:, 1:]."""
    n = (len(ids) - 1) // seq_len
    return torch.stack([ids[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])


def build_model(args, vocab_size: int, impl: str) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights for every implementation
    model = CharLM(vocab_size, args.embed, args.hidden, args.layers, args.dropout)
    if impl == "fastlstm":
        model = fastlstm.replace_lstm(model)
    return model.to(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch].to(device)
        logits, _ = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def sample(model, stoi, itos, prime: str, length: int, temperature: float, seed: int, device) -> str:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    prime = "".join(ch for ch in prime if ch in stoi) or itos[0]
    tokens = torch.tensor([[stoi[ch] for ch in prime]], device=device)
    logits, state = model(tokens)
    out = []
    for _ in range(length):
        probs = F.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen).item()
        out.append(itos[nxt])
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    model.train()
    return prime + "".join(out)


def train(args, impl: str, train_data, val_data, vocab_size: int):
    device = torch.device(args.device)
    model = build_model(args, vocab_size, impl)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order_gen = torch.Generator().manual_seed(args.seed)  # the same batches for every implementation
    steps_per_epoch = math.ceil(len(train_data) / args.batch)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    losses, epoch_times, val_losses = [], [], []
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train_data), generator=order_gen)
        bar = tqdm(range(steps_per_epoch), desc=f"{impl:>8} epoch {epoch + 1}/{args.epochs}",
                   leave=False, dynamic_ncols=True)
        sync(device)
        start = time.perf_counter()
        for step in bar:
            chunk = train_data[perm[step * args.batch:(step + 1) * args.batch]].to(device)
            logits, _ = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        sync(device)
        epoch_times.append(time.perf_counter() - start)
        val_losses.append(evaluate(model, val_data, args.batch, device))
        tqdm.write(f"{impl:>8} epoch {epoch + 1:2d}: train loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.3f}"
                   f"  val loss {val_losses[-1]:.3f}  {epoch_times[-1]:.1f} s")
    return model, dict(losses=losses, epoch_times=epoch_times, val_losses=val_losses,
                       steps_per_epoch=steps_per_epoch)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # torch wide and pale underneath, fastlstm thin on top: where they agree, both stay visible.
    style = {"torch": dict(color="tab:blue", lw=3.5, alpha=0.45, marker="o", ms=7),
             "fastlstm": dict(color="tab:orange", lw=1.2, alpha=1.0, marker="x", ms=5)}
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for impl, r in results.items():
        st = style[impl]
        ax_loss.plot(r["losses"], color=st["color"], lw=st["lw"], alpha=st["alpha"],
                     label=f"{impl} (train, per step)")
        epochs_end = [(e + 1) * r["steps_per_epoch"] - 1 for e in range(len(r["val_losses"]))]
        ax_loss.plot(epochs_end, r["val_losses"], ls="--", marker=st["marker"], ms=st["ms"],
                     color=st["color"], lw=st["lw"] / 2, alpha=st["alpha"],
                     label=f"{impl} (validation, per epoch)")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("cross-entropy (nats/char)")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    top = 0.0
    for impl, r in results.items():
        st = style[impl]
        epochs = range(1, len(r["epoch_times"]) + 1)
        ax_time.plot(epochs, r["epoch_times"], marker=st["marker"], ms=st["ms"] - 2, color=st["color"],
                     lw=st["lw"] / 2, alpha=max(st["alpha"], 0.6),
                     label=f"{impl} (median {r['median_epoch_s']:.2f} s)")
        top = max(top, max(r["epoch_times"]))
    ax_time.set_ylim(0, top * 1.4)
    ax_time.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_time.set_xlabel("epoch")
    ax_time.set_ylabel("seconds")
    ax_time.set_title("time per epoch (training steps only)")
    ax_time.grid(alpha=0.3)
    ax_time.legend(loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["fastlstm", "torch", "both"], default="both")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.2, help="on the LSTM's input and output")
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch (0: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=HERE / "data", help="a .txt file or a folder of them")
    p.add_argument("--plot", type=Path, default=HERE / "char_lm.png")
    p.add_argument("--summary", type=Path, help="also write the numbers as JSON here")
    p.add_argument("--sample-len", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    text = load_corpus(args.data)
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    ids = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    # Every tenth window is held out, so that validation samples every text, not just the last.
    all_windows = windows(ids, args.seq_len)
    held_out = torch.arange(len(all_windows)) % 10 == 9
    train_data, val_data = all_windows[~held_out], all_windows[held_out]
    print(f"corpus: {len(text):,} characters, {len(itos)} distinct; {len(train_data)} training and "
          f"{len(val_data)} validation windows of {args.seq_len}; fastlstm backend on "
          f"{args.device}: {fastlstm.backend(args.device)}")

    impls = ["torch", "fastlstm"] if args.impl == "both" else [args.impl]
    results, models = {}, {}
    for impl in impls:
        models[impl], results[impl] = train(args, impl, train_data, val_data, len(itos))

    # The median: one epoch slowed down by another process on the machine should not decide it.
    print(f"\n{'impl':>8}  {'first loss':>10}  {'final train':>11}  {'final val':>9}  "
          f"{'median s/epoch':>14}  {'total s':>7}")
    for impl, r in results.items():
        last = r["losses"][-r["steps_per_epoch"]:]
        r["median_epoch_s"] = statistics.median(r["epoch_times"])
        print(f"{impl:>8}  {r['losses'][0]:10.4f}  {sum(last) / len(last):11.4f}  "
              f"{r['val_losses'][-1]:9.4f}  {r['median_epoch_s']:14.2f}  {sum(r['epoch_times']):7.1f}")
    if len(results) == 2:
        t, f = results["torch"], results["fastlstm"]
        # Same weights and batches: the first losses agree to rounding; later ones may drift apart
        # as training amplifies rounding differences, but the curves should stay together.
        print(f"first-step loss difference: {abs(t['losses'][0] - f['losses'][0]):.2e}, "
              f"largest over training: {max(abs(a - b) for a, b in zip(t['losses'], f['losses'])):.2e}; "
              f"median epoch time torch / fastlstm: {t['median_epoch_s'] / f['median_epoch_s']:.2f}")

    for impl, model in models.items():
        text_out = sample(model, stoi, itos, "And God said", args.sample_len, args.temperature,
                          args.seed, args.device)
        print(f"\n--- sample ({impl}) ---\n{text_out}")

    title = (f"char LM, {len(text) // 1000} k chars: embed {args.embed}, hidden {args.hidden}, "
             f"{args.layers} layer(s), seq {args.seq_len}, batch {args.batch}, {args.device}")
    plot(results, args.plot, title)
    print(f"\nplot: {args.plot}")
    if args.summary:
        args.summary.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
