"""Continual fine-tuning in a Hugging Face ``Trainer``: task A, then B, with and without EWC.

A tiny BERT built from a config (no downloads) learns the two toy tasks of
``toy_text_tasks.py`` one after the other, all its weights trained or (``--lora``) through a
LoRA adapter on a base first trained on a third, pretext task. The same ``EWCCallback`` goes
to both trainers: it consolidates when task A's training ends and holds what A needs while B
is learned. Offline, on CPU::

    python examples/hf_two_tasks.py [--lora] [--lam 1e5] [--seed 0]

prints task A's test accuracy after A and after B, and task B's after B (in %), for naive
fine-tuning and for EWC.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from toy_text_tasks import TokenTask, accuracy, lora, tiny_bert
from transformers import PrinterCallback, Trainer, TrainingArguments

from ewc.integrations.huggingface import EWCCallback

#: The fraction of training labels flipped (test labels are clean): a model that cannot become
#: certain keeps a Fisher that protects task A over a wider range of λ.
NOISE = 0.1

#: EWC's λ: chosen from decades 1e2..1e5 on seed 0 and 1 (docs/integrations/huggingface.md).
LAM = 1e5

#: Learning rate and epochs per task, for all weights and for a LoRA adapter.
SETTINGS = {"full": {"lr": 1e-3, "epochs": 3}, "lora": {"lr": 3e-3, "epochs": 5}}


def quiet_args(output_dir: str, **args: Any) -> TrainingArguments:
    """``TrainingArguments`` for AdamW at a constant learning rate, batches of 32, on the CPU,
    quiet and without checkpoints; ``args`` add or override any of them."""
    options: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=32,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    return TrainingArguments(**{**options, **args})


def train(model: torch.nn.Module, task: TokenTask, callbacks: list, **args: Any) -> None:
    """One task: ``Trainer.train()`` with :func:`quiet_args` (``args`` override them)."""
    with tempfile.TemporaryDirectory() as out:
        trainer_args = quiet_args(out, **args)
        trainer = Trainer(model=model, args=trainer_args, train_dataset=task, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # the end-of-training metrics line
        trainer.train()


def pretrained_base(seed: int) -> torch.nn.Module:
    """``tiny_bert(seed)`` with all its weights trained on 2048 sequences of the pretext task
    (3 epochs, lr 1e-3): a stand-in for the pretrained checkpoint that a LoRA adapter assumes."""
    model = tiny_bert(seed)
    pretext = TokenTask("pretext", 2048, seed + 100)
    train(model, pretext, [], learning_rate=1e-3, num_train_epochs=3, seed=seed)
    return model


def main(
    lam: float | None, adapter: bool = False, n: int = 512, seed: int = 0, **args: Any
) -> dict[str, float]:
    """Train A then B (``lam=None``: naive, else EWC with that λ), all weights or (``adapter``)
    a LoRA adapter; return the accuracies in %. ``args`` override ``TrainingArguments`` (e.g.
    ``bf16=True``, ``gradient_accumulation_steps=2``)."""
    callbacks = [] if lam is None else [EWCCallback(lam=lam)]
    return two_tasks(callbacks, adapter, n, seed, **args)


def two_tasks(
    callbacks: list, adapter: bool = False, n: int = 512, seed: int = 0, **args: Any
) -> dict[str, float]:
    """:func:`main` with the trainer callbacks given (e.g. an ``EWCCallback`` to inspect after)."""
    setting = SETTINGS["lora" if adapter else "full"]
    model = lora(pretrained_base(seed), seed) if adapter else tiny_bert(seed)
    task_a, task_b = TokenTask("a", n, seed, NOISE), TokenTask("b", n, seed + 1, NOISE)
    test_a, test_b = TokenTask("a", 512, seed + 2), TokenTask("b", 512, seed + 3)
    args = {
        "learning_rate": setting["lr"],
        "num_train_epochs": setting["epochs"],
        "seed": seed,
        **args,
    }
    train(model, task_a, callbacks, **args)
    after_a = accuracy(model, test_a)
    train(model, task_b, callbacks, **args)
    return {
        "A after A": after_a,
        "A after B": accuracy(model, test_a),
        "B": accuracy(model, test_b),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter only")
    parser.add_argument("--lam", type=float, default=LAM, help=f"EWC's λ (default {LAM:g})")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the data")
    cli = parser.parse_args()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    for name, strength in (("naive", None), ("EWC", cli.lam)):
        result = main(strength, adapter=cli.lora, seed=cli.seed)
        print(f"{name:6s}" + "  ".join(f"{k}: {v:5.1f}" for k, v in result.items()))
