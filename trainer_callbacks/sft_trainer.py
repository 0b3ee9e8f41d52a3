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

    It is [`MoeLoraTrainerMixin`] on `SFTTrainer` (see the mixin for what it adds: the router losses in the loss,
    scaled for gradient accumulation and exact in every checkpointing mode; coefficient overrides and warm-up; routing
    metrics; the heatmap and collapse callbacks; the routing in the model card). TRL builds the SFT loss from the
    log-probabilities of its fused LM head and ignores `outputs.loss`, so the mixin adds `outputs.aux_loss` here.

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
