"""Routing statistics of MOELORA training: accumulated per logging window, summarised into metrics.

Every loss forward adds the routing of every (layer, adapter) to the running window of its mode (`"train"` or
`"eval"`) as a handful of device tensors, without synchronising with the device. When the trainer logs, the window is
reduced across processes (one collective), turned into a [`RoutingWindow`] and into metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from moe_peft_plugin import RoutingStats


@dataclass
class RoutingWindow:
    """Routing of a whole model over one logging window, as it is logged."""

    mode: str
    num_forwards: int
    # Per layer (module name, with `[adapter]` appended for adapters other than "default"): the mean over the forwards
    # of the window (CPU tensors; `losses` and `weighted_loss` are not kept per layer).
    layers: dict[str, RoutingStats]
    aux_loss: float  # mean of `outputs.aux_loss` (weighted sum of the router losses)
    components: dict[str, float]  # mean over layers of each unweighted loss component

    def dead_experts(self, threshold: float) -> list[tuple[str, int]]:
        """`(layer, expert)` pairs whose token share is below `threshold`."""
        return [
            (name, int(expert))
            for name, layer in self.layers.items()
            for expert in torch.nonzero(layer.token_share < threshold).flatten().tolist()
        ]

    def metrics(self, dead_expert_threshold: float, per_layer: bool = False) -> dict[str, float]:
        """The logged metrics (keys without the `eval_` prefix)."""
        metrics = {"router/aux_loss": self.aux_loss}
        metrics.update({f"router/{name}": value for name, value in sorted(self.components.items())})
        if self.layers:
            metrics["router/entropy"] = float(np.mean([float(layer.entropy) for layer in self.layers.values()]))
            metrics["router/dead_experts"] = float(len(self.dead_experts(dead_expert_threshold)))
            # 1.0 when every expert gets the same load; num_experts when one expert gets everything.
            metrics["router/max_load_imbalance"] = float(
                max(float(layer.expert_load.max()) * layer.num_experts for layer in self.layers.values())
            )
        if per_layer:
            for name, layer in self.layers.items():
                metrics[f"router/entropy/{name}"] = float(layer.entropy)
                for expert, load in enumerate(layer.expert_load.tolist()):
                    metrics[f"router/load/{name}/{expert}"] = float(load)
        return metrics


@dataclass
class _Accumulator:
    """Sums over the forwards of one window; tensors stay on the model's device until the window is flushed."""

    slots: tuple[tuple[str, int, int, str], ...]  # (name, num_experts, experts per token, router type) per layer
    loads: torch.Tensor  # (2 * sum of num_experts,): expert loads, then mean gates
    entropy: torch.Tensor  # (2 * num slots,): entropies, then token counts
    aux_loss: torch.Tensor  # ()
    count: int = 0
    # Loss components come and go with their coefficients (e.g. during a warm-up from 0): each has its own count.
    components: dict[str, list] = field(default_factory=dict)  # name -> [sum tensor (), number of forwards]


@dataclass
class LoadHeatmap:
    """Mean expert load per layer since the previous heatmap: `loads[i, e]`, NaN where layer i has fewer experts."""

    layer_names: list[str]
    loads: np.ndarray  # (num layers, max num_experts)
    num_windows: int


class RouterStatsTracker:
    """
    Accumulates the routing statistics of the loss forwards of a trainer and summarises them per logging window.

    Args:
        dead_expert_threshold (`float`): token share below which an expert counts as dead.
        per_layer (`bool`): include the per-layer loads and entropies in the metrics.
    """

    def __init__(self, dead_expert_threshold: float = 0.01, per_layer: bool = False) -> None:
        self.dead_expert_threshold = dead_expert_threshold
        self.per_layer = per_layer
        self._open: dict[str, Optional[_Accumulator]] = {"train": None, "eval": None}
        # The last flushed window of each mode, and how many windows each mode has flushed (callbacks poll these).
        self.latest: dict[str, RoutingWindow] = {}
        self.num_windows: dict[str, int] = {"train": 0, "eval": 0}
        self._heatmap_sums: dict[str, tuple[np.ndarray, int]] = {}
        self._heatmap_windows = 0
        self._last_heatmap: Optional[LoadHeatmap] = None

    def add(
        self,
        mode: str,
        stats: Mapping[str, Mapping[str, object]],
        aux_loss: Optional[torch.Tensor],
    ) -> None:
        """Add one forward: `stats` as returned by `MoeLoraModel.get_routing_stats()`, `aux_loss` its output."""
        records = [
            (name, adapter, record) for name, by_adapter in stats.items() for adapter, record in by_adapter.items()
        ]
        if not records and aux_loss is None:
            return
        slots = tuple(
            (
                name if adapter == "default" else f"{name}[{adapter}]",
                record.num_experts,
                record.experts_per_token,
                record.router_type,
            )
            for name, adapter, record in records
        )
        component_names = sorted({key for _, _, record in records for key in record.losses})
        device = records[0][2].expert_load.device if records else aux_loss.device
        with torch.no_grad():
            loads = (
                torch.cat(
                    [r.expert_load.float().reshape(-1) for _, _, r in records]
                    + [r.mean_gate.float().reshape(-1) for _, _, r in records]
                )
                if records
                else torch.zeros(0, device=device)
            )
            entropy = (
                torch.stack(
                    [r.entropy.float().reshape(()) for _, _, r in records]
                    + [r.num_tokens.float().reshape(()) for _, _, r in records]
                )
                if records
                else torch.zeros(0, device=device)
            )
            components = {
                key: torch.stack([r.losses[key].float().reshape(()) for _, _, r in records if key in r.losses]).mean()
                for key in component_names
            }
            aux = torch.zeros((), device=device) if aux_loss is None else aux_loss.detach().float().reshape(())
        acc = self._open.get(mode)
        if acc is None or acc.slots != slots:
            # The adapters changed (or this is the first forward of the window): start the window again.
            acc = self._open[mode] = _Accumulator(
                slots, torch.zeros_like(loads), torch.zeros_like(entropy), torch.zeros_like(aux)
            )
        acc.loads += loads
        acc.entropy += entropy
        acc.aux_loss += aux
        acc.count += 1
        for key, value in components.items():
            total = acc.components.setdefault(key, [torch.zeros_like(value), 0])
            total[0] += value
            total[1] += 1

    def flush(
        self, mode: str, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    ) -> Optional[RoutingWindow]:
        """Close the window of `mode` and summarise it; `reduce` sums a tensor over the processes (collective)."""
        acc = self._open.get(mode)
        self._open[mode] = None
        if acc is None or acc.count == 0:
            return None
        names = sorted(acc.components)
        sums = [acc.components[name][0].reshape(1) for name in names]
        counts = acc.loads.new_tensor([float(acc.components[name][1]) for name in names])
        packed = torch.cat(
            [acc.loads, acc.entropy, *sums, counts, acc.aux_loss.reshape(1), acc.loads.new_tensor([acc.count])]
        )
        if reduce is not None:
            packed = reduce(packed)
        packed = packed.double().cpu().numpy()
        count = packed[-1]
        num_loads, num_slots, num_components = acc.loads.numel(), acc.entropy.numel(), len(names)
        loads = torch.from_numpy(packed[:num_loads] / count)
        entropy = torch.from_numpy(packed[num_loads : num_loads + num_slots] / count)
        offset = num_loads + num_slots
        component_sums = packed[offset : offset + num_components]
        component_counts = packed[offset + num_components : offset + 2 * num_components]
        layers, offset, gate_offset = {}, 0, num_loads // 2
        for index, (name, num_experts, per_token, router_type) in enumerate(acc.slots):
            layers[name] = RoutingStats(
                expert_load=loads[offset : offset + num_experts],
                mean_gate=loads[gate_offset + offset : gate_offset + offset + num_experts],
                entropy=entropy[index],
                num_tokens=entropy[len(acc.slots) + index] * count,
                experts_per_token=per_token,
                router_type=router_type,
            )
            offset += num_experts
        window = RoutingWindow(
            mode=mode,
            num_forwards=int(round(count)),
            layers=layers,
            aux_loss=float(packed[-2] / count),
            components={name: float(total / n) for name, total, n in zip(names, component_sums, component_counts)},
        )
        self.latest[mode] = window
        self.num_windows[mode] += 1
        if mode == "train":
            for name, layer in layers.items():
                total, n = self._heatmap_sums.get(name, (0.0, 0))
                self._heatmap_sums[name] = (
                    total + layer.expert_load.numpy() * window.num_forwards,
                    n + window.num_forwards,
                )
            self._heatmap_windows += 1
        return window

    def take_heatmap(self) -> Optional[LoadHeatmap]:
        """Mean train load per layer since the previous call (the previous heatmap when no window was logged since)."""
        if self._heatmap_sums:
            names = list(self._heatmap_sums)
            width = max(len(total) for total, _ in self._heatmap_sums.values())
            loads = np.full((len(names), width), np.nan)
            for row, name in enumerate(names):
                total, n = self._heatmap_sums[name]
                loads[row, : len(total)] = total / n
            self._last_heatmap = LoadHeatmap(names, loads, self._heatmap_windows)
            self._heatmap_sums, self._heatmap_windows = {}, 0
        return self._last_heatmap
