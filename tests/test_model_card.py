"""The model card of a saved MOELORA adapter: how to load it (the card's own snippets run), the papers it follows,
and the routing figures of the training run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from moe_peft_plugin import MoeLoraConfig
from moe_peft_plugin.model_card import ADAPTER_PLACEHOLDER, SECTION_END, SECTION_START
from trainer_callbacks import MoeLoraSFTConfig, MoeLoraSFTTrainer

from .helpers import CORPUS, build_tiny_llama


def _save(tiny_model_dir, path, **config):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = MoeLoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **config)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(path)
    return (path / "README.md").read_text()


def test_card_says_how_to_load_and_which_paper(tiny_model_dir, tmp_path):
    card = _save(tiny_model_dir, tmp_path / "moelora", num_experts=4, top_k=2, contrastive_loss_coef=0.01)
    assert card.startswith("---") and "library_name: peft" in card  # peft's card is kept
    assert card.count(SECTION_START) == 1 and card.count(SECTION_END) == 1
    assert "import moe_peft_plugin" in card and "AutoPeftModelForCausalLM.from_pretrained" in card
    assert "PeftModel.from_pretrained" in card and "KeyError: 'MOELORA'" in card
    assert "https://arxiv.org/abs/2402.12851" in card and "4 LoRA experts per layer with a top-2 router" in card
    assert "2402.08562" not in card and "2404.13628" not in card
    assert "contrastive loss (coefficient 0.01)" in card
    assert "Routing during training" not in card  # not known outside a trainer


def test_card_snippets_load_the_adapter_in_a_fresh_process(tiny_model_dir, tmp_path):
    adapter = tmp_path / "moelora"
    card = _save(tiny_model_dir, adapter, num_experts=2, top_k=1)
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 2
    for snippet in snippets:
        code = snippet.replace(ADAPTER_PLACEHOLDER, str(adapter))  # the card names the adapter by a placeholder
        code += "\nassert type(model.peft_config['default']).__name__ == 'MoeLoraConfig'\n"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]


def test_card_names_mola_and_mole(tiny_model_dir, tmp_path):
    card = _save(tiny_model_dir, tmp_path / "mola", num_experts=[2, 4], top_k=1)
    assert "2402.08562" in card and "layer-wise expert counts [2, 4]" in card and "2402.12851" in card
    loras = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
        lora.save_pretrained(tmp_path / f"lora{seed}")
        loras.append(str(tmp_path / f"lora{seed}"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           MoeLoraConfig(expert_adapters=loras, task_type="CAUSAL_LM"))  # fmt: skip
    model.save_pretrained(tmp_path / "mole")
    card = (tmp_path / "mole" / "README.md").read_text()
    assert "2404.13628" in card and "a learned gate over 2 trained LoRAs" in card and "2402.12851" not in card


def test_saving_again_replaces_the_section_and_a_lone_config_gets_no_card(tiny_model_dir, tmp_path):
    path = tmp_path / "moelora"
    _save(tiny_model_dir, path, num_experts=2, top_k=1)
    card = _save(tiny_model_dir, path, num_experts=3, top_k=1)
    assert card.count(SECTION_START) == 1 and "3 LoRA experts" in card and "2 LoRA experts" not in card
    MoeLoraConfig(num_experts=2, top_k=1).save_pretrained(tmp_path / "config-only")
    assert sorted(p.name for p in (tmp_path / "config-only").iterdir()) == ["adapter_config.json"]


@pytest.mark.slow
def test_trainer_writes_the_routing_of_the_run(tmp_path):
    model, tokenizer = build_tiny_llama(seed=0)
    config = MoeLoraConfig(r=4, num_experts=4, top_k=2, target_modules="all-linear", task_type="CAUSAL_LM",
                           contrastive_loss_coef=0.01)  # fmt: skip
    args = MoeLoraSFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, logging_steps=1, report_to=[],
                            disable_tqdm=True, bf16=False, save_strategy="no", per_device_train_batch_size=2,
                            router_load_heatmap=False)  # fmt: skip
    trainer = MoeLoraSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": CORPUS[:8]}),
                                processing_class=tokenizer, peft_config=config)  # fmt: skip
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "run" / "README.md").read_text()
    last = [log for log in trainer.state.log_history if "router/entropy" in log][-1]
    assert "### Routing during training" in card and f"(step {last['step']})" in card
    assert (
        f"| router entropy (nats; ln E when every expert is equally likely) | {last['router/entropy']:.4g} |" in card
    )
    assert f"{last['router/dead_experts']:.4g} |" in card and "max load imbalance" in card
    assert card.count(SECTION_START) == 1 and "import moe_peft_plugin" in card
    # TRL writes its own card from scratch (at checkpoints and `push_to_hub`); the section is added to it again.
    trainer.create_model_card(model_name="run")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "generated_from_trainer" in card and card.count(SECTION_START) == 1 and f"(step {last['step']})" in card
