"""Export MOELORA experts as a plain peft LoRA adapter (loads with `peft` alone, without this plugin).

In one adapted layer, expert e computes `scaling * B_e A_e x`, with `A_e` (r, in) and `B_e` (out, r). A LoRA with
`lora_alpha = r` (so peft's scaling `lora_alpha / r` is 1) and `lora_A = A_e`, `lora_B = scaling * B_e` computes
exactly the same. A weighted set of experts `sum_e w_e * scaling * B_e A_e x` is a LoRA of rank `sum_e r`:
`lora_A = concat_e A_e` (stacked rows) and `lora_B = concat_e (w_e * scaling * B_e)` (stacked columns).

- one expert: `w = 1` for that expert (in every layer, or the layers given).
- a subset (MoLE: trained LoRAs by name): `w = 1` for each (their sum, like peft's `add_weighted_adapter("cat")`), or
  `mean`, or explicit weights.
- `--merge`: the approximate single-LoRA merge of the whole adapter (or of a subset): `w_e = E_t[g_e]`, the expected
  gate of each expert over calibration text, per layer. Routing depends on the token, so this is an approximation;
  its quality loss is measured on held-out text and printed.

The weights are read straight from the adapter file, so an export without a quality measurement needs no model.
`moe-peft export` is the command line of this module; mistakes in its input raise [`MoeLoraExportError`].
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .config import layer_index, lora_scaling


ADAPTER_CONFIG = "adapter_config.json"


class MoeLoraExportError(ValueError):
    """The adapter or the selection of experts and layers cannot be exported (the message says why)."""


@dataclass
class ExpertWeights:
    """The experts of one adapted layer: A (E, r, in), B (E, out, r) and the layer's LoRA scaling."""

    A: torch.Tensor  # noqa: F821
    B: torch.Tensor  # noqa: F821
    scaling: float

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]


def read_moelora(adapter_dir: str) -> tuple[dict, dict[str, ExpertWeights]]:
    """(adapter config, {module name relative to the base model: ExpertWeights}) of a saved MOELORA adapter."""
    from peft.utils import load_peft_weights

    config = read_adapter_config(adapter_dir)
    if config.get("peft_type") != "MOELORA":
        raise MoeLoraExportError(f"{adapter_dir!r} holds a {config.get('peft_type')} adapter, not a MOELORA adapter.")
    for name in ("modules_to_save", "trainable_token_indices"):
        if config.get(name):
            raise MoeLoraExportError(
                f"The adapter trains `{name}`={config[name]!r}, which a plain LoRA export cannot carry; export is "
                "only supported for adapters whose trained weights are all in the experts."
            )
    if config.get("bias", "none") != "none":
        raise MoeLoraExportError(
            f"The adapter trains biases (bias={config['bias']!r}), which a LoRA export cannot carry."
        )
    r, alpha = config["r"], config["lora_alpha"]
    scaling = lora_scaling(alpha, r, bool(config.get("use_rslora")))
    state = load_peft_weights(adapter_dir, device="cpu")
    experts: dict[str, ExpertWeights] = {}
    for key, lora_A in state.items():
        if not key.endswith(".moelora_A"):
            continue
        module = key[: -len(".moelora_A")]
        for prefix in ("base_model.model.", "base_model."):
            if module.startswith(prefix):
                module = module[len(prefix) :]
                break
        lora_B = state[key[: -len("moelora_A")] + "moelora_B"]
        experts[module] = ExpertWeights(lora_A.float(), lora_B.float(), scaling)
    if not experts:
        raise MoeLoraExportError(f"{adapter_dir!r} contains no MOELORA expert weights.")
    return config, experts


def read_adapter_config(adapter_dir: str) -> dict:
    """The `adapter_config.json` of a saved adapter folder, as a dict."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise MoeLoraExportError(f"{adapter_dir!r} is not a saved adapter folder (no {ADAPTER_CONFIG}).")
    with open(path) as handle:
        return json.load(handle)


def parse_layers(spec: Optional[str]) -> Optional[set[int]]:
    """ "0-3,7" -> {0, 1, 2, 3, 7}."""
    if not spec:
        return None
    layers = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = part.split("-")
                layers.update(range(int(low), int(high) + 1))
            elif part:
                layers.add(int(part))
        except ValueError as err:
            raise MoeLoraExportError(f"Layers must look like '0-3,7', got {spec!r}.") from err
    return layers


def resolve_experts(specs: Sequence[Union[int, str]], names: Optional[Sequence[str]], max_experts: int) -> list[int]:
    """Expert indices from indices or MoLE expert names."""
    indices = []
    for spec in specs:
        spec = str(spec).strip()
        if spec.isdigit():
            index = int(spec)
        elif names and spec in names:
            index = list(names).index(spec)
        else:
            known = f"the names {list(names)} or " if names else ""
            raise MoeLoraExportError(f"Unknown expert {spec!r}: give {known}indices 0..{max_experts - 1}.")
        if not 0 <= index < max_experts:
            raise MoeLoraExportError(
                f"Expert index {index} is out of range: the adapter has at most {max_experts} experts."
            )
        if index in indices:
            raise MoeLoraExportError(f"Expert {spec!r} is given twice.")
        indices.append(index)
    return indices


def build_lora_state(
    experts: dict[str, ExpertWeights],
    weights: dict[str, np.ndarray],
    selected: Sequence[int],
    layers: Optional[set[int]] = None,
    layers_pattern: Union[str, list[str], None] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:  # noqa: F821
    """peft LoRA tensors (`base_model.model.<module>.lora_A.weight`, ...) and the rank of each module.

    `weights[module][e]` is the weight of expert e in that module; only the `selected` experts are exported, and
    experts with weight 0 are dropped (they contribute nothing). `layers` keeps only those decoder layers, numbered
    as the adapter's MoLA layers are (`layers_pattern` of its config).
    """
    import torch

    state, ranks = {}, {}
    for module, expert in experts.items():
        if layers is not None and layer_index(module, layers_pattern) not in layers:
            continue
        keep = [e for e in selected if e < expert.num_experts and weights[module][e] != 0]
        if not keep:
            continue
        w = torch.tensor([float(weights[module][e]) for e in keep])
        lora_A = expert.A[keep].flatten(0, 1)  # (k*r, in)
        lora_B = (expert.B[keep] * (w * expert.scaling)[:, None, None]).permute(1, 0, 2).flatten(1)  # (out, k*r)
        state[f"base_model.model.{module}.lora_A.weight"] = lora_A.contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = lora_B.contiguous()
        ranks[module] = lora_A.shape[0]
    if not state:
        raise MoeLoraExportError("Nothing to export: no adapted layer matches the given experts and layers.")
    return state, ranks


def save_lora(
    output_dir: str,
    state: dict,
    ranks: dict[str, int],
    base_model: Optional[str],
    task_type: Optional[str],
    info: dict,
    dtype: str = "float32",
) -> None:
    """Write a plain LoRA adapter (adapter_config.json + adapter_model.safetensors) that peft loads by itself."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    rank = max(counts, key=lambda k: (counts[k], k))
    # Modules of another rank get an exact (escaped) pattern; alpha = rank everywhere keeps peft's scaling at 1.
    rank_pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        bias="none",
        lora_dropout=0.0,
        task_type=task_type,
        base_model_name_or_path=base_model,
    )
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output_dir, "moe_peft_export.json"), "w") as handle:
        json.dump(info, handle, indent=1)


# ---------------------------------------------------------------------------------------------------------------------
# Calibration (expected gates) and the measured quality loss
# ---------------------------------------------------------------------------------------------------------------------


def completion_nll(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8, max_length: int = 512):
    """(mean negative log-likelihood per token, tokens) of the completions given the prompts.

    A pair with an empty completion scores every token of its prompt (plain language-model loss).
    """
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, len(pairs), batch_size):
            rows = []
            for prompt, completion in pairs[begin : begin + batch_size]:
                prompt_ids = tokenizer(prompt)["input_ids"]
                ids = prompt_ids + (tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else [])
                first = len(prompt_ids) if completion else 1
                cut = max(0, len(ids) - max_length)
                rows.append((ids[cut:], max(1, first - cut)))
            length = max(len(ids) for ids, _ in rows)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            labels = torch.full_like(input_ids, -100)
            for i, (ids, first) in enumerate(rows):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
                labels[i, first : len(ids)] = input_ids[i, first : len(ids)]
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            logprobs = logits[:, :-1].log_softmax(-1)
            targets = labels[:, 1:].to(device)
            valid = targets != -100
            picked = logprobs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
            total -= float(picked[valid].sum())
            count += int(valid.sum())
    return total / max(count, 1), count


@dataclass
class QualityReport:
    base_nll: float
    moelora_nll: float
    export_nll: float
    tokens: int

    @property
    def retained(self) -> float:
        """Share of the adapter's loss improvement over the base model that the export keeps (1.0 = all of it)."""
        gain = self.base_nll - self.moelora_nll
        return (self.base_nll - self.export_nll) / gain if abs(gain) > 1e-9 else float("nan")

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "nll": {"base": self.base_nll, "moelora": self.moelora_nll, "export": self.export_nll},
            "perplexity": {
                "base": math.exp(self.base_nll),
                "moelora": math.exp(self.moelora_nll),
                "export": math.exp(self.export_nll),
            },
            "retained_improvement": self.retained,
        }

    def format(self) -> str:
        ppl = {
            k: math.exp(v) for k, v in (("base", self.base_nll), ("moe", self.moelora_nll), ("exp", self.export_nll))
        }
        loss = ppl["exp"] / ppl["moe"] - 1
        return "\n".join(
            [
                f"quality on {self.tokens} held-out tokens (mean NLL / perplexity):",
                f"  base model           {self.base_nll:.4f} / {ppl['base']:.3f}",
                f"  MOELORA adapter      {self.moelora_nll:.4f} / {ppl['moe']:.3f}",
                f"  exported LoRA        {self.export_nll:.4f} / {ppl['exp']:.3f}",
                f"  quality loss: perplexity {100 * loss:+.2f}% vs MOELORA; the export keeps "
                f"{100 * self.retained:.0f}% of the adapter's loss improvement over the base model",
            ]
        )
