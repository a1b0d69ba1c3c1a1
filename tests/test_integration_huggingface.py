"""The Hugging Face Trainer callback: the optimizer sees "task loss + penalty" once per step
(under gradient accumulation, clipping, bf16), PEFT adapters only, consolidation data, argument
checks, SI's path, and the example's "task A kept with EWC, lost without"."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from transformers import PrinterCallback, Trainer, TrainingArguments  # noqa: E402
from transformers.data.data_collator import default_data_collator  # noqa: E402

import ewc  # noqa: E402
from ewc.integrations.huggingface import (  # noqa: E402
    EWCCallback,
    logits_and_labels,
    next_token_logits_and_labels,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from hf_two_tasks import LAM as LAM_EXAMPLE  # noqa: E402
from hf_two_tasks import main, quiet_args  # noqa: E402
from toy_text_tasks import TokenTask, lora, tiny_bert  # noqa: E402

LAM = 1e4


class MeanLoss(Trainer):
    """A Trainer that divides every micro-batch's loss by the accumulation steps (BERT accepts
    loss kwargs, so the Trainer would otherwise sum the micro-batch means)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_accepts_loss_kwargs = False


class PenaltyInLoss(MeanLoss):
    """The reference: ``reg.penalty()`` added to every micro-batch's loss (autograd), so one
    penalty a step after the division by the accumulation steps."""

    def __init__(self, reg: ewc.EWC, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reg = reg

    def compute_loss(self, model: nn.Module, inputs: Any, **kwargs: Any) -> Tensor:
        return super().compute_loss(model, inputs, **kwargs) + self.reg.penalty()


def args(**overrides: Any) -> TrainingArguments:
    """The example's quiet CPU arguments, with batches of 8, one epoch at 1e-3, seed 0."""
    options: dict[str, Any] = dict(
        per_device_train_batch_size=8, learning_rate=1e-3, num_train_epochs=1, seed=0
    )
    options = {"output_dir": tempfile.mkdtemp(), **options, **overrides}
    return quiet_args(**options)


def train(trainer: Trainer) -> None:
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def build(adapter: bool) -> nn.Module:
    model = tiny_bert(0)
    return lora(model, 0) if adapter else model


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def after_task_a(request: pytest.FixtureRequest) -> tuple[nn.Module, EWCCallback]:
    """A model trained on 64 samples of task A and the callback that consolidated it."""
    model = build(request.param)
    callback = EWCCallback(lam=LAM)
    train(
        Trainer(model=model, args=args(), train_dataset=TokenTask("a", 64, 0), callbacks=[callback])
    )
    return model, callback


def fresh(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that accelerate will prepare again (it marks a prepared model and
    keeps the first trainer's mixed precision for it), so a ``bf16`` trainer wraps its forward
    in autocast."""
    copied = copy.deepcopy(model)
    vars(copied).pop("_is_accelerate_prepared", None)
    return copied


def trained_parameters(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"gradient_accumulation_steps": 2},
        {"gradient_accumulation_steps": 3, "max_grad_norm": 0.05},
        {"max_grad_norm": 0.05, "bf16": True},
    ],
    ids=["plain", "accumulation", "accumulation+clipping", "clipping+bf16"],
)
def test_update_equals_the_penalty_in_the_loss(
    after_task_a: tuple[nn.Module, EWCCallback], options: dict[str, Any]
) -> None:
    """Task B trained with the callback ends where training with ``loss + reg.penalty()`` ends."""
    model_a, callback_a = after_task_a
    assert callback_a.regularizer is not None
    task_b = TokenTask("b", 48, 1)

    with_callback = fresh(model_a)
    callback = copy.deepcopy(callback_a)
    train(
        MeanLoss(
            model=with_callback, args=args(**options), train_dataset=task_b, callbacks=[callback]
        )
    )

    reference = fresh(model_a)
    reg = ewc.EWC(reference, LAM, forward=logits_and_labels)
    reg.load_state_dict(callback_a.regularizer.state_dict())
    train(PenaltyInLoss(reg, model=reference, args=args(**options), train_dataset=task_b))
    # under bf16 accelerate did wrap the forward in autocast (keeping the plain one)
    assert hasattr(with_callback, "_original_forward") == bool(options.get("bf16"))

    naive = fresh(model_a)
    train(MeanLoss(model=naive, args=args(**options), train_dataset=task_b))

    got, want, without = (trained_parameters(m) for m in (with_callback, reference, naive))
    penalty_effect = max(float((want[n] - without[n]).abs().max()) for n in want)
    atol = (1e-2 if options.get("bf16") else 1e-4) * penalty_effect
    assert penalty_effect > 1e-4  # the penalty changes the result: the test can fail
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol)


def test_peft_model_regularizes_the_adapter_and_head_only(
    after_task_a: tuple[nn.Module, EWCCallback],
) -> None:
    model, callback = after_task_a
    assert callback.regularizer is not None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(callback.regularizer.importance) == trainable
    if any("lora_" in n for n in trainable):  # the PEFT model: no frozen base weight
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen and not frozen & set(callback.regularizer.importance)


def test_consolidates_from_the_data_attribute_when_set() -> None:
    """``callback.data`` (a map-style dataset, batched with the trainer's collator) replaces the
    trainer's training data: the importance is the Fisher on it."""
    model = tiny_bert(0)
    other = TokenTask("b", 40, 5)
    callback = EWCCallback(lam=LAM, data=other)
    train(
        Trainer(model=model, args=args(), train_dataset=TokenTask("a", 32, 0), callbacks=[callback])
    )
    loader = DataLoader(other, batch_size=8, collate_fn=default_data_collator)
    want = ewc.fisher_diagonal(model, loader, forward=logits_and_labels)
    assert callback.regularizer is not None
    got = callback.regularizer.importance
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def tiny_gpt2(seed: int) -> nn.Module:
    """A one-layer GPT-2 built from a config (no download): vocabulary 16, context 8, width 8,
    its output layer tied to the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config)


def next_token_task(n: int, seed: int) -> list[dict[str, Tensor]]:
    """``n`` sequences of 8 tokens counting up from a random start (mod 16), labels = the
    inputs, as a language-modelling collator makes them, with the last 3 of every other
    sequence padding (``-100``)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 16, (n, 1), generator=g)
    ids = (starts + torch.arange(8)) % 16
    labels = ids.clone()
    labels[::2, 5:] = -100
    return [
        {"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": y}
        for i, y in zip(ids, labels, strict=True)
    ]


def test_causal_language_model_consolidates_the_next_token_fisher() -> None:
    """A causal LM trained by a Trainer with ``forward=next_token_logits_and_labels``: the
    callback's importance is the empirical Fisher of the next-token log-likelihood summed over
    the labelled positions, as the per-sample loop computes it (padding adds nothing); the next
    task is trained under the penalty."""
    model, task_a = tiny_gpt2(0), next_token_task(16, 0)
    callback = EWCCallback(lam=LAM, fisher="empirical", forward=next_token_logits_and_labels)
    train(Trainer(model=model, args=args(), train_dataset=task_a, callbacks=[callback]))
    loader = DataLoader(task_a, batch_size=8, collate_fn=default_data_collator)
    want = ewc.fisher_diagonal(
        model, loader, kind="empirical", forward=next_token_logits_and_labels, method="loop"
    )
    assert callback.regularizer is not None
    got = callback.regularizer.importance
    assert set(got) == set(want) and float(sum(f.sum() for f in want.values())) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    train(
        Trainer(
            model=model, args=args(), train_dataset=next_token_task(16, 1), callbacks=[callback]
        )
    )
    assert float(callback.regularizer.penalty().detach()) > 0


def test_a_new_model_object_gets_the_state_and_the_penalty(
    after_task_a: tuple[nn.Module, EWCCallback],
) -> None:
    """A later trainer with another model object (same parameters): the regularizer is rebuilt
    on it with the consolidated state, and the penalty's gradient goes to its parameters."""
    model_a, callback_a = after_task_a
    callback = copy.deepcopy(callback_a)
    assert callback.regularizer is not None
    before = {n: t.clone() for n, t in callback.regularizer.importance.items()}
    other = copy.deepcopy(model_a)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)  # away from the anchor: a non-zero penalty gradient
    callback.on_train_begin(None, None, None, model=other)
    callback.on_step_begin(None, None, None, model=other, optimizer=None)
    for name, importance in callback.regularizer.importance.items():
        torch.testing.assert_close(importance, before[name])
    grads = {n: p.grad for n, p in other.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(float(g.abs().max()) > 0 for g in grads.values() if g is not None)
    assert all(p.grad is None for p in model_a.parameters())


@pytest.mark.parametrize("strategy", ["ewc", "si"])
def test_resume_from_checkpoint_restores_the_state_in_a_new_callback(strategy: str) -> None:
    """Task B checkpointed at step 4 of 8 and resumed with ``train(resume_from_checkpoint=True)``
    by a new model, Trainer and callback (a new process): the checkpoint folder holds the
    regularizer's state, so training ends with the uninterrupted run's weights and state (SI:
    its path integral too)."""
    task_b = TokenTask("b", 64, 1)

    def after_a() -> tuple[nn.Module, EWCCallback]:
        model, callback = build(False), EWCCallback(lam=LAM, strategy=strategy)
        train(
            Trainer(
                model=model, args=args(), train_dataset=TokenTask("a", 64, 0), callbacks=[callback]
            )
        )
        return model, callback

    model, callback = after_a()
    train(Trainer(model=model, args=args(), train_dataset=task_b, callbacks=[callback]))
    assert callback.regularizer is not None and callback.regularizer.n_tasks == 2
    want, want_state = trained_parameters(model), callback.regularizer.state_dict()

    out = tempfile.mkdtemp()
    model, callback = after_a()
    checkpointing = args(output_dir=out, save_strategy="steps", save_steps=4, max_steps=4)
    train(Trainer(model=model, args=checkpointing, train_dataset=task_b, callbacks=[callback]))
    assert (Path(out) / "checkpoint-4" / "ewc_callback.pt").is_file()
    model = build(False)  # a new process: weights and state come from the checkpoint only
    callback = EWCCallback(lam=LAM, strategy=strategy)
    resumed = Trainer(
        model=model, args=args(output_dir=out), train_dataset=task_b, callbacks=[callback]
    )
    resumed.remove_callback(PrinterCallback)
    resumed.train(resume_from_checkpoint=True)
    assert callback.regularizer is not None and callback.regularizer.n_tasks == 2
    got, got_state = trained_parameters(model), callback.regularizer.state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    for key in ("importance", "anchor"):
        for name, tensor in want_state[key].items():
            torch.testing.assert_close(got_state[key][name], tensor)


def test_resuming_without_the_state_file_warns() -> None:
    """A checkpoint without the callback's file (written without it): the callback says that the
    earlier tasks are unprotected and how to load the state."""
    out = tempfile.mkdtemp()
    model, task = build(False), TokenTask("a", 64, 0)
    checkpointing = args(output_dir=out, save_strategy="steps", save_steps=4, max_steps=4)
    train(Trainer(model=model, args=checkpointing, train_dataset=task))
    callback = EWCCallback(lam=LAM)
    resumed = Trainer(
        model=build(False), args=args(output_dir=out), train_dataset=task, callbacks=[callback]
    )
    resumed.remove_callback(PrinterCallback)
    with pytest.warns(UserWarning, match="checkpoint-4/ewc_callback.pt does not exist"):
        resumed.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("damage", ["truncate", "wrong type"])
def test_resuming_from_a_damaged_state_file_stops_with_one_line_saying_to_delete_it(
    damage: str,
) -> None:
    """A truncated ``ewc_callback.pt``, or one holding something else than a state: training
    stops before any step with one line naming the file and the fix, never torch's advice to set
    weights_only=False, never an unprotected resume."""
    out = tempfile.mkdtemp()
    model, task = build(False), TokenTask("a", 64, 0)
    checkpointing = args(output_dir=out, save_strategy="steps", save_steps=4, max_steps=4)
    train(
        Trainer(model=model, args=checkpointing, train_dataset=task, callbacks=[EWCCallback(LAM)])
    )
    saved = Path(out) / "checkpoint-4" / "ewc_callback.pt"
    if damage == "truncate":
        saved.write_bytes(saved.read_bytes()[:100])
    else:
        torch.save(["not", "a", "state"], saved)
    callback = EWCCallback(lam=LAM)
    resumed = Trainer(
        model=build(False), args=args(output_dir=out), train_dataset=task, callbacks=[callback]
    )
    resumed.remove_callback(PrinterCallback)
    with pytest.raises(ewc.readback.DamagedFileError) as caught:
        resumed.train(resume_from_checkpoint=True)
    message = str(caught.value)
    assert str(saved) in message and "delete" in message and "\n" not in message
    assert "weights_only=False" not in message


def test_resuming_another_tasks_checkpoint_warns_to_give_each_task_its_own_output_dir() -> None:
    """Tasks sharing one output_dir: task B resumed with ``resume_from_checkpoint=True`` picks
    task A's last checkpoint (written before A was consolidated) and trains 0 steps; the
    callback says both, with the fix."""
    out = tempfile.mkdtemp()
    model, callback = build(False), EWCCallback(lam=LAM)
    checkpointing = args(output_dir=out, save_strategy="steps", save_steps=4)
    train(
        Trainer(
            model=model, args=checkpointing, train_dataset=TokenTask("a", 64, 0),
            callbacks=[callback],
        )
    )  # fmt: skip
    task_b = Trainer(
        model=model, args=checkpointing, train_dataset=TokenTask("b", 64, 1), callbacks=[callback]
    )
    task_b.remove_callback(PrinterCallback)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task_b.train(resume_from_checkpoint=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("holds 0 consolidated task(s) but this callback has 1" in m for m in messages)
    assert any("ran no optimizer step" in m and "its own output_dir" in m for m in messages)


class TupleBert(nn.Module):
    """A BERT that returns tuples (``return_dict=False``), as some code bases configure it."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert(0)

    def forward(self, **inputs: Any) -> Any:
        return self.bert(**inputs, return_dict=False)


def test_default_forward_takes_the_logits_of_a_tuple_output() -> None:
    """``return_dict=False``: the logits are the first item; the same Fisher as the dict output."""
    model = TupleBert()
    loader = DataLoader(TokenTask("a", 16, 0), batch_size=8, collate_fn=default_data_collator)
    got = ewc.fisher_diagonal(model, loader, forward=logits_and_labels)
    want = ewc.fisher_diagonal(model.bert, loader, forward=logits_and_labels)
    for name, value in want.items():
        torch.testing.assert_close(got["bert." + name], value)


def test_data_the_callback_cannot_consolidate_from_fails_before_training() -> None:
    """``data`` given as a list of single samples (not batches): the model cannot take one, and
    the callback says so when ``train()`` starts, with the weights still untrained."""
    model = build(False)
    before = trained_parameters(model)
    samples = [TokenTask("b", 4, 1)[i] for i in range(4)]
    callback = EWCCallback(lam=LAM, data=samples)
    trainer = Trainer(
        model=model, args=args(), train_dataset=TokenTask("a", 64, 0), callbacks=[callback]
    )
    trainer.remove_callback(PrinterCallback)
    with pytest.raises(
        ValueError,
        match=r"first batch \(dict \{input_ids: \[12\], labels: \[\]\}\).*before training",
    ):
        trainer.train()
    for name, value in trained_parameters(model).items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"deepspeed": "ds.json"}, "DeepSpeed"),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "FSDP1"),
    ],
)
def test_deepspeed_and_fsdp1_are_refused_when_train_starts(setting: dict, words: str) -> None:
    """Their parameters are flat buffers the regularizer cannot follow: named, with the fix."""
    sharded = SimpleNamespace(**{"deepspeed": None, "fsdp": None, **setting})
    with pytest.raises(ValueError, match=rf"does not support {words}.*FSDP2"):
        EWCCallback(lam=LAM).on_train_begin(sharded, None, None, model=build(False))


def test_fsdp2_is_accepted_when_train_starts() -> None:
    """FSDP2 (TrainingArguments' default FSDP version) is not refused: the regularizer follows
    its DTensor shards (tests/test_fsdp.py)."""
    fsdp2 = SimpleNamespace(deepspeed=None, fsdp="full_shard", fsdp_config={"version": 2})
    callback = EWCCallback(lam=LAM)
    callback.on_train_begin(fsdp2, None, None, model=build(False))
    assert callback.regularizer is not None


@pytest.mark.parametrize("second", [{}, {"bf16": True}], ids=["same", "bf16-after-fp32"])
def test_a_later_task_in_another_precision_warns(second: dict[str, Any]) -> None:
    """accelerate keeps the first Trainer's precision for a model it prepared: a second task that
    asks for bf16 after an fp32 one trains in fp32 (its forward is not wrapped in autocast), and
    the callback says so; the same precision again does not warn."""
    model, callback = build(False), EWCCallback(lam=LAM)
    train(
        Trainer(
            model=model,
            args=args(max_steps=1),
            train_dataset=TokenTask("a", 8, 0),
            callbacks=[callback],
        )
    )
    task_b = Trainer(
        model=model,
        args=args(max_steps=1, **second),
        train_dataset=TokenTask("b", 8, 0),
        callbacks=[callback],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(task_b)
    said = [str(w.message) for w in caught if "precision" in str(w.message)]
    assert not hasattr(model, "_original_forward")  # bf16 asked or not, no autocast wrapper
    if second:
        assert said and "asks for bf16" in said[0] and "in fp32 too" in said[0]
    else:
        assert not said


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": -1.0}, "lam must be >= 0"),
        ({"lam": 1.0, "strategy": "ewk"}, "unknown strategy='ewk'"),
        ({"lam": 1.0, "fisher": "diagonal"}, "unknown fisher='diagonal'"),
    ],
)
def test_bad_arguments_fail_when_the_callback_is_built(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EWCCallback(**kwargs)


def test_si_integrates_its_path_at_every_optimizer_step() -> None:
    """SI's importance after a task is non-zero only if ``after_step`` ran after the steps."""
    model = tiny_bert(0)
    callback = EWCCallback(lam=1.0, strategy="si")
    train(
        Trainer(model=model, args=args(), train_dataset=TokenTask("a", 32, 0), callbacks=[callback])
    )
    assert callback.regularizer is not None
    assert any(float(o.abs().sum()) > 0 for o in callback.regularizer.importance.values())


@pytest.mark.parametrize(
    "options",
    [{}, {"bf16": True, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2}],
    ids=["fp32", "bf16+accumulation"],
)
def test_example_keeps_task_a_with_ewc_and_loses_it_without(options: dict[str, Any]) -> None:
    """examples/hf_two_tasks.py (full fine-tuning, seed 0): after task B, task A's accuracy is
    at least 90 % with EWC and at most 75 % without, and EWC learns B (>= 90 %)."""
    naive = main(None, **options)
    kept = main(LAM_EXAMPLE, **options)
    assert naive["A after A"] >= 90 and kept["A after A"] >= 90
    assert naive["A after B"] <= 75
    assert kept["A after B"] >= 90 and kept["B"] >= 90


def test_lora_example_keeps_task_a_with_ewc_and_loses_it_without() -> None:
    """examples/hf_two_tasks.py --lora (a LoRA adapter on a pretrained base, seed 0): after task
    B, task A's accuracy is at least 85 % with EWC and at most 60 % without; EWC learns B to at
    least 85 %."""
    naive, kept = main(None, adapter=True), main(LAM_EXAMPLE, adapter=True)
    assert naive["A after A"] >= 85 and kept["A after A"] >= 85
    assert naive["A after B"] <= 60
    assert kept["A after B"] >= 85 and kept["B"] >= 85


@pytest.mark.distributed
def test_ddp_example_under_torchrun(tmp_path: Path) -> None:
    """examples/hf_ddp.py on two CPU processes: every rank holds the same importance (the Fisher
    of both shards), and task A is kept with EWC and lost without."""
    out = tmp_path / "result.json"
    from test_distributed import torchrun

    torchrun("hf_ddp.py", "--out", str(out), cwd=EXAMPLES)
    result = json.loads(out.read_text())
    assert result["ranks"] == 2
    assert result["rank spread"] == 0.0
    assert result["naive"]["A after B"] <= 75
    assert result["EWC"]["A after B"] >= 90 and result["EWC"]["B"] >= 90


@pytest.mark.cuda
def test_update_equals_the_penalty_in_the_loss_on_a_gpu_with_fp16() -> None:
    """The same comparison on a GPU under fp16 with a GradScaler (the penalty's gradient is
    added scaled, before the backward passes)."""
    model_a = tiny_bert(0).cuda()
    callback = EWCCallback(lam=LAM)
    gpu = {"use_cpu": False, "fp16": True, "gradient_accumulation_steps": 2, "max_grad_norm": 0.05}
    train(
        Trainer(
            model=model_a,
            args=args(**gpu),
            train_dataset=TokenTask("a", 64, 0),
            callbacks=[callback],
        )
    )
    task_b = TokenTask("b", 48, 1)
    with_callback = fresh(model_a)
    train(
        MeanLoss(
            model=with_callback,
            args=args(**gpu),
            train_dataset=task_b,
            callbacks=[copy.deepcopy(callback)],
        )
    )
    reference = fresh(model_a)
    reg = ewc.EWC(reference, LAM, forward=logits_and_labels)
    assert callback.regularizer is not None
    reg.load_state_dict(callback.regularizer.state_dict())
    train(PenaltyInLoss(reg, model=reference, args=args(**gpu), train_dataset=task_b))
    got, want = trained_parameters(with_callback), trained_parameters(reference)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-2, atol=1e-4)


def test_without_transformers_the_error_names_the_extra() -> None:
    """Importing the integration without transformers raises an error naming ``ewc[hf]``;
    ``import ewc`` and ``import ewc.integrations`` do not import transformers."""
    code = (
        "import sys\nimport ewc, ewc.integrations\nassert 'transformers' not in sys.modules\n"
        "sys.modules['transformers'] = None\nimport ewc.integrations.huggingface\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "MissingExtraError" in done.stderr
    assert "pip install 'ewc[hf]'" in done.stderr
