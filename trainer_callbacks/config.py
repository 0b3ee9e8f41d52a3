"""`MoeLoraSFTConfig`: TRL's `SFTConfig` plus the options of the MOELORA router losses and routing statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from trl import SFTConfig


# Trainer field -> key of the layers' `routing_options` and field of `MoeLoraConfig` (the same name in both).
COEFFICIENT_FIELDS = {
    "moelora_aux_loss_coef": "aux_loss_coef",
    "moelora_router_z_loss_coef": "router_z_loss_coef",
    "moelora_contrastive_loss_coef": "contrastive_loss_coef",
    "moelora_gate_balance_loss_coef": "gate_balance_loss_coef",
}
ROUTER_STATS_LOGGING = ("none", "summary", "full")


@dataclass
class MoeLoraSFTConfig(SFTConfig):
    r"""
    Configuration of [`MoeLoraSFTTrainer`]: every [`~trl.SFTConfig`] argument, plus the following.

    The router-loss coefficients are named `moelora_*` so that they never clash with TRL's own `router_aux_loss_coef`,
    which weights the load-balancing loss of Mixture-of-Experts *base* models (Mixtral, Qwen3-MoE) and fails for other
    models.

    Parameters:
        moelora_aux_loss_coef (`float`, *optional*):
            Overrides `MoeLoraConfig.aux_loss_coef` (Switch load balancing) of every MOELORA adapter of the model. `None`
            keeps the adapter's value. The saved `adapter_config.json` records the value that was trained with.
        moelora_router_z_loss_coef (`float`, *optional*):
            Overrides `MoeLoraConfig.router_z_loss_coef` (ST-MoE z-loss). `None` keeps the adapter's value.
        moelora_contrastive_loss_coef (`float`, *optional*):
            Overrides `MoeLoraConfig.contrastive_loss_coef` (MoELoRA expert contrastive loss). `None` keeps the
            adapter's value.
        moelora_gate_balance_loss_coef (`float`, *optional*):
            Overrides `MoeLoraConfig.gate_balance_loss_coef` (MoLE gating balance; soft routers only). `None` keeps the
            adapter's value.
        moelora_loss_warmup_steps (`float`, *optional*, defaults to `0`):
            Ramp the router-loss coefficients linearly from 0 to their value over this many optimizer steps (an int
            >= 1), or over this fraction of the training steps (a float in (0, 1)). 0 disables the warm-up.
        moelora_router_lr_ratio (`float`, *optional*, defaults to `1.0`):
            The learning rate of the routers (and of learned router temperatures) as a multiple of `learning_rate`; the
            experts keep `learning_rate`. The router's gradient is second order while the experts' B matrices are still
            near zero, so at one learning rate the routers stay close to uniform (see the README's "Routers that
            learn"); LoRA+ raises B's learning rate for a similar reason. The scheduler scales both rates alike. It
            applies to the optimizer the trainer builds: not with `optimizers=(...)` passed in, nor with a DeepSpeed
            config that defines its own optimizer (both raise).
        router_stats_logging (`str`, *optional*, defaults to `"summary"`):
            Routing metrics logged with the other training metrics (console, TensorBoard, every `report_to`):
            `"summary"` logs `router/aux_loss`, each loss component, `router/entropy`, `router/dead_experts` and
            `router/max_load_imbalance`; `"full"` adds the load of every expert of every layer
            (`router/load/<layer>/<expert>`) and the entropy of every layer; `"none"` logs nothing and disables the
            heatmap and collapse callbacks.
        router_dead_expert_threshold (`float`, *optional*, defaults to `0.01`):
            An expert is dead in a logging window when it receives less than this fraction of the tokens of its layer.
        router_collapse_patience (`int`, *optional*, defaults to `3`):
            Warn when an expert stays dead for this many consecutive logging windows. 0 disables the warning.
        router_load_heatmap (`bool`, *optional*):
            Write a PNG heatmap of the expert load (layers x experts) into each checkpoint and into `output_dir` at the
            end of training. It needs matplotlib (`pip install matplotlib`, part of `moe-peft-plugin[trl]`). `None`
            (the default): write it when matplotlib is installed, otherwise skip it with one warning. `True`: the
            trainer raises `ImportError` at construction without matplotlib. `False`: no heatmap.
    """

    moelora_aux_loss_coef: Optional[float] = field(
        default=None,
        metadata={"help": "Overrides the adapter's aux_loss_coef (load balancing). None keeps the adapter's value."},
    )
    moelora_router_z_loss_coef: Optional[float] = field(
        default=None,
        metadata={"help": "Overrides the adapter's router_z_loss_coef. None keeps the adapter's value."},
    )
    moelora_contrastive_loss_coef: Optional[float] = field(
        default=None,
        metadata={"help": "Overrides the adapter's contrastive_loss_coef. None keeps the adapter's value."},
    )
    moelora_gate_balance_loss_coef: Optional[float] = field(
        default=None,
        metadata={"help": "Overrides the adapter's gate_balance_loss_coef (MoLE). None keeps the adapter's value."},
    )
    moelora_loss_warmup_steps: float = field(
        default=0,
        metadata={
            "help": "Ramp the router-loss coefficients from 0 over this many steps (int >= 1) or this fraction of the "
            "training steps (float in (0, 1)). 0 disables the warm-up."
        },
    )
    moelora_router_lr_ratio: float = field(
        default=1.0,
        metadata={"help": "Learning rate of the routers as a multiple of learning_rate (experts keep learning_rate)."},
    )
    router_stats_logging: str = field(
        default="summary",
        metadata={"help": "Routing metrics to log.", "choices": list(ROUTER_STATS_LOGGING)},
    )
    router_dead_expert_threshold: float = field(
        default=0.01,
        metadata={"help": "An expert receiving less than this fraction of its layer's tokens counts as dead."},
    )
    router_collapse_patience: int = field(
        default=3,
        metadata={"help": "Warn when an expert stays dead for this many logging windows (0 disables)."},
    )
    router_load_heatmap: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Write an expert-load heatmap PNG at each save and at the end of training (needs matplotlib). "
            "None: only when matplotlib is installed (otherwise one warning); True: require it; False: off.",
            # A bare `--router_load_heatmap` means True, as for the other boolean flags.
            "nargs": "?",
            "const": True,
        },
    )

    def __post_init__(self):
        # Validated before `SFTConfig.__post_init__`, which sets up devices and distributed state.
        for name in COEFFICIENT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a float >= 0 or None (keep the adapter's value), got {value!r}.")
            setattr(self, name, float(value))
        warmup = self.moelora_loss_warmup_steps
        if (
            isinstance(warmup, bool)
            or not isinstance(warmup, (int, float))
            or warmup < 0
            or (warmup >= 1 and warmup != int(warmup))
        ):
            raise ValueError(
                "`moelora_loss_warmup_steps` must be 0 (no warm-up), an int >= 1 (steps) or a float in (0, 1) (a "
                f"fraction of the training steps), got {warmup!r}."
            )
        ratio = self.moelora_router_lr_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"`moelora_router_lr_ratio` must be a float > 0 (1.0: the experts' rate), got {ratio!r}.")
        self.moelora_router_lr_ratio = float(ratio)
        if self.router_stats_logging not in ROUTER_STATS_LOGGING:
            raise ValueError(
                f"`router_stats_logging` must be one of {ROUTER_STATS_LOGGING}, got {self.router_stats_logging!r}."
            )
        threshold = self.router_dead_expert_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"`router_dead_expert_threshold` must be a float in [0, 1), got {threshold!r}.")
        patience = self.router_collapse_patience
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"`router_collapse_patience` must be an int >= 0 (0 disables), got {patience!r}.")
        if self.router_load_heatmap not in (None, True, False):
            raise ValueError(
                "`router_load_heatmap` must be None (when matplotlib is installed), True or False, got "
                f"{self.router_load_heatmap!r}."
            )
        super().__post_init__()

    @property
    def moelora_coefficient_overrides(self) -> dict[str, float]:
        """The router-loss coefficients set here, keyed like `MoeLoraConfig` (`{"aux_loss_coef": 0.02, ...}`)."""
        return {
            key: getattr(self, name) for name, key in COEFFICIENT_FIELDS.items() if getattr(self, name) is not None
        }
