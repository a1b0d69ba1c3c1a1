"""The Lightning callback: penalty once per optimizer step, SI's path, consolidation, state,
PEFT, and the example's "task A kept with EWC, lost without"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")
from ewc.integrations.lightning import EWCCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lightning_two_tasks import Classifier, logits_and_labels, main, quiet_trainer  # noqa: E402
from toy_text_tasks import TokenTask, lora, tiny_bert  # noqa: E402

LR = 0.1
LAM = 50.0


class Net(L.LightningModule):
    """A small MLP classifier trained with plain SGD (the update is linear in the gradient)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def loader(seed: int, n: int = 16, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(3, (n,), generator=g)), batch_size=batch_size)


def fit(module: L.LightningModule, data: DataLoader, callbacks: list, **options: Any) -> None:
    quiet_trainer(callbacks, **options).fit(module, data)


def params(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    ("accelerator", "accumulate", "precision"),
    [
        ("cpu", 2, "32-true"),
        ("cpu", 1, "bf16-mixed"),
        ("cpu", 2, "bf16-mixed"),
        pytest.param("gpu", 2, "16-mixed", marks=pytest.mark.cuda),
    ],
)
def test_penalty_gradient_is_added_once_per_optimizer_step(
    accelerator: str, accumulate: int, precision: str
) -> None:
    """One SGD step with the callback minus the same step without it is exactly
    -lr·λF(θ0 − θ*): the penalty's gradient counted once, whatever the accumulation window
    and the mixed precision (unscaled under 16-mixed)."""
    module = Net()
    callback = EWCCallback(lam=LAM)
    fit(module, loader(0), [callback], max_epochs=1)  # task A: consolidates
    reg = callback.regularizer
    assert reg is not None and reg.n_tasks == 1
    fisher = {n: f.clone() for n, f in reg.importance.items()}
    anchor = {n: a.clone() for n, a in reg.anchor.items()}
    with torch.no_grad():  # move away from the anchor, so that the penalty has a gradient
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    start = params(module)
    step: dict[str, Any] = dict(
        max_steps=1, accumulate_grad_batches=accumulate, precision=precision
    )
    step["accelerator"] = accelerator
    fit(module, loader(1, batch_size=8 // accumulate), [callback], **step)
    with_penalty = params(module)
    module.load_state_dict(start)
    fit(module, loader(1, batch_size=8 // accumulate), [], **step)
    without = params(module)
    for name in start:
        expected = -LR * LAM * fisher[name] * (start[name] - anchor[name])
        assert expected.abs().max() > 1e-4  # the penalty does move this parameter
        torch.testing.assert_close(
            (with_penalty[name] - without[name]).cpu(), expected.cpu(), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("unscaled_first", [True, False])
def test_penalty_gradient_is_scaled_like_the_gradients_it_joins(unscaled_first: bool) -> None:
    """Under fp16 AMP the step applies -lr·(g + λF(θ0 − θ*)) whether the GradScaler unscaled the
    gradients before the hook (Lightning's path) or only in ``step()`` (an optimizer that
    unscales itself): the penalty's gradient carries the loss scale exactly when ``.grad`` does.
    A CPU GradScaler stands in for the GPU's."""
    module = Net()
    callback = EWCCallback(lam=LAM)
    callback.on_train_start(SimpleNamespace(train_dataloader=loader(0)), module)
    assert callback.regularizer is not None
    callback.regularizer.consolidate(loader(0))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    start = params(module)
    x, y = next(iter(loader(1)))
    sgd = torch.optim.SGD(module.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    scaler.scale(nn.functional.cross_entropy(module(x), y)).backward()
    task_grad = {n: p.grad / 1024.0 for n, p in module.named_parameters()}
    if unscaled_first:
        scaler.unscale_(sgd)
    callback.on_before_optimizer_step(trainer, module, sgd)
    scaler.step(sgd)
    reg = callback.regularizer
    for name, p in module.named_parameters():
        penalty = LAM * reg.importance[name] * (start[name] - reg.anchor[name])
        expected = start[name] - LR * (task_grad[name] + penalty)
        torch.testing.assert_close(p.detach(), expected)


def test_si_path_skips_a_step_the_grad_scaler_skipped() -> None:
    """A step skipped for an inf gradient (fp16 overflow) adds nothing to SI's path integral:
    no NaN from inf·0. A CPU GradScaler stands in for the GPU's."""
    module = Net()
    callback = EWCCallback(lam=1.0, strategy="si")
    callback.on_train_start(SimpleNamespace(train_dataloader=loader(0)), module)
    sgd = torch.optim.SGD(module.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu")
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    x, y = next(iter(loader(0)))
    scaler.scale(nn.functional.cross_entropy(module(x), y)).backward()
    next(module.parameters()).grad[0, 0] = float("inf")
    scaler.unscale_(sgd)
    callback.on_before_optimizer_step(trainer, module, sgd)
    scaler.step(sgd)
    scaler.update()
    callback.on_train_batch_end(trainer, module, None, (x, y), 0)
    assert callback.regularizer is not None
    callback.regularizer.consolidate()
    for name, omega in callback.regularizer.importance.items():
        assert torch.equal(omega, torch.zeros_like(omega)), name


def test_si_integrates_the_path_after_every_optimizer_step() -> None:
    """SI's importance after a fit with accumulation 2 equals a hand-written loop's that calls
    ``after_step`` after each of its SGD steps."""
    import ewc

    module = Net()
    callback = EWCCallback(lam=1.0, strategy="si")
    fit(module, loader(0, n=32, batch_size=4), [callback], max_epochs=1, accumulate_grad_batches=2)

    by_hand = Net()
    reg = ewc.SI(by_hand, lam=1.0)
    sgd = torch.optim.SGD(by_hand.parameters(), lr=LR)
    batches = list(loader(0, n=32, batch_size=4))
    for first, second in zip(batches[::2], batches[1::2], strict=True):
        sgd.zero_grad()
        for x, y in (first, second):
            (nn.functional.cross_entropy(by_hand(x), y) / 2).backward()
        sgd.step()
        reg.after_step()
    reg.consolidate()
    assert callback.regularizer is not None
    for name, omega in reg.importance.items():
        torch.testing.assert_close(callback.regularizer.importance[name], omega)


def test_consolidates_from_the_given_data_instead_of_the_training_loader() -> None:
    """With ``data`` set, the Fisher is the one of that data (not of the training loader)."""
    import ewc

    module = Net()
    other = loader(7)
    callback = EWCCallback(lam=1.0, data=other)
    fit(module, loader(0), [callback], max_epochs=1)
    expected = ewc.fisher_diagonal(module, other)
    assert callback.regularizer is not None
    for name, f in expected.items():
        torch.testing.assert_close(callback.regularizer.importance[name], f)


def test_state_is_saved_in_lightning_checkpoints_and_restored_at_the_next_fit(
    tmp_path: Path,
) -> None:
    """The checkpoint holds the regularizer's state; a new callback that loads it regularizes
    the next task with the same importance and anchor."""
    module = Net()
    callback = EWCCallback(lam=LAM)
    trainer = quiet_trainer([callback], max_epochs=1)
    trainer.fit(module, loader(0))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=False)["callbacks"][callback.state_key]
    assert callback.regularizer is not None
    expected = callback.regularizer.state_dict()

    restored = EWCCallback(lam=LAM)
    restored.load_state_dict(saved)
    restored.on_train_start(trainer, module)  # what the next fit does first
    assert restored.regularizer is not None
    state = restored.regularizer.state_dict()
    assert state["n_tasks"] == expected["n_tasks"] == 1
    for key in ("importance", "anchor"):
        for name, tensor in expected[key].items():
            torch.testing.assert_close(state[key][name], tensor)


def test_a_task_interrupted_and_resumed_with_fit_ckpt_path_ends_as_if_uninterrupted(
    tmp_path: Path,
) -> None:
    """Task B stopped after its first epoch (the process dies) and resumed in a new process by
    ``Trainer.fit(..., ckpt_path=...)`` with a new module and a new callback: the checkpoint
    brings back task A's Fisher and anchor, so the penalty of the remaining epoch and the
    consolidation at the end match the uninterrupted run's (weights and importance)."""

    def task_a() -> tuple[Net, EWCCallback]:
        module, callback = Net(), EWCCallback(lam=LAM)
        fit(module, loader(0), [callback], max_epochs=1)
        return module, callback

    module, callback = task_a()
    fit(module, loader(1), [callback], max_epochs=2)
    assert callback.regularizer is not None and callback.regularizer.n_tasks == 2
    expected_params, expected_state = params(module), callback.regularizer.state_dict()

    module, callback = task_a()
    options = {"enable_checkpointing": True, "default_root_dir": tmp_path}
    fit(module, loader(1), [callback], max_epochs=1, **options)
    (ckpt,) = tmp_path.glob("**/*.ckpt")
    del module, callback  # a new process: nothing survives but the checkpoint
    resumed, callback = Net(), EWCCallback(lam=LAM)
    quiet_trainer([callback], max_epochs=2).fit(resumed, loader(1), ckpt_path=ckpt)
    assert callback.regularizer is not None and callback.regularizer.n_tasks == 2
    for name, value in expected_params.items():
        torch.testing.assert_close(params(resumed)[name], value)
    state = callback.regularizer.state_dict()
    for key in ("importance", "anchor"):
        for name, tensor in expected_state[key].items():
            torch.testing.assert_close(state[key][name], tensor)


def test_with_a_peft_model_only_the_adapter_is_regularized() -> None:
    """Inside a LightningModule, a LoRA model's regularized parameters are its trainable ones:
    the adapter and the classifier head, none of the frozen base."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    module = Classifier(lora(tiny_bert(0)), lr=1e-2)
    callback = EWCCallback(lam=1.0, forward=logits_and_labels)
    fit(module, DataLoader(TokenTask("a", 16, 0), batch_size=8), [callback], max_epochs=1)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert callback.regularizer is not None
    assert set(callback.regularizer.importance) == trainable
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert any(float(f.abs().sum()) > 0 for f in callback.regularizer.importance.values())


DDP_WORKER = """
import sys
from pathlib import Path

import torch

import ewc
from ewc.integrations.lightning import EWCCallback

sys.path.insert(0, sys.argv[2])  # the tests' folder
from test_integration_lightning import Net, loader, quiet_trainer

module, callback, data = Net(), EWCCallback(lam=1.0), loader(0, n=20, batch_size=5)
trainer = quiet_trainer([callback], strategy="ddp", devices=2, max_epochs=1)
trainer.fit(module, data)  # each rank trains and consolidates on its 10 of the 20 samples
single = ewc.fisher_diagonal(module, data, distributed=False)  # one process, all 20 samples
torch.save(
    {"importance": dict(callback.regularizer.importance), "single": single},
    Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt",
)
"""


@pytest.mark.distributed
def test_under_ddp_every_rank_consolidates_the_fisher_of_all_shards(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (CPU, gloo), Lightning's DDP strategy: each rank
    consolidates from its own shard of ``trainer.train_dataloader``, and both hold the Fisher
    of one process on all the samples (through :func:`ewc.fisher_diagonal`'s all-reduce)."""
    from test_distributed import torchrun

    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    torchrun(str(worker), str(tmp_path), str(Path(__file__).parent), cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert r["importance"].keys() == r["single"].keys()
        for name, f in r["single"].items():
            assert float(f.abs().sum()) > 0
            torch.testing.assert_close(r["importance"][name], f, rtol=1e-5, atol=1e-9)


class DictNet(Net):
    """``Net`` trained on dict batches ``{"x", "y"}``."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])


def dict_loader(seed: int) -> DataLoader:
    pairs = loader(seed).dataset
    return DataLoader([{"x": x, "y": y} for x, y in pairs], batch_size=8)


def test_a_forward_that_does_not_fit_the_batches_fails_before_training() -> None:
    """Dict batches with the default ``forward`` (which expects ``(x, y)`` pairs): the error
    comes when ``fit`` starts, names the batch and the fix, and the weights are untouched."""
    module = DictNet()
    before = params(module)
    with pytest.raises(
        ValueError, match=r"first batch \(dict \{x: \[8, 4\], y: \[8\]\}\).*forward="
    ):
        fit(module, dict_loader(0), [EWCCallback(lam=LAM)], max_epochs=1)
    for name, value in params(module).items():
        assert torch.equal(value, before[name])
    callback = EWCCallback(lam=LAM, forward=lambda m, b: (m(b["x"]), b["y"]))
    fit(module, dict_loader(0), [callback], max_epochs=1)
    assert callback.regularizer is not None and callback.regularizer.n_tasks == 1


def test_the_check_before_training_leaves_the_training_order_as_it_was() -> None:
    """The batch checked at the start comes from an unshuffled copy of the training loader, or
    from a shuffled ``data`` loader with the global RNG restored afterwards: training on a
    shuffled loader ends at the same weights with EWC (which checks) as with L2 (which reads no
    data), both without a penalty on the first task."""
    ends = []
    for strategy, data in (("ewc", None), ("ewc", "shuffled"), ("l2", None)):
        module = Net()
        shuffled = DataLoader(loader(0).dataset, batch_size=4, shuffle=True)
        callback = EWCCallback(lam=LAM, strategy=strategy, data=data and shuffled)
        torch.manual_seed(1)
        fit(module, shuffled, [callback], max_epochs=2)
        ends.append(params(module))
    for end in ends[1:]:
        for name, value in ends[0].items():
            assert torch.equal(value, end[name])


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_fsdp1_and_deepspeed_are_refused_when_fit_starts(name: str) -> None:
    """Their parameters are flat buffers the regularizer cannot follow: named, with the fix
    (ModelParallelStrategy, FSDP2). A stand-in class of the strategy's name: DeepSpeed need not
    be installed."""
    strategy = type(name, (), {})()
    with pytest.raises(ValueError, match=rf"does not support {name}.*ModelParallelStrategy"):
        EWCCallback(lam=LAM).on_train_start(SimpleNamespace(strategy=strategy), Net())


def test_bad_arguments_fail_when_the_callback_is_built() -> None:
    with pytest.raises(ValueError, match="lam"):
        EWCCallback(lam=-1.0)
    with pytest.raises(ValueError, match="strategy"):
        EWCCallback(lam=1.0, strategy="ewc2")


def test_importing_ewc_and_its_integrations_package_does_not_import_lightning() -> None:
    code = "import sys, ewc, ewc.integrations; assert 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.cuda)])
def test_example_keeps_task_a_with_ewc_and_loses_it_without(accelerator: str) -> None:
    """examples/lightning_two_tasks.py, seed 0: after task B, task A's test accuracy is at least
    95% with EWC (λ = 1e5) and at most 75% without; EWC still learns B to at least 95%."""
    naive, kept = main(None, accelerator=accelerator), main(1e5, accelerator=accelerator)
    assert naive["A after A"] >= 95 and kept["A after A"] >= 95
    assert naive["A after B"] <= 75
    assert kept["A after B"] >= 95
    assert kept["B"] >= 95
