"""TRL's ``SFTTrainer`` with a LoRA adapter, two texts in sequence, EWC started from a Fisher file.

Everything is offline: a byte-level BPE tokenizer trained here on the two texts, a 2-layer GPT-2
built from a config, toy texts made from two small grammars.

0. The base model: the GPT-2 trained (all weights) on the words of both grammars in random
   order, a stand-in for the pretrained checkpoint that LoRA assumes (it knows the words, not
   the grammars); saved with its tokenizer.
1. Task A: a LoRA adapter learns text A (``SFTTrainer``); the adapter is saved.
2. The Fisher of the adapter on text A, once: ``ewc fisher --model <adapter> --data a.txt
   --out <fisher>`` (the command, run in this process).
3. Task B, twice from the same adapter: plain, and with ``EWCCallback(start_from=<fisher>)``;
   a ``ForgettingMeterCallback`` on text A logs its loss during both.

    python examples/trl_sft_lora.py --seed 0 [--lam 1e3] [--out runs/trl]

Prints text A's loss (nats per token) before task B and after it, with and without EWC, and
text B's loss after it. Needs ``pip install 'ewc[trl]'``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

#: Two toy "languages": sentences drawn from two disjoint small grammars.
GRAMMARS = {
    "a": (
        ["the cat", "a dog", "my bird", "the old fox", "a small mouse"],
        ["eats", "sees", "chases", "likes", "finds"],
        ["the fish", "a bone", "some seeds", "the cheese", "a red ball"],
    ),
    "b": (
        ["one", "two", "three", "four", "five"],
        ["plus", "times", "minus", "over", "and"],
        ["six is nine", "seven is ten", "eight is zero", "nine is one", "ten is two"],
    ),
}
LAM = 1e3
LR = 1e-2
EPOCHS = 3
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


def texts(task: str, n: int, seed: int) -> list[str]:
    """``n`` sentences of grammar ``task`` (``"a"`` or ``"b"``), drawn with ``seed``."""
    rng = random.Random(f"{task}-{seed}")
    return [" ".join(rng.choice(part) for part in GRAMMARS[task]) + " ." for _ in range(n)]


def pretext(n: int, seed: int) -> list[str]:
    """``n`` sentences of either grammar with their words shuffled: the base model's text."""
    rng = random.Random(f"pretext-{seed}")
    words = [s.split() for s in texts("a", n // 2, seed) + texts("b", n - n // 2, seed)]
    for w in words:
        rng.shuffle(w)
    return [" ".join(w) for w in words]


def build_base(folder: Path, seed: int, n: int = 1024) -> None:
    """A byte-level BPE tokenizer trained on both grammars and a 2-layer GPT-2 trained on ``n``
    :func:`pretext` sentences, saved in ``folder`` (what ``save_pretrained`` writes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts("a", 200, 99) + texts("b", 200, 99), trainer)
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    sft(model, tokenizer, pretext(n, seed), folder / "pretraining", seed, [])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def sft(model: Any, tokenizer: Any, data: list[str], out: Path, seed: int, callbacks: list) -> None:
    """One task: ``SFTTrainer`` on ``data`` (EPOCHS epochs, AdamW at the constant lr LR,
    batches of 16)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=16,
        num_train_epochs=EPOCHS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_length=32,
        seed=seed,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": data}),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def main(
    seed: int = 0, lams: tuple[float, ...] = (LAM,), out: Path | None = None, n: int = 512
) -> dict[str, float]:
    """The steps (module docstring), task B once without EWC and once per λ in ``lams``.
    Returns text A's loss before task B (``a_before``) and after it (``a_naive``, ``a_ewc<λ>``),
    and text B's after it (``b_naive``, ``b_ewc<λ>``), in nats per token on 128 held-out
    sentences each. ``n``: sentences per task (the base model reads ``2n``)."""
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ewc.cli import main as ewc_command
    from ewc.integrations import reference_loss
    from ewc.integrations.huggingface import (
        EWCCallback,
        ForgettingMeterCallback,
        next_token_logits_and_labels,
    )
    from ewc.lm import text_batches

    root = Path(out or tempfile.mkdtemp(prefix="ewc-trl-"))
    base, adapter, fisher = root / "base", root / "adapter-a", root / "fisher-a"
    build_base(base, seed, 2 * n)
    tokenizer = AutoTokenizer.from_pretrained(base)
    text_a, text_b = texts("a", n, seed), texts("b", n, seed)
    (root / "a.txt").write_text("\n".join(text_a) + "\n")

    # Task A: a LoRA adapter on the base learns text A.
    torch.manual_seed(seed)
    lora = LoraConfig(  # fan_in_fan_out: GPT-2's Conv1D stores its weight transposed
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    sft(model, tokenizer, text_a, root / "task-a", seed, [])
    model.save_pretrained(adapter)

    # The adapter's Fisher on text A, once.
    command = ["fisher", "--model", str(adapter), "--data", str(root / "a.txt")]
    command += ["--out", str(fisher), "--samples", "256", "--max-length", "32"]
    if ewc_command([*command, "--seed", str(seed), "--quiet"]) != 0:
        raise RuntimeError("ewc fisher failed (its error is above)")

    # Task B from the same adapter, without and with EWC; the meter watches text A.
    def held_out(task: str) -> list[dict[str, torch.Tensor]]:
        sentences = texts(task, 128, seed + 1000)
        return list(text_batches(tokenizer, sentences, max_length=32, batch_size=32))

    result: dict[str, float] = {}
    for arm, lam in (("naive", None), *((f"ewc{lam:g}", lam) for lam in lams)):
        model = AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True)
        meter = ForgettingMeterCallback(
            held_out("a"), every=10, forward=next_token_logits_and_labels, name="text_a"
        )
        callbacks: list[Any] = [meter]
        if lam is not None:
            ewc_cb = EWCCallback(
                lam,
                start_from=fisher,
                fisher="sampled",
                forward=next_token_logits_and_labels,
                fisher_samples=64,
            )
            callbacks.insert(0, ewc_cb)
        sft(model, tokenizer, text_b, root / f"task-b-{arm}", seed, callbacks)
        result["a_before"] = meter.history[0]["text_a/loss"]
        result[f"a_{arm}"] = meter.history[-1]["text_a/loss"]
        result[f"b_{arm}"] = reference_loss(model, held_out("b"), next_token_logits_and_labels)[0]
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", type=float, default=LAM)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp)")
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    r = main(a.seed, (a.lam,), a.out)
    tag = f"ewc{a.lam:g}"
    print(
        f"text A loss before task B {r['a_before']:.3f}; after B: naive {r['a_naive']:.3f}, "
        f"EWC λ={a.lam:g} {r['a_' + tag]:.3f}. Text B loss after B: naive {r['b_naive']:.3f}, "
        f"EWC {r['b_' + tag]:.3f}"
    )
