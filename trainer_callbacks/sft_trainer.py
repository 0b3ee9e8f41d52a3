"""`MoeLoraSFTTrainer`: TRL's `SFTTrainer` that adds the MOELORA router losses to the loss and logs the routing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import torch
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from moe_peft_plugin import MoeLoraConfig, MoeLoraLayer, MoeLoraModel

from .callbacks import (
    MoeLoraTrainerCallback,
    RouterLoadHeatmapCallback,
    RouterLossWarmupCallback,
    RoutingCollapseCallback,
    matplotlib_available,
)
from .coefficients import RouterLossCoefficients
from .config import COEFFICIENT_FIELDS, MoeLoraSFTConfig
from .model_card import update_trainer_model_card
from .stats import RouterStatsTracker


logger = logging.get_logger(__name__)

# Defaults of the MOELORA options, for `args` that are a plain `SFTConfig` / `TrainingArguments`.
_OPTION_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(MoeLoraSFTConfig)
    if f.name not in {g.name for g in dataclasses.fields(SFTConfig)}
}


def _option(args: TrainingArguments, name: str) -> Any:
    return getattr(args, name, _OPTION_DEFAULTS[name])


class _LossForwardCapture:
    """Forward hook on the adapted model that keeps `aux_loss` and the routing of the loss forward.

    TRL's `compute_loss` may run more forwards than the one its loss comes from: a no-grad forward for the metrics
    (label smoothing, `compute_loss_func`) and one for the logits (`return_outputs=True`). The loss forward is always
    the first one of the call, so only that one is kept: nothing is counted twice.
    """

    def __init__(self, tuner: Optional[MoeLoraModel]) -> None:
        self.tuner = tuner
        self.active = False
        self.seen = False
        self.aux_loss: Optional[torch.Tensor] = None
        self.stats: Optional[dict] = None
        self.collect_stats = False

    def start(self, collect_stats: bool) -> None:
        self.active, self.seen, self.aux_loss, self.stats = True, False, None, None
        self.collect_stats = collect_stats and self.tuner is not None

    def stop(self) -> tuple[Optional[torch.Tensor], Optional[dict]]:
        result = (self.aux_loss, self.stats)
        self.active, self.aux_loss, self.stats = False, None, None
        return result

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> None:
        if not self.active or self.seen:
            return
        self.seen = True
        if isinstance(outputs, Mapping):
            self.aux_loss = outputs.get("aux_loss")
        if self.collect_stats:
            self.stats = self.tuner.get_routing_stats()


class _GradientProbe:
    """Records whether the backward pass reached a tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.reached = False
        tensor.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> None:
        self.reached = True


class MoeLoraSFTTrainer(SFTTrainer):
    """
    [`~trl.SFTTrainer`] for MOELORA adapters (MoELoRA, MoLA, MoLE): adds the router losses to the loss and logs the
    routing. Everything `SFTTrainer` accepts keeps working: arguments, dataset formats, packing, evaluation, callbacks;
    `peft_config` may be a [`~moe_peft_plugin.MoeLoraConfig`], and `model` may be already wrapped with one. For any
    other model it behaves exactly like `SFTTrainer`.

    What it adds for a MOELORA model:

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

    def __init__(
        self,
        model: Union[str, PreTrainedModel, PeftModel],
        args: Optional[Union[MoeLoraSFTConfig, SFTConfig, TrainingArguments]] = None,
        data_collator: Optional[Callable] = None,
        train_dataset: Optional[Union[Dataset, IterableDataset]] = None,
        eval_dataset: Optional[Union[Dataset, IterableDataset, dict]] = None,
        processing_class: Optional[PreTrainedTokenizerBase] = None,
        compute_loss_func: Optional[Callable] = None,
        compute_metrics: Optional[Callable] = None,
        callbacks: Optional[list[TrainerCallback]] = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: Optional[tuple] = None,
        preprocess_logits_for_metrics: Optional[Callable] = None,
        quantization_config: Optional[Any] = None,
        peft_config: Optional[PeftConfig] = None,
        formatting_func: Optional[Callable] = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None) or "model"
            args = MoeLoraSFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-MoeLoraSFT")
        moelora = isinstance(peft_config, MoeLoraConfig) or (
            isinstance(model, nn.Module) and any(isinstance(m, MoeLoraLayer) for m in model.modules())
        )
        if moelora and getattr(args, "router_aux_loss_coef", None):
            raise ValueError(
                f"`router_aux_loss_coef` ({args.router_aux_loss_coef}) is TRL's weight for the routers of a "
                "Mixture-of-Experts *base* model, not for MOELORA's routers. Use `moelora_aux_loss_coef` (or the "
                "adapter's `aux_loss_coef`) instead."
            )
        self.router_loss_coefficients: Optional[RouterLossCoefficients] = None
        self.router_stats: Optional[RouterStatsTracker] = None
        self._capture: Optional[_LossForwardCapture] = None
        self._gradient_probe: Optional[_GradientProbe] = None
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        self._setup_router_losses(args)

    def _setup_router_losses(self, args: TrainingArguments) -> None:
        overrides = {
            key: getattr(args, name)
            for name, key in COEFFICIENT_FIELDS.items()
            if getattr(args, name, None) is not None
        }
        # Raises if coefficients are set for a model without MOELORA adapter.
        coefficients = RouterLossCoefficients(self.model, overrides)
        if not coefficients.layers:  # not a MOELORA model: exactly an SFTTrainer
            self._bind_callbacks()
            return
        if self.aux_loss_enabled:
            raise ValueError(
                "The base model is a Mixture-of-Experts model and TRL adds its own router loss, weighted by "
                f"`router_aux_loss_coef` ({self.router_aux_loss_coef}), to `outputs.aux_loss`, which also holds the "
                "MOELORA router losses: they would be weighted twice. Set `router_aux_loss_coef=0.0` (the base "
                "model's routers are frozen under PEFT)."
            )
        self.router_loss_coefficients = coefficients
        self._routers_trainable = any(
            p.requires_grad for n, p in self.model.named_parameters() if "moelora_router" in n
        )

        unwrapped = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        tuner = self.model.base_model if isinstance(self.model, PeftModel) else None
        tuner = tuner if isinstance(tuner, MoeLoraModel) else None
        stats_logging = _option(args, "router_stats_logging")
        if stats_logging != "none":
            self.router_stats = RouterStatsTracker(
                dead_expert_threshold=_option(args, "router_dead_expert_threshold"), per_layer=stats_logging == "full"
            )
            if tuner is None:
                logger.warning(
                    "The model is not a `PeftModel` with a MOELORA adapter (e.g. `inject_adapter_in_model`): only "
                    "`router/aux_loss` is logged, no per-layer routing statistics."
                )
        self._capture = _LossForwardCapture(tuner)
        # Registered after MOELORA's own hooks on the same module, so `outputs.aux_loss` is complete when it runs.
        self._capture_handle = unwrapped.register_forward_hook(self._capture, with_kwargs=True)

        warmup = _option(args, "moelora_loss_warmup_steps")
        if warmup and not self._has_callback(RouterLossWarmupCallback):
            self.add_callback(RouterLossWarmupCallback(warmup))
        if self.router_stats is not None:
            patience = _option(args, "router_collapse_patience")
            if patience and not self._has_callback(RoutingCollapseCallback):
                self.add_callback(RoutingCollapseCallback(patience))
            heatmap = _option(args, "router_load_heatmap")  # None: only if matplotlib is installed
            if heatmap is not False and not self._has_callback(RouterLoadHeatmapCallback):
                if heatmap is None and not matplotlib_available():
                    # A default must not break training: skip the picture, say once how to get it.
                    logger.warning(
                        "The expert-load heatmap (`router_load_heatmap`) is skipped because matplotlib is not "
                        "installed: `pip install matplotlib` (or `pip install moe-peft-plugin[trl]`) to get it, or set "
                        "`router_load_heatmap=False` to silence this warning."
                    )
                else:
                    self.add_callback(RouterLoadHeatmapCallback())  # raises ImportError if asked for without it
        elif self._has_callback(RoutingCollapseCallback) or self._has_callback(RouterLoadHeatmapCallback):
            logger.warning(
                "`router_stats_logging='none'` collects no routing statistics: the collapse and heatmap callbacks "
                "will do nothing."
            )
        self._bind_callbacks()

    def _has_callback(self, cls: type) -> bool:
        return any(isinstance(callback, cls) for callback in self.callback_handler.callbacks)

    def _bind_callbacks(self) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, MoeLoraTrainerCallback):
                callback.bind(self)

    def add_callback(self, callback: Union[type[TrainerCallback], TrainerCallback]) -> None:
        super().add_callback(callback)
        self._bind_callbacks()

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # peft wrote the adapter's model card; add the routing of the run to its MOELORA section.
        update_trainer_model_card(self, output_dir or self.args.output_dir)

    def create_model_card(self, *args, **kwargs) -> None:
        super().create_model_card(*args, **kwargs)  # TRL writes its card from scratch (checkpoints, `push_to_hub`)
        update_trainer_model_card(self, self.args.output_dir)

    def _aux_loss_divisor(self, num_items_in_batch: Any) -> int:
        """The factor `Trainer.training_step` would divide an unscaled loss by (mirrors its rule exactly)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        # `Trainer` divides an unscaled loss itself; TRL normalises the LM loss of a scaled one by the token count of
        # the whole step, so a per-micro-batch mean must be divided by the number of micro-batches of the step.
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return steps if scaled else 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._capture is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        mode = "train" if self.model.training else "eval"
        self._capture.start(collect_stats=self.router_stats is not None)
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            aux_loss, stats = self._capture.stop()
        loss, outputs = result if return_outputs else (result, None)

        if self.router_loss_coefficients.any_active():
            if aux_loss is None:
                raise RuntimeError(
                    "The model has MOELORA adapters with non-zero router-loss coefficients, but its forward returned no "
                    "`aux_loss`, so the routers would train without their losses. The model must be called through "
                    "the MOELORA tuner (e.g. a `PeftModel` from `get_peft_model`) and must return a `ModelOutput`."
                )
            training = mode == "train" and torch.is_grad_enabled()
            if training and self._routers_trainable and not aux_loss.requires_grad:
                raise RuntimeError(
                    "The router losses of this step have no gradient (`outputs.aux_loss.requires_grad` is False) "
                    "although the routers are trainable: the routers would train without their losses."
                )
            divisor = self._aux_loss_divisor(num_items_in_batch) if mode == "train" else 1
            loss = loss + aux_loss / divisor
            if training and aux_loss.requires_grad:
                self._gradient_probe = _GradientProbe(aux_loss)
        if self.router_stats is not None:
            self.router_stats.add(mode, stats or {}, aux_loss)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, *args, **kwargs):
        self._gradient_probe = None
        loss = super().training_step(*args, **kwargs)
        probe, self._gradient_probe = self._gradient_probe, None
        if probe is not None and not probe.reached:
            raise RuntimeError(
                "The router losses were added to the loss, but the backward pass did not reach them: the routers "
                "would train without their losses. Does a subclass replace the loss returned by `compute_loss`?"
            )
        return loss

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if self.router_stats is not None:
            mode = "train" if self.model.training else "eval"
            reduce = None
            if self.accelerator.num_processes > 1:
                reduce = lambda tensor: self.accelerator.reduce(tensor, reduction="sum")  # noqa: E731
            window = self.router_stats.flush(mode, reduce=reduce)
            if window is not None:
                metrics = window.metrics(
                    self.router_stats.dead_expert_threshold, per_layer=self.router_stats.per_layer
                )
                for key, value in metrics.items():
                    self._metrics[mode][key] = [value]
                if mode == "train" and _option(self.args, "moelora_loss_warmup_steps"):
                    self._metrics[mode]["router/loss_scale"] = [self.router_loss_coefficients.scale]
        super().log(logs, start_time)
