"""`MoeLoraSFTTrainer`: TRL's `SFTTrainer` that adds the MOELORA router losses to the loss and logs the routing."""

from __future__ import annotations

from trl import SFTTrainer

from .config import MoeLoraSFTConfig
from .mixin import MoeLoraTrainerMixin


class MoeLoraSFTTrainer(MoeLoraTrainerMixin, SFTTrainer):
    """
    [`~trl.SFTTrainer`] for MOELORA adapters (MoELoRA, MoLA, MoLE): adds the router losses to the loss and logs the
    routing. Everything `SFTTrainer` accepts keeps working: arguments, dataset formats, packing, evaluation, callbacks;
    `peft_config` may be a [`~moe_peft_plugin.MoeLoraConfig`], and `model` may be already wrapped with one. For any
    other model it behaves exactly like `SFTTrainer`.

    It is [`MoeLoraTrainerMixin`] on `SFTTrainer`; what the mixin adds for a MOELORA model:

    - **Router losses in the loss.** TRL builds the SFT loss from the log-probabilities of its fused LM head and ignores
      `outputs.loss`, so the router losses (`outputs.aux_loss`, the weighted sum of every layer's losses) are added
      here, scaled for gradient accumulation exactly as TRL scales the LM loss and its own MoE loss: a per-micro-batch
      mean, divided by the number of accumulated micro-batches when the LM loss is normalised by the token count of the
      whole step. They are added to the evaluation loss too. Because `outputs.aux_loss` carries MOELORA's gradient
      anchor, the router gradient is the same with no gradient checkpointing, non-reentrant, selective and reentrant
      checkpointing (which TRL forces for PEFT + ZeRO-3). If the loss forward returns no `aux_loss`, or the backward
      pass never reaches it, training stops with an error instead of silently training the routers without their
      losses.
    - **Coefficients** from the adapter config, overridden by `MoeLoraSFTConfig.moelora_*_coef`, with an optional
      warm-up (`moelora_loss_warmup_steps`, [`RouterLossWarmupCallback`]).
    - **Metrics** through the normal `log()` (console, TensorBoard, every `report_to`), for training and evaluation
      (`eval_` prefix): `router/aux_loss`, each unweighted component averaged over layers (`router/load_balancing`,
      `router/router_z`, `router/contrastive`, `router/gate_balance`), `router/entropy`, `router/dead_experts`,
      `router/max_load_imbalance`, and with `router_stats_logging="full"` `router/load/<layer>/<expert>`.
    - **Callbacks**: [`RouterLoadHeatmapCallback`] (PNG per checkpoint and at the end; by default only when matplotlib
      is installed, see `router_load_heatmap`) and [`RoutingCollapseCallback`] (warns when experts stop receiving
      tokens).

    Example:

        ```py
        >>> import moe_peft_plugin  # registers MOELORA with peft
        >>> from moe_peft_plugin import MoeLoraConfig
        >>> from trainer_callbacks import MoeLoraSFTConfig, MoeLoraSFTTrainer

        >>> trainer = MoeLoraSFTTrainer(
        ...     model="HuggingFaceTB/SmolLM2-135M-Instruct",
        ...     args=MoeLoraSFTConfig(output_dir="out", moelora_aux_loss_coef=0.01, moelora_loss_warmup_steps=100),
        ...     train_dataset=dataset,
        ...     peft_config=MoeLoraConfig(num_experts=8, top_k=2, target_modules="all-linear", task_type="CAUSAL_LM"),
        ... )
        >>> trainer.train()
        ```
    """

    _tag_names = ["trl", "sft", "moelora"]
    _name = "MoELoRA SFT"

    def __init__(self, model, args=None, *rest, **kwargs):
        # Without `args`, a `MoeLoraSFTConfig` (SFTTrainer would make an `SFTConfig` named `<model>-SFT`).
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None) or "model"
            args = MoeLoraSFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-MoeLoraSFT")
        super().__init__(model, args, *rest, **kwargs)
