"""Runtime control of the router-loss coefficients of the MOELORA layers of a model (overrides and warm-up).

The layers read their coefficients from their `RoutingOptions` on every forward (and on the recomputation in the
backward pass), so a change through `MoeLoraLayer.set_router_loss_coefficients` takes effect at the next step.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from moe_peft_plugin import MoeLoraLayer
from moe_peft_plugin.layer import set_router_loss_coefficients
from moe_peft_plugin.routing import ROUTER_LOSS_COEFFICIENTS


COEFFICIENTS = ROUTER_LOSS_COEFFICIENTS


def moelora_layers(model: nn.Module) -> list[MoeLoraLayer]:
    """The MOELORA layers of `model` (a `PeftModel`, a tuner, a wrapped or an unwrapped model), in model order."""
    return [module for module in model.modules() if isinstance(module, MoeLoraLayer)]


class RouterLossCoefficients:
    """
    The router-loss coefficients of every MOELORA adapter in a model: base values (the adapter config, or the
    overrides given here) times a global `scale` (the warm-up factor).

    Args:
        model (`nn.Module`): The model holding the MOELORA layers.
        overrides (`dict[str, float]`, *optional*): New base values, keyed like `MoeLoraConfig`
            (`{"aux_loss_coef": 0.02}`). They are written into the layers and into the adapters' `peft_config`, so that
            the saved `adapter_config.json` records the coefficients that were trained with.

    Raises:
        ValueError: if `overrides` are given but the model has no MOELORA layer, or if `gate_balance_loss_coef` is
            set for an adapter whose router is not `"soft"`.
    """

    def __init__(self, model: nn.Module, overrides: Optional[dict[str, float]] = None) -> None:
        overrides = dict(overrides or {})
        self.layers = moelora_layers(model)
        if overrides and not self.layers:
            raise ValueError(
                f"Router-loss coefficients {overrides} were set, but the model has no MOELORA adapter: pass a "
                "`MoeLoraConfig` as `peft_config`, or a model wrapped with one."
            )
        set_router_loss_coefficients(self.layers, **overrides)
        if overrides:
            for config in _peft_configs(model):
                for key, value in overrides.items():
                    setattr(config, key, float(value))
        self._base = [
            (layer, adapter, options.coefficients)
            for layer in self.layers
            for adapter, options in layer.routing_options.items()
        ]
        self.scale = 1.0

    def set_scale(self, scale: float) -> None:
        """Multiply every base coefficient by `scale` (1.0 restores them)."""
        self.scale = float(scale)
        for layer, adapter, base in self._base:
            layer.set_router_loss_coefficients(adapter, **{key: value * self.scale for key, value in base.items()})

    def any_active(self) -> bool:
        """Whether a router loss of an active adapter currently has a non-zero coefficient."""
        return any(
            value > 0
            for layer in self.layers
            for adapter in layer.active_adapters
            if adapter in layer.routing_options
            for value in layer.routing_options[adapter].coefficients.values()
        )


def _peft_configs(model: nn.Module) -> list:
    """The MOELORA adapter configs of `model` (a `PeftModel` and its tuner share one `peft_config` dict)."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict):
        return []
    return [config for config in peft_config.values() if getattr(config, "peft_type", None) == "MOELORA"]
