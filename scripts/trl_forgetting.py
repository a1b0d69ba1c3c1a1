"""Text A's loss kept by EWC in a TRL ``SFTTrainer`` + LoRA fine-tune on text B, over seeds and λ.

Runs ``examples/trl_sft_lora.py`` (task A, ``ewc fisher`` of the adapter, task B without EWC and
with ``EWCCallback(start_from=<the Fisher file>)`` per λ) for every seed, and writes the numbers
as JSON and a Markdown table (the table in docs/integrations/language-models.md):

    python scripts/trl_forgetting.py --seeds 0,1,2 --lams 10,100,1000 --out runs/trl

Loss: mean cross-entropy per token (nats) on 128 held-out sentences of each text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from trl_sft_lora import main


def table(runs: dict[int, dict[str, float]], lams: list[float]) -> str:
    """Per seed and on average: text A's loss before B, after B (naive, EWC per λ), and the
    fraction of A's loss increase that EWC kept away; text B's loss after B."""
    arms = ["naive", *(f"ewc{lam:g}" for lam in lams)]
    names = ["naive", *(f"EWC λ={lam:g}" for lam in lams)]
    head = ["seed", "A before B"]
    head += [f"A after B: {n}" for n in names] + [f"B after B: {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, values: dict[str, float]) -> str:
        cells = [label, f"{values['a_before']:.3f}"]
        cells += [f"{values['a_' + a]:.3f}" for a in arms]
        cells += [f"{values['b_' + a]:.3f}" for a in arms]
        return "| " + " | ".join(cells) + " |"

    for seed, r in runs.items():
        lines.append(row(str(seed), r))
    keys = next(iter(runs.values())).keys()
    mean = {k: statistics.mean(r[k] for r in runs.values()) for k in keys}
    lines.append(row("mean", mean))
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lams", default="10,100,1000")
    parser.add_argument("--out", type=Path, default=Path("runs/trl"))
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    seeds = [int(s) for s in a.seeds.split(",")]
    lams = [float(v) for v in a.lams.split(",")]
    runs: dict[int, dict[str, float]] = {}
    for seed in seeds:
        start = time.perf_counter()
        runs[seed] = main(seed, tuple(lams), a.out / f"seed{seed}")
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "trl_forgetting.json").write_text(json.dumps({"lams": lams, "runs": runs}, indent=1))
    md = table(runs, lams)
    (a.out / "trl_forgetting.md").write_text(md + "\n")
    print(md)
