"""Two toy text-classification tasks that a small transformer forgets, and the model to learn them.

Everything is made here, offline: token ids are drawn at random (no tokenizer, no download) and
the transformer is built from a config with random weights (no pretrained checkpoint).

Both tasks draw their sequences from the same tokens and start with a token naming the task.

* Task A: label 1 when the marker token ``A_MARKER`` occurs.
* Task B: label 1 when the marker ``B_MARKER`` does **not** occur.
* ``"pretext"``, a third task to pretrain a base model on (a stand-in for a pretrained
  checkpoint, for the LoRA example): label 1 when the filler token ``PRETEXT_MARKER`` occurs
  (about 17 % of the sequences; it is not inserted).

One shared head answers both (domain-incremental). A model fine-tuned on B alone learns "no
marker -> 1", which is wrong for every negative of task A: task A's accuracy falls towards 50 %
without a regularizer. Both tasks together are learnable (the first token tells them apart).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

SEQ_LEN = 12
VOCAB = 64
TASK_TOKEN = {"a": 1, "b": 2, "pretext": 3}
A_MARKER = 5
B_MARKER = 40
PRETEXT_MARKER = 7
FILLER = torch.tensor([t for t in range(4, VOCAB) if t not in (A_MARKER, B_MARKER)])
#: task -> (its marker, whether the label is 1 when the marker occurs, whether half of the
#: sequences get the marker inserted)
RULES = {
    "a": (A_MARKER, True, True),
    "b": (B_MARKER, False, True),
    "pretext": (PRETEXT_MARKER, True, False),
}


class TokenTask(Dataset):
    """``n`` sequences of ``SEQ_LEN`` token ids, half with task A's or B's marker; HF-style items
    (``input_ids``, ``labels``; no ``attention_mask``: every sequence has full length).

    Args:
        task: ``"a"``, ``"b"`` or ``"pretext"``.
        n: number of samples.
        seed: seeds the sequences (use different seeds for training and test data).
        noise: the fraction of labels flipped at random (label noise keeps a model from
            becoming certain, which would make its Fisher information vanish).
    """

    def __init__(self, task: str, n: int, seed: int, noise: float = 0.0) -> None:
        if task not in RULES:
            raise ValueError(f"task must be one of {list(RULES)}; got {task!r}.")
        marker, present_is_positive, insert = RULES[task]
        g = torch.Generator().manual_seed(seed)
        ids = FILLER[torch.randint(len(FILLER), (n, SEQ_LEN), generator=g)]
        ids[:, 0] = TASK_TOKEN[task]
        has_marker = (torch.arange(n) % 2 == 0) & insert
        where = torch.randint(1, SEQ_LEN, (n,), generator=g)
        ids[has_marker, where[has_marker]] = marker
        self.input_ids = ids
        occurs = (ids[:, 1:] == marker).any(1)  # the pretext marker is also a filler token
        label = occurs if present_is_positive else ~occurs
        flip = torch.rand(n, generator=g) < noise
        self.labels = (label ^ flip).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def tiny_bert(seed: int = 0):
    """A 2-layer BERT for 2-class sequence classification (hidden size 32), random weights."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ_LEN,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def lora(model, seed: int = 0):
    """``model`` with a LoRA adapter (rank 8) on every attention and feed-forward projection;
    the classifier head stays trainable, everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["query", "key", "value", "dense"],
    )
    return get_peft_model(model, config)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TokenTask) -> float:
    """Accuracy of ``model`` on ``data`` in %, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(input_ids=data.input_ids.to(device)).logits
    model.train(was_training)
    return 100.0 * float((logits.argmax(-1).cpu() == data.labels).float().mean())
