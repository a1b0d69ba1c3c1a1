"""The vanishing Fisher of issue 20: a tiny BERT fine-tuned with Adam until it is near-certain on
task A, then on task B with EWC at a range of λ, raw, ``normalize="mean"`` and
``normalize="rewrite"``; for each λ, task A's and B's test accuracy after B and whether
``consolidate`` warned that the penalty cannot matter
(:class:`ewc.regularizers.scale.WeakPenaltyWarning`).

    python scripts/vanishing_fisher.py --seeds 0,1,2               # the examples' BERT
    python scripts/vanishing_fisher.py --seeds 0,1,2 --hidden 64   # 3.7x its parameters

Offline: the model is built from a config (examples/toy_text_tasks.py's ``tiny_bert``: 2 layers,
hidden size 32, 20,770 parameters; ``--hidden 64`` doubles its widths: 76,354) and the tasks are
that file's (task A: label 1 when marker A occurs; task B: label 1 when marker B does not; one
shared head). Task A: 1024 sequences, 4 epochs of Adam (lr 1e-3, batch 32); task B: 1024
sequences, 2 epochs, the penalty's gradient added by ``add_penalty_grad``; tests: 512 fresh
sequences each. One thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

import ewc
from ewc.regularizers.scale import WeakPenaltyWarning

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from toy_text_tasks import TokenTask, accuracy, tiny_bert

GRIDS = {
    "raw": (0.0, 1e5, 1e8, 1e9, 1e10, 1e11, 1e12),
    "mean": (1e3, 1e5, 1e6, 1e7),
    "rewrite": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
}


def bert(seed: int, hidden: int) -> nn.Module:
    """``tiny_bert(seed)`` with hidden size ``hidden`` (and 2x that in its feed-forward)."""
    model = tiny_bert(seed)
    if hidden == model.config.hidden_size:
        return model
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = model.config
    config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    return BertForSequenceClassification(config)


def forward(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return model(input_ids=batch["input_ids"]).logits, batch["labels"]


def batches(data: TokenTask, size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(data), size):
        rows = order[i : i + size]
        yield {"input_ids": data.input_ids[rows], "labels": data.labels[rows]}


def train(model: nn.Module, data: TokenTask, epochs: int, reg: ewc.EWC | None = None) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        for batch in batches(data, 32, epoch):
            loss = nn.functional.cross_entropy(*forward(model, batch))
            optimizer.zero_grad()
            loss.backward()
            if reg is not None:
                reg.add_penalty_grad()
            optimizer.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (model and data)")
    p.add_argument("--hidden", type=int, default=32, help="the BERT's hidden size")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows: dict[tuple[str, float], list[tuple[float, float, bool]]] = {}
    for seed in map(int, args.seeds.split(",")):
        a_train, a_test = TokenTask("a", 1024, 100 * seed), TokenTask("a", 512, 100 * seed + 1)
        b_train, b_test = TokenTask("b", 1024, 100 * seed + 2), TokenTask("b", 512, 100 * seed + 3)
        model = bert(seed, args.hidden)
        if seed == int(args.seeds.split(",")[0]):
            print(f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
        train(model, a_train, 4)
        after_a = {k: v.clone() for k, v in model.state_dict().items()}
        for norm, grid in GRIDS.items():
            for lam in grid:
                model.load_state_dict(after_a)
                reg = ewc.EWC(
                    model, lam, forward=forward, normalize=norm if norm != "raw" else None
                )
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", WeakPenaltyWarning)
                    reg.consolidate(batches(a_train, 128, 0))
                stats = reg.stats[0]
                train(model, b_train, 2, reg)
                warned = any(issubclass(w.category, WeakPenaltyWarning) for w in caught)
                rows.setdefault((norm, lam), []).append(
                    (accuracy(model, a_test), accuracy(model, b_test), warned)
                )
                print(
                    f"seed {seed} {norm} λ={lam:g}: A {rows[norm, lam][-1][0]:.1f} B "
                    f"{rows[norm, lam][-1][1]:.1f} warned={warned} max-prob "
                    f"{stats['confidence']['max_prob']:.5f} mean F {stats['fisher_mean']:.2e} "
                    f"unprotected {stats['unprotected']:.2f} λ½ {stats['lam_half']:.2e} "
                    f"probe {stats['probe_s']:.3f}s",
                    flush=True,
                )
    print(f"hidden {args.hidden}")
    print("| Fisher | λ | task A after B (%) | task B (%) | warned (seeds) |")
    print("| --- | --- | --- | --- | --- |")
    for (norm, lam), runs in rows.items():
        a = statistics.mean(r[0] for r in runs)
        b = statistics.mean(r[1] for r in runs)
        print(f"| {norm} | {lam:g} | {a:.1f} | {b:.1f} | {sum(r[2] for r in runs)}/{len(runs)} |")


if __name__ == "__main__":
    main()
