"""TRL's ``SFTTrainer`` with a LoRA adapter (examples/trl_sft_lora.py, smaller): task A, the
adapter's Fisher by ``ewc fisher``, task B started from that file with the forgetting meter on
text A: EWC keeps text A's loss closer to its value before task B than plain fine-tuning."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is not installed: pip install 'ewc[trl]'")
pytest.importorskip("peft", reason="PEFT is not installed: pip install 'ewc[hf]'")

import ewc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from trl_sft_lora import main


def test_sft_lora_from_a_fisher_file_keeps_text_a(tmp_path: Path) -> None:
    result = main(seed=0, lams=(1000.0,), out=tmp_path, n=128)
    file = ewc.load_importance(tmp_path / "fisher-a")
    assert file.model["adapter"] and all("lora_" in n for n in file.importance)
    assert file.n_samples == 128 and file.fisher == "sampled"
    before, naive, kept = result["a_before"], result["a_naive"], result["a_ewc1000"]
    assert naive - before > 0.5  # plain fine-tuning on B forgets A (nats per token)
    assert abs(kept - before) < 0.25 * (naive - before)
    assert result["b_naive"] < result["b_ewc1000"]  # the price: B learned less
