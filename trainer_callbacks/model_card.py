"""The routing figures of a training run in the model card of the adapters the trainer saves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from moe_peft_plugin import PEFT_TYPE
from moe_peft_plugin.model_card import ROUTING_FIGURES, update_model_card


def routing_summary(log_history: Sequence[dict]) -> Optional[dict]:
    """The routing metrics of the last training log that has them (`router/entropy`, ...), with its `step`."""
    keys = [key for key, _ in ROUTING_FIGURES]
    for entry in reversed(log_history):
        if "router/aux_loss" in entry:
            summary = {key: float(entry[key]) for key in keys if isinstance(entry.get(key), (int, float))}
            if "step" in entry:
                summary["step"] = entry["step"]
            return summary
    return None


def update_trainer_model_card(trainer, output_dir: str) -> None:
    """Rewrite the MOELORA section of the card in `output_dir` with the routing of the run so far (main process)."""
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else None
    if config is None or config.peft_type != PEFT_TYPE:
        config = next((c for c in configs.values() if c.peft_type == PEFT_TYPE), None)
    if config is not None:
        update_model_card(output_dir, config, routing_summary(trainer.state.log_history))
