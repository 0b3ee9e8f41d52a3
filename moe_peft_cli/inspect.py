"""Routing statistics of a MOELORA adapter on given text: per adapted layer, per expert; as a table, JSON and a PNG.

For every adapted layer we record, over the (non-padding) tokens of the text:

- `load[e]`: the share of routing decisions that went to expert e (sums to 1; top-k routing makes k decisions per
  token). 1/E everywhere is perfectly balanced.
- `gate[e]`: the mean gate weight E_t[g_e] of expert e (sums to 1). `moe-peft export --merge` uses these.
- `entropy`: the mean entropy of the router distribution, in nats (log E is uniform routing).

The statistics are computed from the layer's own router (`routing.router_logits` and `routing.route`) in hooks on
the layers, with the adapter's temperature and expert mask, in eval mode (no routing noise).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class LayerRouting:
    name: str  # module name relative to the base model, e.g. "model.layers.0.self_attn.q_proj"
    num_experts: int
    top_k: int
    router_type: str
    load: np.ndarray  # (E,) share of routing decisions
    gate: np.ndarray  # (E,) mean gate weight
    entropy: float  # mean router entropy (nats)
    tokens: int

    @property
    def imbalance(self) -> float:
        """max load x E: 1.0 when balanced, E when a single expert gets everything."""
        return float(self.load.max() * self.num_experts)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "router_type": self.router_type,
            "load": [round(float(x), 6) for x in self.load],
            "gate": [round(float(x), 6) for x in self.gate],
            "entropy": round(self.entropy, 6),
            "imbalance": round(self.imbalance, 4),
            "tokens": self.tokens,
        }


class _Accumulator:
    def __init__(self, num_experts: int) -> None:
        self.load = np.zeros(num_experts)
        self.gate = np.zeros(num_experts)
        self.entropy = 0.0
        self.tokens = 0


def _module_names(peft_model) -> dict:
    from moe_peft_plugin import MoeLoraLayer

    base = peft_model.get_base_model()
    return {module: name for name, module in base.named_modules() if isinstance(module, MoeLoraLayer)}


def collect_routing(
    peft_model,
    tokenizer,
    texts: Sequence[str],
    adapter_name: Optional[str] = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[LayerRouting]:
    """Routing statistics of `adapter_name` (the active adapter by default) of `peft_model` over `texts`."""
    import torch

    from moe_peft_plugin.routing import route, router_logits

    if not texts:
        raise ValueError("No text to route.")
    adapter_name = adapter_name or peft_model.active_adapters[0]
    names = _module_names(peft_model)
    layers = [(layer, name) for layer, name in names.items() if adapter_name in layer.moelora_A]
    if not layers:
        raise ValueError(f"The model has no MOELORA layer for the adapter {adapter_name!r}.")
    accumulators = {name: _Accumulator(layer.num_experts[adapter_name]) for layer, name in layers}
    token_mask: dict[str, Optional[torch.Tensor]] = {"mask": None}

    def hook(layer, name):
        def pre_hook(module, args):
            x = args[0]
            acc = accumulators[name]
            tokens = x.reshape(-1, x.shape[-1])
            mask = token_mask["mask"]
            keep = mask if mask is not None and mask.numel() == tokens.shape[0] else None
            if keep is not None:
                tokens = tokens[keep]
            count = tokens.shape[0]
            if count == 0:
                return
            num_experts = layer.num_experts[adapter_name]
            if num_experts == 1 or adapter_name not in layer.moelora_router:
                acc.load += count
                acc.gate += count
                acc.tokens += count
                return
            options = layer.routing_options[adapter_name]
            log_temperature = (
                layer.moelora_log_temperature[adapter_name] if adapter_name in layer.moelora_log_temperature else None
            )
            temperature = options.router_temperature if log_temperature is None else log_temperature.float().exp()
            expert_mask = layer.expert_mask[adapter_name]
            logits = router_logits(tokens, layer.moelora_router[adapter_name])
            routing = route(
                logits,
                top_k=layer.top_k[adapter_name],
                router_type=options.router_type,
                temperature=temperature,
                noise_std=0.0,
                expert_mask=None if expert_mask is None else expert_mask.to(logits.device),
            )
            selected = routing.selected.double()
            acc.load += (selected.sum(0) / selected.sum(-1, keepdim=True).clamp_min(1).mean()).cpu().numpy()
            acc.gate += routing.gates.double().sum(0).cpu().numpy()
            probs = routing.probs.double()
            acc.entropy += float(-(probs * probs.clamp_min(1e-30).log()).sum())
            acc.tokens += count

        return pre_hook

    handles = [layer.register_forward_pre_hook(hook(layer, name)) for layer, name in layers]
    was_training = peft_model.training
    peft_model.eval()
    device = next(peft_model.parameters()).device
    try:
        with torch.inference_mode():
            for begin in range(0, len(texts), batch_size):
                batch = tokenizer(
                    list(texts[begin : begin + batch_size]),
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                )
                token_mask["mask"] = batch["attention_mask"].reshape(-1).bool().to(device)
                peft_model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        token_mask["mask"] = None
        peft_model.train(was_training)

    results = []
    for layer, name in layers:
        acc = accumulators[name]
        n = max(acc.tokens, 1)
        load = acc.load / max(acc.load.sum(), 1e-30)
        results.append(
            LayerRouting(
                name=name,
                num_experts=layer.num_experts[adapter_name],
                top_k=min(layer.top_k[adapter_name], layer.num_experts[adapter_name]),
                router_type=layer.routing_options[adapter_name].router_type,
                load=load,
                gate=acc.gate / n,
                entropy=acc.entropy / n,
                tokens=acc.tokens,
            )
        )
    return results


def short_name(name: str) -> str:
    """ "model.layers.12.self_attn.q_proj" -> "L12.self_attn.q_proj"."""
    return re.sub(r"^(?:.*\.)?layers\.(\d+)\.", r"L\1.", name)


def format_routing_table(stats: Sequence[LayerRouting], expert_names: Optional[Sequence[str]] = None) -> str:
    max_experts = max(s.num_experts for s in stats)
    width = max(len(short_name(s.name)) for s in stats)
    header_experts = " ".join(f"{(expert_names[e] if expert_names else f'e{e}')[:5]:>5}" for e in range(max_experts))
    lines = [
        "load = share of routing decisions per expert (%); balanced = "
        + ", ".join(sorted({f"{100 / s.num_experts:.1f}% (E={s.num_experts})" for s in stats})),
        f"{'layer':<{width}}  {header_experts}  entropy/logE  imbalance",
    ]
    for s in stats:
        loads = " ".join(f"{100 * x:5.1f}" for x in s.load) + "      " * (max_experts - s.num_experts)
        relative_entropy = s.entropy / math.log(s.num_experts) if s.num_experts > 1 else 1.0
        lines.append(f"{short_name(s.name):<{width}}  {loads}  {relative_entropy:12.2f}  {s.imbalance:9.2f}")
    dead = sum(int((s.load < 0.01).sum()) for s in stats)
    lines.append(
        f"{len(stats)} layers, {stats[0].tokens} tokens; mean entropy/logE "
        f"{np.mean([s.entropy / math.log(s.num_experts) if s.num_experts > 1 else 1.0 for s in stats]):.2f}; "
        f"max imbalance {max(s.imbalance for s in stats):.2f}; experts with <1% load: {dead}"
    )
    return "\n".join(lines)


def save_routing_heatmap(
    stats: Sequence[LayerRouting], path: str, title: str = "Expert load", expert_names: Optional[Sequence[str]] = None
) -> str:
    """A PNG heatmap (layers x experts) of the expert load, without touching pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        from .errors import missing_package

        raise missing_package("matplotlib", "demo", "Writing the routing heatmap PNG") from err

    max_experts = max(s.num_experts for s in stats)
    loads = np.full((len(stats), max_experts), np.nan)
    for row, s in enumerate(stats):
        loads[row, : s.num_experts] = s.load
    rows = len(stats)
    figure = Figure(figsize=(min(4 + 0.5 * max_experts, 16), min(2 + 0.09 * rows, 40)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    masked = np.ma.masked_invalid(loads)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: MoLA layers with fewer experts
    image = axes.imshow(masked, aspect="auto", cmap=cmap, vmin=0.0, vmax=max(float(masked.max()), 1e-6))
    axes.set_xticks(range(max_experts))
    if expert_names:
        axes.set_xticklabels(list(expert_names)[:max_experts], rotation=45, ha="right", fontsize=7)
    axes.set_xlabel("expert")
    step = max(1, math.ceil(rows / 45))
    axes.set_yticks(range(0, rows, step))
    axes.set_yticklabels([short_name(s.name) for s in stats][::step], fontsize=6)
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, label="share of routing decisions")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png")
    return path


def save_routing_json(stats: Sequence[LayerRouting], path: str, extra: Optional[dict] = None) -> str:
    with open(path, "w") as handle:
        json.dump({**(extra or {}), "layers": [s.to_dict() for s in stats]}, handle, indent=1)
    return path
