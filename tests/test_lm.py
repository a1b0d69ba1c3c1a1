"""``ewc fisher`` on tiny GPT-2 / BERT / LoRA folders built offline, the text batches, starting the
callbacks from a Fisher file, and the forgetting meters (Hugging Face and Lightning)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from transformers import PrinterCallback, Trainer, TrainingArguments  # noqa: E402

import ewc  # noqa: E402
from ewc.cli import main  # noqa: E402
from ewc.importance_file import ImportanceFileError  # noqa: E402
from ewc.integrations.huggingface import (  # noqa: E402
    EWCCallback,
    ForgettingMeterCallback,
    logits_and_labels,
    next_token_logits_and_labels,
)
from ewc.lm import compute_fisher, load_model, text_batches  # noqa: E402

LINES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "one two three four five",
    "my bird sings at dawn",
    "the old fox sleeps",
]


def tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on LINES (offline), padding with its end token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=alphabet)
    tok.train_from_iterator(LINES * 4, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=special[0], pad_token=special[0]
    )


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    tok = tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tok),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bert")
    tok = tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "general.txt"
    path.write_text("\n".join(LINES) + "\n\n")
    return path


def fisher_cli(*args: str | Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's per-sample loop note
        return main(["fisher", "--quiet", *map(str, args)])


def test_ewc_fisher_writes_the_streamed_fisher_of_a_causal_lm(
    gpt2_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fisher"
    assert (
        fisher_cli("--model", gpt2_dir, "--data", text_file, "--out", out, "--batch-size", "2") == 0
    )
    file = ewc.load_importance(out)
    meta = json.loads((out / "importance.json").read_text())
    loaded = load_model(gpt2_dir)
    assert (file.fisher, file.n_samples, file.strategy) == ("sampled", len(LINES), "ewc")
    assert meta["model"]["class"] == "GPT2LMHeadModel" and meta["model"]["task"] == "causal-lm"
    assert meta["data"]["format"] == "txt" and len(meta["data"]["sha256"]) == 64
    assert list(file.importance) == [n for n, _ in loaded.model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ewc.fisher_diagonal(
            loaded.model,
            list(text_batches(loaded.tokenizer, LINES, batch_size=2)),
            kind="sampled",
            forward=next_token_logits_and_labels,
        )
    for name, f in expected.items():
        assert float(f.abs().max()) > 0
        torch.testing.assert_close(file.importance[name], f, rtol=1e-4, atol=1e-10)
        assert torch.equal(file.anchor[name], dict(loaded.model.named_parameters())[name])
    out = tmp_path / "empirical"
    assert (
        fisher_cli("--model", gpt2_dir, "--data", text_file, "--out", out, "--kind", "empirical")
        == 0
    )
    with warnings.catch_warnings():  # the per-sample reference loop, whole data at once
        warnings.simplefilter("ignore")
        expected = ewc.fisher_diagonal(
            loaded.model,
            list(text_batches(loaded.tokenizer, LINES, batch_size=len(LINES))),
            kind="empirical",
            forward=next_token_logits_and_labels,
            method="loop",
        )
    for name, f in expected.items():
        torch.testing.assert_close(
            ewc.load_importance(out).importance[name], f, rtol=1e-4, atol=1e-10
        )


def test_the_empirical_fisher_does_not_depend_on_the_batch_size(
    gpt2_dir: Path, text_file: Path
) -> None:
    """Padding to the longest sample of a batch changes nothing: each sample's squared gradient
    counts once, so batches of 1 and of 3 give the same mean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = compute_fisher(gpt2_dir, text_file, kind="empirical", batch_size=1, samples=4)
        three = compute_fisher(gpt2_dir, text_file, kind="empirical", batch_size=3, samples=4)
    assert one.n_samples == three.n_samples == 4
    for name, f in one.importance.items():
        torch.testing.assert_close(three.importance[name], f, rtol=1e-4, atol=1e-9)


def test_samples_longer_than_the_model_are_cut_at_its_positions(
    gpt2_dir: Path, tmp_path: Path
) -> None:
    long = tmp_path / "long.txt"
    long.write_text(" ".join(LINES * 5) + "\n" + LINES[0] + "\n")  # ~150 tokens; 64 positions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        file = compute_fisher(gpt2_dir, long, max_length=256)
    assert file.data["max_length"] == 64 and file.n_samples == 2


def test_batches_are_tokenized_one_at_a_time(gpt2_dir: Path) -> None:
    """The Fisher reads a generator: a batch is tokenized only when it is needed."""
    tok = load_model(gpt2_dir).tokenizer
    calls: list[int] = []

    class Counting:
        pad_token, eos_token = tok.pad_token, tok.eos_token

        def __call__(self, texts: list[str], **kwargs: Any) -> Any:
            calls.append(len(texts))
            return tok(texts, **kwargs)

    batches = text_batches(Counting(), LINES, batch_size=2)
    assert calls == []
    first = next(batches)
    assert calls == [2]
    assert first["labels"].shape == first["input_ids"].shape
    pad = first["attention_mask"] == 0
    assert bool(pad.any()) and bool((first["labels"][pad] == -100).all())
    assert bool((first["labels"][~pad] == first["input_ids"][~pad]).all())
    assert len(list(batches)) == 2 and calls == [2, 2, 1]


def test_ewc_fisher_of_a_sequence_classifier(bert_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "labelled.jsonl"
    rows = [{"sentence": s, "label": i % 3} for i, s in enumerate(LINES)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "fisher"
    args = ("--model", bert_dir, "--data", data, "--text-field", "sentence", "--out", out)
    assert fisher_cli(*args) == 0
    file = ewc.load_importance(out)
    assert (file.fisher, file.n_samples, file.model["class"]) == (
        "exact",
        5,
        "BertForSequenceClassification",
    )
    assert float(file.importance["classifier.weight"].sum()) > 0
    assert fisher_cli(*args, "--kind", "empirical", "--label-field", "label") == 0
    assert ewc.load_importance(out).fisher == "empirical"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "missing"}, "model folder '.*missing' does not exist"),
        ({"--model": "DATA_DIR"}, "is not a Hugging Face model folder"),
        ({"--data": "empty.txt"}, "holds no text samples"),
        ({"--data": "data.csv"}, "expected a .txt .* got the suffix '.csv'"),
        ({"--data": "bad.jsonl"}, "line 2 has no text field 'text'"),
        ({"--data": "nowhere.txt"}, "data file '.*nowhere.txt' does not exist"),
        ({"--kind": "exact"}, "exact Fisher of a causal LM .* use --kind sampled"),
        ({"--samples": "0"}, "expected an integer >= 1, got '0'"),
        ({"--device": "toaster"}, "unknown device 'toaster'; use cpu or cuda"),
        ({"--data": "latin1.txt"}, "latin1.txt' is not UTF-8 text"),
        ({"--model": "SMALL_VOCAB"}, r"has \d+ tokens but the model's vocabulary has 50"),
        ({"--out": "general.txt"}, "is a file; name a folder"),
        ({"--model": "TEXT_FILE"}, "model folder '.*' is a file, not a folder"),
        ({"--model": "NO_TOKENIZER"}, "cannot load a tokenizer .*it has no vocabulary"),
    ],
)
def test_bad_input_fails_up_front_naming_it(
    gpt2_dir: Path,
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    message: str,
) -> None:
    folder = text_file.parent
    (folder / "empty.txt").write_text("\n  \n")
    (folder / "data.csv").write_text("a,b\n")
    (folder / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    (folder / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    small = tmp_path / "small-vocab"  # a tokenizer that does not belong to the model
    transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=1)
    ).save_pretrained(small)
    transformers.AutoTokenizer.from_pretrained(gpt2_dir).save_pretrained(small)
    bare = tmp_path / "no-tokenizer"  # the model's files only
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2_dir / name, bare / name)
    options = {"--model": str(gpt2_dir), "--data": str(text_file), "--out": str(tmp_path / "f")}
    named = {"DATA_DIR": folder, "SMALL_VOCAB": small, "TEXT_FILE": text_file, "NO_TOKENIZER": bare}
    for flag, value in change.items():
        options[flag] = str(named.get(value, value))
        if flag in ("--data", "--out") and "/" not in value:
            options[flag] = str(folder / value)
    args = [part for pair in options.items() for part in pair]
    with pytest.raises(SystemExit) if change.get("--samples") else nullcontext():
        assert fisher_cli(*args) == 2  # argparse exits with 2 itself for --samples
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "f" / "importance.json").exists()


def lora_adapter(base: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], task_type="CAUSAL_LM", fan_in_fan_out=True
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a trained adapter: B != 0, so both A and B get gradients
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(folder)
    return folder


def test_a_lora_adapter_gets_its_own_fisher_and_a_base_file_is_refused(
    gpt2_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM

    adapter = lora_adapter(gpt2_dir, tmp_path / "adapter")
    assert fisher_cli("--model", adapter, "--data", text_file, "--out", tmp_path / "fa") == 0
    file = ewc.load_importance(tmp_path / "fa")
    assert file.model["adapter"] and file.model["class"] == "GPT2LMHeadModel"
    assert file.importance and all("lora_" in n for n in file.importance)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True)
    reg = ewc.EWC.from_pretrained(model, tmp_path / "fa", lam=1.0)
    assert reg.n_tasks == 1
    for name, f in file.importance.items():
        assert torch.equal(reg.importance[name], f)
    assert fisher_cli("--model", gpt2_dir, "--data", text_file, "--out", tmp_path / "fb") == 0
    with pytest.raises(ImportanceFileError, match=r"none of the importance file's .* trainable"):
        ewc.EWC.from_pretrained(model, tmp_path / "fb", lam=1.0)


# --------------------------------------------------------------------------- the callbacks


class TextSet(torch.utils.data.Dataset):
    """LINES (repeated) tokenized to a fixed length, as Trainer samples."""

    def __init__(self, tok: Any, n: int) -> None:
        enc = tok(
            [LINES[i % len(LINES)] for i in range(n)],
            padding="max_length",
            max_length=12,
            truncation=True,
            return_tensors="pt",
        )
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def test_hf_callbacks_start_from_a_file_and_the_meter_logs_through_the_trainer(
    gpt2_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    assert fisher_cli("--model", gpt2_dir, "--data", text_file, "--out", tmp_path / "f") == 0
    loaded = load_model(gpt2_dir)
    model, tok = loaded.model, loaded.tokenizer
    reference = list(text_batches(tok, LINES, batch_size=2))
    ewc_cb = EWCCallback(
        1e3,
        start_from=tmp_path / "f",
        fisher="sampled",
        forward=next_token_logits_and_labels,
        fisher_samples=4,
    )
    meter = ForgettingMeterCallback(reference, every=2, forward=next_token_logits_and_labels)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=5,
        learning_rate=1e-2,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=TextSet(tok, 20), callbacks=[ewc_cb, meter]
    )
    trainer.remove_callback(PrinterCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert ewc_cb.regularizer is not None and ewc_cb.regularizer.n_tasks == 2  # file + this task
    assert [h["step"] for h in meter.history] == [0, 2, 4, 5]
    first, last = meter.history[0], meter.history[-1]
    assert first["reference/loss_change"] == 0 and first["ewc/penalty"] == 0
    assert last["ewc/penalty"] > 0 and last["reference/loss"] != first["reference/loss"]
    assert last["reference/loss_change"] == pytest.approx(
        last["reference/loss"] / first["reference/loss"] - 1
    )
    logged = [h for h in trainer.state.log_history if "reference/loss" in h]
    assert [h["step"] for h in logged] == [0, 2, 4, 5]
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [2, 4]  # kept


def test_reference_loss_of_a_classifier_counts_accuracy(bert_dir: Path) -> None:
    loaded = load_model(bert_dir)
    batches = list(
        text_batches(
            loaded.tokenizer,
            LINES,
            task="sequence-classification",
            labels=[0, 1, 2, 0, 1],
            batch_size=2,
        )
    )
    loss, accuracy = ewc.integrations.reference_loss(loaded.model, batches, logits_and_labels)
    with torch.no_grad():  # the model is in eval mode already (from_pretrained)
        logits = torch.cat(
            [loaded.model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        )
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert accuracy == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))


def test_lightning_meter_logs_to_the_trainers_loggers_and_ewc_starts_from_a_file(
    tmp_path: Path,
) -> None:
    L = pytest.importorskip("lightning")
    from ewc.integrations.lightning import EWCCallback as LightningEWC
    from ewc.integrations.lightning import ForgettingMeter

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randint(3, (8,), generator=g)) for _ in range(3)]
    module = Net()
    reg = ewc.EWC(module, lam=1.0)
    reg.consolidate(data)
    reg.save_pretrained(tmp_path / "f")
    ewc_cb = LightningEWC(10.0, start_from=tmp_path / "f")
    meter = ForgettingMeter(data, every=2)
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path), name="logs")
    trainer = L.Trainer(
        max_steps=5,
        logger=logger,
        callbacks=[ewc_cb, meter],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            module,
            torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(*(torch.cat(t) for t in zip(*data, strict=True))),
                batch_size=4,
            ),
        )
    assert ewc_cb.regularizer is not None and ewc_cb.regularizer.n_tasks == 2
    assert [h["step"] for h in meter.history] == [0, 2, 4, 5]
    assert meter.history[-1]["ewc/penalty"] > 0
    assert 0 <= meter.history[-1]["reference/accuracy"] <= 1
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"reference/loss", "reference/loss_change", "ewc/penalty"} <= set(header)
    steps = [
        r.split(",")[header.index("step")]
        for r in rows[1:]
        if r.split(",")[header.index("reference/loss")]
    ]
    assert steps == ["0", "2", "4", "5"]


def test_meter_and_start_from_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        ForgettingMeterCallback([], every=0)
    with pytest.raises(ValueError, match="neither batches nor a map-style dataset"):
        ForgettingMeterCallback(3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EWCCallback(1.0, start_from=Path(tempfile.gettempdir()) / "no-such-fisher")
    with pytest.raises(ValueError, match="start_from needs a diagonal strategy"):
        EWCCallback(1.0, strategy="kfac", start_from="x")
