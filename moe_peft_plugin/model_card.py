"""The model card (`README.md`) of a saved MOELORA adapter: how to load it, which papers its config follows, and the
routing of the training run when it is known.

peft writes its template card into the adapter folder (`PeftModel.create_or_update_model_card`) just before it saves
the adapter config, and `MoeLoraConfig.save_pretrained` then adds the section written here to that card. The trainer
(`trainer_callbacks.MoeLoraSFTTrainer`) rewrites the section with the routing figures of the run. The section sits
between two HTML comments and is replaced, never duplicated; the rest of the card (peft's, TRL's or your own text) is
kept as it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional


CARD_NAME = "README.md"
SECTION_START = "<!-- moe-peft-plugin: start -->"
SECTION_END = "<!-- moe-peft-plugin: end -->"
# The card's loading snippets name the adapter by this placeholder: the folder moves, or goes to the hub.
ADAPTER_PLACEHOLDER = "path/to/this/adapter"

PAPERS = {
    "MoELoRA": (
        "2402.12851",
        "MoELoRA: Contrastive Learning Guided Mixture of Experts on Parameter-Efficient Fine-Tuning for Large Language "
        "Models",
    ),
    "MoLA": ("2402.08562", "Higher Layers Need More LoRA Experts"),
    "MoLE": ("2404.13628", "Mixture of LoRA Experts"),
}

_AUTO_CLASSES = {  # task_type -> (peft auto class, transformers auto class)
    "CAUSAL_LM": ("AutoPeftModelForCausalLM", "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": ("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM"),
    "SEQ_CLS": ("AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("AutoPeftModelForTokenClassification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("AutoPeftModelForFeatureExtraction", "AutoModel"),
}


def variants(config) -> list[tuple[str, str]]:
    """`(paper name, what of it this config uses)` for each paper the config follows."""
    found = []
    mole = bool(getattr(config, "expert_adapters", None) or getattr(config, "expert_names", None))
    num_experts = config.num_experts
    per_layer = isinstance(num_experts, (list, tuple)) and len(set(num_experts)) > 1
    if not mole:
        top_k = config.top_k if config.router_type != "soft" else None
        routing = f"top-{_describe(top_k)} router" if top_k is not None else "soft router"
        uses = f"{_describe(num_experts)} LoRA experts per layer with a {routing}"
        if config.contrastive_loss_coef:
            uses += f" and the expert contrastive loss (coefficient {config.contrastive_loss_coef})"
        found.append(("MoELoRA", uses))
    if per_layer:
        found.append(("MoLA", f"layer-wise expert counts {list(num_experts)} (from the first layer to the last)"))
    if mole:
        names = getattr(config, "expert_names", None) or getattr(config, "expert_adapters", None) or []
        found.append(("MoLE", f"a learned gate over {len(names)} trained LoRAs ({', '.join(map(str, names))})"))
    return found


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"{min(value)} to {max(value)}" if len(set(value)) > 1 else str(value[0])
    return str(value)


def card_section(config, routing: Optional[Mapping[str, float]] = None) -> str:
    """The MOELORA section of the card, between its two markers."""
    task_type = getattr(config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    peft_auto, transformers_auto = _AUTO_CLASSES.get(task_type, ("AutoPeftModel", "AutoModel"))
    base_model = config.base_model_name_or_path or "path/to/the/base/model"
    lines = [
        SECTION_START,
        "## MOELORA adapter",
        "",
        "A mixture-of-LoRA-experts adapter for [peft](https://github.com/huggingface/peft), made with "
        "moe-peft-plugin: every adapted layer holds several LoRA experts and a router.",
        "",
        "### How to load it",
        "",
        "peft needs the plugin (the `moe-peft-plugin` package) to know the PEFT type `MOELORA`: "
        "`import moe_peft_plugin` first; without it peft raises `KeyError: 'MOELORA'`.",
        "",
        "```python",
        "import moe_peft_plugin  # registers MOELORA with peft: import it before loading the adapter",
        f"from peft import {peft_auto}",
        "",
        f'model = {peft_auto}.from_pretrained("{ADAPTER_PLACEHOLDER}")  # this folder, or its hub id',
        "```",
        "",
        "or onto a base model you loaded yourself:",
        "",
        "```python",
        "import moe_peft_plugin  # registers MOELORA with peft",
        "from peft import PeftModel",
        f"from transformers import {transformers_auto}",
        "",
        f'base_model = {transformers_auto}.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base_model, "{ADAPTER_PLACEHOLDER}")',
        "```",
        "",
        "Routing depends on the input, so the adapter does not merge into the base weights; "
        "`moe-peft export` writes experts as a plain LoRA adapter that loads without the plugin.",
        "",
        "### Method",
        "",
        "| paper | what this adapter uses |",
        "|---|---|",
    ]
    for name, uses in variants(config):
        arxiv, title = PAPERS[name]
        lines.append(f"| {name}: [{title}](https://arxiv.org/abs/{arxiv}) | {uses} |")
    losses = [
        f"{label} {value}"
        for label, value in (
            ("load balancing", config.aux_loss_coef),
            ("router z-loss", config.router_z_loss_coef),
            ("contrastive", config.contrastive_loss_coef),
            ("gate balance", config.gate_balance_loss_coef),
        )
        if value
    ]
    lines += ["", f"LoRA rank r={config.r}, lora_alpha={config.lora_alpha}; router losses: "
              f"{', '.join(losses) if losses else 'none'}."]  # fmt: skip
    if routing:
        lines += ["", "### Routing during training", ""]
        step = routing.get("step")
        lines.append(
            "Last logged window of training"
            + (f" (step {int(step)})" if step is not None else "")
            + ", averaged over "
            "the adapted layers:"
        )
        lines += ["", "| measure | value |", "|---|---|"]
        for key, label in ROUTING_FIGURES:
            if key in routing:
                lines.append(f"| {label} | {routing[key]:.4g} |")
    lines.append(SECTION_END)
    return "\n".join(lines)


# Keys of the routing summary (the trainer's logged metrics) and how the card names them.
ROUTING_FIGURES = (
    ("router/entropy", "router entropy (nats; ln E when every expert is equally likely)"),
    ("router/dead_experts", "dead experts (below the trainer's dead-expert threshold), summed over layers"),
    ("router/max_load_imbalance", "max load imbalance (max load x E: 1 balanced, E one expert)"),
    ("router/aux_loss", "router losses, weighted sum (`outputs.aux_loss`)"),
    ("loss", "training loss"),
)


def update_model_card(save_directory: str, config, routing: Optional[Mapping[str, float]] = None) -> str:
    """Write the MOELORA section into `save_directory/README.md` (created if missing), replacing an earlier one.

    `routing`: figures of the training run, keyed like the trainer's metrics (`"router/entropy"`, ...; see
    `ROUTING_FIGURES`), plus `"step"`. Returns the path of the card.
    """
    path = os.path.join(save_directory, CARD_NAME)
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    section = card_section(config, routing)
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(SECTION_END) :]
    else:
        # First thing after the metadata: how to load the adapter is what a reader of the card needs first.
        head, body = _split_metadata(text)
        text = head + section + "\n" + ("\n" + body.lstrip("\n") if body.strip() else "")
    os.makedirs(save_directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def _split_metadata(text: str) -> tuple[str, str]:
    """(YAML front matter with its `---` lines and a newline, the rest) of a card."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            return text[: end + 5] + "\n", text[end + 5 :]
    return "", text


def update_existing_model_card(save_directory: str, config) -> Optional[str]:
    """[`update_model_card`] where peft has written a card into `save_directory`; nothing (None) elsewhere."""
    if not os.path.isfile(os.path.join(save_directory, CARD_NAME)):
        return None
    return update_model_card(save_directory, config)
