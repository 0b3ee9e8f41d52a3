"""Routing statistics of a MOELORA adapter on given text: per adapted layer, per expert; as a table, JSON and a PNG.

The statistics are the model's own (`MoeLoraModel.get_routing_stats()` after each batch, combined over the batches
with `RoutingStats.combine`), measured in eval mode (no routing noise) over the non-padding tokens of the text:

- `expert_load[e]`: the share of routing decisions that went to expert e (sums to 1; top-k routing makes k decisions
  per token). 1/E everywhere is perfectly balanced.
- `mean_gate[e]`: the mean gate weight E_t[g_e] of expert e (sums to 1). `moe-peft export --merge` uses these.
- `entropy`: the mean entropy of the router distribution, in nats (log E is uniform routing).

Layers with a single expert have no router and are not listed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Optional


if TYPE_CHECKING:
    from moe_peft_plugin import RoutingStats


def collect_routing(
    peft_model,
    tokenizer,
    texts: Sequence[str],
    adapter_name: Optional[str] = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[str, RoutingStats]:
    """Routing of `adapter_name` (the active adapter by default) of `peft_model` over `texts`: `{module: stats}`."""
    import torch

    from moe_peft_plugin import RoutingStats

    if not texts:
        raise ValueError("No text to route.")
    adapter_name = adapter_name or peft_model.active_adapters[0]
    per_batch: dict[str, list[RoutingStats]] = {}
    was_training = peft_model.training
    peft_model.eval()
    device = next(peft_model.parameters()).device
    try:
        with torch.no_grad():
            for begin in range(0, len(texts), batch_size):
                batch = tokenizer(
                    list(texts[begin : begin + batch_size]),
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                )
                peft_model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
                for name, by_adapter in peft_model.base_model.get_routing_stats().items():
                    if adapter_name in by_adapter:
                        per_batch.setdefault(name, []).append(by_adapter[adapter_name])
    finally:
        peft_model.train(was_training)
    if not per_batch:
        raise ValueError(f"The model has no routed MOELORA layer for the adapter {adapter_name!r}.")
    return {name: RoutingStats.combine(stats) for name, stats in per_batch.items()}


def short_name(name: str) -> str:
    """ "model.layers.12.self_attn.q_proj" -> "L12.self_attn.q_proj"."""
    return re.sub(r"^(?:.*\.)?layers\.(\d+)\.", r"L\1.", name)


def _imbalance(stats: RoutingStats) -> float:
    """max load x E: 1.0 when balanced, E when a single expert gets everything."""
    return float(stats.expert_load.max()) * stats.num_experts


def _relative_entropy(stats: RoutingStats) -> float:
    return float(stats.entropy) / math.log(stats.num_experts) if stats.num_experts > 1 else 1.0


def format_routing_table(stats: Mapping[str, RoutingStats], expert_names: Optional[Sequence[str]] = None) -> str:
    max_experts = max(s.num_experts for s in stats.values())
    width = max(len(short_name(name)) for name in stats)
    header_experts = " ".join(f"{(expert_names[e] if expert_names else f'e{e}')[:5]:>5}" for e in range(max_experts))
    lines = [
        "load = share of routing decisions per expert (%); balanced = "
        + ", ".join(sorted({f"{100 / s.num_experts:.1f}% (E={s.num_experts})" for s in stats.values()})),
        f"{'layer':<{width}}  {header_experts}  entropy/logE  imbalance",
    ]
    for name, s in stats.items():
        loads = " ".join(f"{100 * float(x):5.1f}" for x in s.expert_load) + "      " * (max_experts - s.num_experts)
        lines.append(f"{short_name(name):<{width}}  {loads}  {_relative_entropy(s):12.2f}  {_imbalance(s):9.2f}")
    dead = sum(int((s.expert_load < 0.01).sum()) for s in stats.values())
    first = next(iter(stats.values()))
    mean_entropy = sum(_relative_entropy(s) for s in stats.values()) / len(stats)
    lines.append(
        f"{len(stats)} layers, {int(first.num_tokens)} tokens; mean entropy/logE {mean_entropy:.2f}; "
        f"max imbalance {max(_imbalance(s) for s in stats.values()):.2f}; experts with <1% load: {dead}"
    )
    return "\n".join(lines)


def save_routing_heatmap(
    stats: Mapping[str, RoutingStats],
    path: str,
    title: str = "Expert load",
    expert_names: Optional[Sequence[str]] = None,
) -> str:
    """The expert-load figure (decoder layers x experts per module type), drawn like the trainer's."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        from .errors import missing_package

        raise missing_package("matplotlib", "demo", "Writing the routing heatmap PNG") from err
    from trainer_callbacks.plots import save_expert_load_summary

    loads = {name: s.expert_load.double().cpu().numpy() for name, s in stats.items()}
    save_expert_load_summary(loads, path, title=title, expert_names=expert_names)
    return path


def save_routing_json(stats: Mapping[str, RoutingStats], path: str, extra: Optional[dict] = None) -> str:
    layers = [
        {
            "name": name,
            "num_experts": s.num_experts,
            "experts_per_token": s.experts_per_token,
            "router_type": s.router_type,
            "load": [round(float(x), 6) for x in s.expert_load],
            "gate": [round(float(x), 6) for x in s.mean_gate],
            "entropy": round(float(s.entropy), 6),
            "imbalance": round(_imbalance(s), 4),
            "tokens": int(s.num_tokens),
        }
        for name, s in stats.items()
    ]
    with open(path, "w") as handle:
        json.dump({**(extra or {}), "layers": layers}, handle, indent=1)
    return path
