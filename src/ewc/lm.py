"""Language models saved by Hugging Face ``transformers``: their Fisher from a text file, computed
once and written as an importance folder (``ewc fisher``), and text as model batches.

A model folder is what ``model.save_pretrained(folder)`` and ``tokenizer.save_pretrained(folder)``
write: a causal language model (``...ForCausalLM``, ``...LMHeadModel``) or a sequence
classifier (``...ForSequenceClassification``), told apart by ``config.json``'s
``architectures``; or a PEFT adapter folder (``adapter_config.json``, its base model a local
folder), whose adapter weights are the trainable parameters the Fisher is computed for.

Text files: ``.txt`` (one sample per non-empty line, or with ``paragraphs=True`` per block of
lines separated by blank lines) or ``.jsonl`` (one JSON object per line, the text in
``text_field``; a sequence classifier's label, where the Fisher kind needs one, in
``label_field``).

Memory: the batches are tokenized one at a time as the Fisher reads them, and
:func:`ewc.fisher_diagonal` keeps one running sum per parameter, so the peak is about one
training step's (the model, one batch's activations and gradients, and the sums) whatever the
number of samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ewc._optional import require
from ewc.fisher import KINDS, fisher_diagonal
from ewc.fisher.likelihoods import MAX_EXACT_PASSES
from ewc.importance_file import ImportanceFile
from ewc.progress import Progress
from ewc.readback import existing_folder

__all__ = ["LanguageModel", "compute_fisher", "load_model", "read_texts", "text_batches"]

CAUSAL, CLASSIFIER = "causal-lm", "sequence-classification"
#: The default Fisher kind per model type: one sampled label per position for a vocabulary
#: (the exact Fisher needs a backward pass per vocabulary entry), exact for a few classes.
DEFAULT_KIND = {CAUSAL: "sampled", CLASSIFIER: "exact"}
_SUFFIXES = (".txt", ".jsonl")


@dataclass
class LanguageModel:
    """A model folder loaded: the model (a PEFT model for an adapter folder), its tokenizer,
    ``task`` (``"causal-lm"`` or ``"sequence-classification"``) and a description for the
    importance file."""

    model: nn.Module
    tokenizer: Any
    task: str
    description: dict[str, Any]


def load_model(path: str | os.PathLike[str]) -> LanguageModel:
    """Load a local Hugging Face model folder (see the module docstring), in float32 unless the
    config says otherwise, in eval mode. Raises ``ValueError`` / ``FileNotFoundError`` naming the
    folder and the fix for a missing folder, a folder that is not a model, an unsupported
    architecture or a missing tokenizer."""
    transformers = require("transformers", "hf")
    fix = "give the folder that model.save_pretrained() wrote"
    folder = existing_folder(path, "model folder", fix)
    adapter = folder / "adapter_config.json"
    base = folder
    if adapter.is_file():
        base = Path(_read_json(adapter).get("base_model_name_or_path") or "")
        if not (base / "config.json").is_file():
            raise ValueError(
                f"{str(adapter)!r} names the base model {str(base)!r}, which is not a local model "
                "folder; set base_model_name_or_path to the folder of the base model"
            )
    elif not (folder / "config.json").is_file():
        raise ValueError(
            f"{str(folder)!r} is not a Hugging Face model folder (no config.json or "
            "adapter_config.json); save one with model.save_pretrained(folder) and "
            "tokenizer.save_pretrained(folder)"
        )
    config = transformers.AutoConfig.from_pretrained(base)
    task = _task(config.architectures or [], base)
    auto = {
        CAUSAL: ("AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
        CLASSIFIER: (
            "AutoModelForSequenceClassification",
            "AutoPeftModelForSequenceClassification",
        ),
    }[task]
    tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        if not tokenizer("a b")["input_ids"]:  # no vocabulary files: an empty tokenizer
            raise ValueError("it has no vocabulary: it tokenizes text to nothing")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {str(tokenizer_dir)!r} ({e}); save it into the model "
            "folder with tokenizer.save_pretrained(folder)"
        ) from None
    if adapter.is_file():
        peft = require("peft", "hf")
        model = getattr(peft, auto[1]).from_pretrained(folder, is_trainable=True)
    else:
        model = getattr(transformers, auto[0]).from_pretrained(folder)
    model.eval()
    inner = model.get_base_model() if adapter.is_file() else model
    description = {
        "class": type(inner).__name__,
        "path": str(folder.resolve()),
        "task": task,
        "adapter": adapter.is_file(),
    }
    return LanguageModel(model, tokenizer, task, description)


def _task(architectures: Sequence[str], folder: Path) -> str:
    """``"causal-lm"`` or ``"sequence-classification"`` from ``config.architectures``."""
    for name in architectures:
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return CAUSAL
        if name.endswith("ForSequenceClassification"):
            return CLASSIFIER
    raise ValueError(
        f"{str(folder / 'config.json')!r} has architectures {list(architectures)}; ewc fisher "
        "reads causal language models (...ForCausalLM, ...LMHeadModel) and sequence "
        "classifiers (...ForSequenceClassification). Save the model with its head class."
    )


def read_texts(
    path: str | os.PathLike[str],
    text_field: str = "text",
    label_field: str | None = None,
    paragraphs: bool = False,
) -> tuple[list[str], list[int] | None]:
    """The samples of a ``.txt`` or ``.jsonl`` file (module docstring), and their integer labels
    when ``label_field`` is given (``.jsonl`` only; every line must have one). Raises
    ``ValueError`` naming the file (and line) for an unknown suffix, an empty file, a line that
    is not a JSON object or lacks the field; ``FileNotFoundError`` for a missing file."""
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise ValueError(
            f"data file {str(path)!r}: expected a .txt (one sample per line) or .jsonl (one JSON "
            f"object per line) file, got the suffix {path.suffix!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    labels: list[int] | None = None
    if path.suffix == ".txt":
        if label_field is not None:
            raise ValueError(f"{str(path)!r} is a .txt file: labels need a .jsonl file")
        if paragraphs:
            samples = [b.strip() for b in re.split(r"\n[ \t\r]*\n", text) if b.strip()]
        else:
            samples = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        samples, labels = _read_jsonl(path, text, text_field, label_field)
    if not samples:
        raise ValueError(f"data file {str(path)!r} holds no text samples (it is empty or blank)")
    return samples, labels


def _read_jsonl(
    path: Path, text: str, text_field: str, label_field: str | None
) -> tuple[list[str], list[int] | None]:
    samples: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {number}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{where} has no text field {text_field!r} (keys: {keys}); name the field with "
                "--text-field"
            )
        if label_field is not None:
            label = row.get(label_field)
            if isinstance(label, bool) or not isinstance(label, int):
                raise ValueError(
                    f"{where}: label field {label_field!r} must be an integer class, got {label!r}"
                )
            labels.append(label)
        if row[text_field].strip():
            samples.append(row[text_field])
        elif label_field is not None:
            labels.pop()
    return samples, labels if label_field is not None else None


def text_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    task: str = CAUSAL,
    labels: Sequence[int] | None = None,
    max_length: int = 256,
    batch_size: int = 8,
) -> Iterator[dict[str, Tensor]]:
    """``texts`` as model batches, tokenized one batch at a time (lazily): ``input_ids`` and
    ``attention_mask`` ``[B, T]`` (right-padded, cut at ``max_length`` tokens) and ``labels``:
    for a causal LM the input ids with ``-100`` at padding (what
    :func:`ewc.integrations.huggingface.next_token_logits_and_labels` shifts), for a sequence
    classifier ``labels`` (or zeros, for the Fisher kinds that draw their own labels) ``[B]``.
    A tokenizer without a padding token pads with its end-of-sequence token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a padding nor an end-of-sequence token; set "
                "tokenizer.pad_token and save it into the model folder"
            )
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(
            chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if task == CAUSAL:
            batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        elif labels is not None:
            batch["labels"] = torch.tensor(labels[start : start + batch_size])
        else:
            batch["labels"] = torch.zeros(len(chunk), dtype=torch.long)
        yield batch


def compute_fisher(
    model_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    *,
    kind: str | None = None,
    samples: int | None = None,
    max_length: int = 256,
    batch_size: int = 8,
    text_field: str = "text",
    label_field: str | None = None,
    paragraphs: bool = False,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> ImportanceFile:
    """The diagonal Fisher of a model folder on a text file (:func:`ewc.fisher_diagonal`, the
    mean over samples of per-sample squared gradients of the log-likelihood: for a causal LM a
    sequence's log-likelihood is the sum over its next-token predictions), as an
    :class:`~ewc.importance_file.ImportanceFile` with the weights as anchor; ``.save(folder)``
    writes it.

    Args:
        model_path: a local model or PEFT adapter folder (module docstring).
        data_path: a ``.txt`` or ``.jsonl`` file (:func:`read_texts`).
        kind: the Fisher kind; ``None``: ``"sampled"`` for a causal LM, ``"exact"`` for a
            classifier. ``"empirical"`` uses the text's own next tokens (causal LM) or the
            ``label_field`` labels (classifier).
        samples: use the first ``samples`` samples (``None``: all).
        max_length: tokens per sample at most (longer samples are cut; at most the model's
            number of positions, ``config.max_position_embeddings`` / ``n_positions``).
        batch_size: samples per forward/backward pass (memory grows with it, not with
            ``samples``).
        seed: seeds the labels ``"sampled"`` draws.
        device: where the model runs (``"cpu"``, ``"cuda"``).
        progress: show a progress bar (tqdm, on stderr).

    Raises ``ValueError`` (or ``FileNotFoundError``) naming the bad value and the fix, before the
    model is run."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown Fisher kind {kind!r}; choose one of {', '.join(KINDS)}")
    for name, value, least in (("samples", samples, 1), ("batch_size", batch_size, 1)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (tokens); got {max_length!r}")
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available; use cpu")
    texts, labels = read_texts(data_path, text_field, label_field, paragraphs)
    loaded = load_model(model_path)
    task = loaded.task
    kind = kind or DEFAULT_KIND[task]
    if task == CLASSIFIER and kind in ("empirical", "batched") and labels is None:
        raise ValueError(
            f"the {kind} Fisher of a sequence classifier needs the true labels: give a .jsonl "
            "file with a label per sample and --label-field (or use --kind exact or sampled)"
        )
    config = loaded.model.config
    max_length = min(max_length, getattr(config, "max_position_embeddings", None) or max_length)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab and len(loaded.tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer in {str(model_path)!r} has {len(loaded.tokenizer)} tokens but the "
            f"model's vocabulary has {vocab}: save the model's own tokenizer into its folder"
        )
    if task == CAUSAL and kind == "exact" and vocab * (max_length - 1) > MAX_EXACT_PASSES:
        raise ValueError(
            f"the exact Fisher of a causal LM takes one backward pass per position and vocabulary "
            f"entry: {vocab} × {max_length - 1} > {MAX_EXACT_PASSES}; use --kind sampled "
            "(unbiased, one pass per batch)"
        )
    texts = texts[:samples]
    labels = labels[:samples] if labels is not None else None
    from ewc.integrations.huggingface import logits_and_labels, next_token_logits_and_labels

    model = loaded.model.to(device)
    batches = text_batches(
        loaded.tokenizer,
        texts,
        task=task,
        labels=labels,
        max_length=max_length,
        batch_size=batch_size,
    )
    n_batches = -(-len(texts) // batch_size)
    shown = Progress(progress, "ewc fisher").iterate(
        batches, f"{kind} Fisher on {len(texts)} samples", n_batches, "batch"
    )
    forward = next_token_logits_and_labels if task == CAUSAL else logits_and_labels
    importance = fisher_diagonal(
        model, shown, kind=kind, forward=forward, seed=seed, distributed=False
    )
    anchor = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    data = {
        "path": str(Path(data_path).resolve()),
        "sha256": hashlib.sha256(Path(data_path).read_bytes()).hexdigest(),
        "format": Path(data_path).suffix[1:],
        "text_field": text_field if Path(data_path).suffix == ".jsonl" else None,
        "label_field": label_field,
        "paragraphs": paragraphs,
        "max_length": max_length,
        "batch_size": batch_size,
        "seed": seed,
    }
    return ImportanceFile(
        importance=importance,
        anchor=anchor,
        strategy="ewc",
        fisher=kind,
        n_samples=len(texts),
        data=data,
        model=loaded.description,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r} as JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    return value
