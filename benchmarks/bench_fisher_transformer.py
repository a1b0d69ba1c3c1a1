"""The Fisher of a small transformer against one training epoch (issue target: empirical ≤ 1.5×).

A pre-norm transformer encoder classifier made only of ``nn.Embedding`` (tokens, and positions
fed as ``[1, T]`` ids broadcast over the batch, as in BERT), ``nn.LayerNorm`` and
``nn.Linear`` (attention written out with Linear q/k/v/out projections, so every parameter has
a per-layer rule): vocabulary 1000, sequences of 32 tokens, width 128, 4 heads, 2 blocks, MLP
width 256, mean-pooled, 4 classes; random tokens and labels (the timing does not depend on
them). Measured side by side in one process, interleaved, best of ``--repeats``:

- one training epoch: plain PyTorch loop, Adam, batch 64;
- ``fisher_diagonal`` over the same samples, kinds ``empirical`` and ``exact``, in batches of
  ``--fisher-batch``.

    python benchmarks/bench_fisher_transformer.py [--samples 4096] [--threads 1] [--repeats 2]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ewc.fisher import fisher_diagonal


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, w = x.shape
        h = self.norm1(x)
        q, k, v = (
            f(h).view(n, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, w)
        x = x + self.out(attended)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, width: int = 128, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(64, width)
        self.blocks = nn.Sequential(*(Block(width, 4, 2 * width) for _ in range(2)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]  # [1, T], as BERT
        x = self.blocks(self.embed(tokens) + self.position(positions))
        return self.head(self.norm(x).mean(1))


def best(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fisher-batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randint(0, 1000, (args.samples, 32), device=device)
    y = torch.randint(0, 4, (args.samples,), device=device)
    model = TinyTransformer().to(device)

    def epoch() -> None:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        for start in range(0, args.samples, 64):
            loss = F.cross_entropy(model(x[start : start + 64]), y[start : start + 64])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def fisher(kind: str) -> Callable[[], None]:
        b = args.fisher_batch
        data = [(x[i : i + b], y[i : i + b]) for i in range(0, args.samples, b)]
        return lambda: fisher_diagonal(model, data, kind=kind) and None

    runs = {"epoch": epoch, "empirical": fisher("empirical"), "exact": fisher("exact")}
    times = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name] = min(times[name], best(fn, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"torch {torch.__version__}, {args.threads} threads, {name}, {args.samples} samples")
    for key, t in times.items():
        print(f"{key:10s} {t:8.2f} s  {t / times['epoch']:5.2f} x epoch")


if __name__ == "__main__":
    main()
