"""`MoeLoraTrainerMixin`: the MOELORA router losses, routing statistics and callbacks for any `Trainer`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging
from trl import SFTConfig

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


class MoeLoraTrainerMixin:
    """
    Mixin for a transformers [`~transformers.Trainer`] (or a TRL trainer built on it) that trains MOELORA adapters
    (MoELoRA, MoLA, MoLE) right: it puts the router losses into the loss exactly once, logs the routing and binds the
    MOELORA callbacks. Put it first among the bases; the constructor takes the trainer's own arguments unchanged:

        ```py
        >>> from transformers import Trainer
        >>> from trl import DPOTrainer
        >>> from trainer_callbacks import MoeLoraTrainerMixin

        >>> class MoeLoraTrainer(MoeLoraTrainerMixin, Trainer): ...
        >>> class MoeLoraDPOTrainer(MoeLoraTrainerMixin, DPOTrainer): ...
        ```

    [`MoeLoraSFTTrainer`] is `MoeLoraTrainerMixin` + TRL's `SFTTrainer`. For a model without MOELORA adapter the
    trainer behaves exactly like its parent. The MOELORA options (`moelora_*_coef`, `moelora_loss_warmup_steps`,
    `router_stats_logging`, ...) are read from `args` when it has them (e.g. [`MoeLoraSFTConfig`]); any other
    `TrainingArguments` gets their defaults.

    What it adds for a MOELORA model:

    - **Router losses in the loss, once.** The MOELORA tuner adds the router losses (`outputs.aux_loss`) to
      `outputs.loss`. Whether the parent's loss already holds them is decided by which `compute_loss` the mixin calls
      (the next one after the mixin in the method resolution order), unless the class attribute
      `model_loss_includes_aux_loss` says it (`True`/`False`; `None`, the default, decides):

      - `transformers.Trainer.compute_loss` with neither `compute_loss_func` nor label smoothing returns
        `outputs.loss`: the router losses are already in it and are not added again. Their scaling is corrected
        instead: the `Trainer` scales `outputs.loss` for the language-model loss (normalised by the token count of the
        whole optimizer step across processes), which counts a per-micro-batch router loss N × k times (N processes
        with `average_tokens_across_devices`, k accumulation steps). The mixin subtracts the surplus, so the router
        losses count as a mean over micro-batches and processes, like in one process without accumulation.
      - Any other `compute_loss` (TRL's `SFTTrainer`, which builds the loss from its fused LM head; `DPOTrainer` and
        `GRPOTrainer`, which build their own losses; `Trainer` with `compute_loss_func` or label smoothing) is taken
        to build its loss without `outputs.aux_loss`: the router losses are added, scaled for gradient accumulation as
        `Trainer.training_step` scales the loss (`loss_is_scaled_for_ga`): a per-micro-batch mean, divided by the
        number of accumulated micro-batches when the loss is already normalised over the whole step. They are added
        to the evaluation loss too.

      Verified by the tests: `Trainer` (router gradient equal to a plain loop on `outputs.loss`, with and without
      gradient accumulation, and with `compute_loss_func`; one process: the factor N mirrors `Trainer.compute_loss`
      but is not run under DDP) and `SFTTrainer` (every option of [`MoeLoraSFTTrainer`]; not its DeepSpeed Ulysses
      sequence-parallel path, which returns `outputs.loss` through `Trainer.compute_loss`).
      Not verified: `DPOTrainer` and `GRPOTrainer`. The rule adds the router losses of the *first* forward of each
      `compute_loss` call (in TRL 1.16, DPO's policy forward on chosen + rejected, which comes before its reference
      forward; a GRPO `compute_loss` per micro-batch), and
      GRPO sets `loss_is_scaled_for_ga=True`, so they are divided by the accumulation steps. A trainer whose
      `compute_loss` runs several loss forwards, or returns `outputs.loss` from an override, should set
      `model_loss_includes_aux_loss` or check its gradient against a plain loop first.

      Because `outputs.aux_loss` carries MOELORA's gradient anchor, the router gradient is the same with no gradient
      checkpointing, non-reentrant, selective and reentrant checkpointing (which TRL forces for PEFT + ZeRO-3). If the
      loss forward returns no `aux_loss`, or the backward pass never reaches it, training stops with an error instead
      of silently training the routers without their losses.
    - **Coefficients** from the adapter config, overridden by `args.moelora_*_coef`, with an optional warm-up
      (`moelora_loss_warmup_steps`, [`RouterLossWarmupCallback`]).
    - **Metrics** through the normal `log()` (console, TensorBoard, every `report_to`), for training and evaluation
      (`eval_` prefix): `router/aux_loss`, each unweighted component averaged over layers (`router/load_balancing`,
      `router/router_z`, `router/contrastive`, `router/gate_balance`), `router/entropy`, `router/dead_experts`,
      `router/max_load_imbalance`, and with `router_stats_logging="full"` `router/load/<layer>/<expert>`.
    - **Callbacks**: [`RouterLoadHeatmapCallback`] (PNG per checkpoint and at the end; by default only when matplotlib
      is installed, see `router_load_heatmap`) and [`RoutingCollapseCallback`] (warns when experts stop receiving
      tokens); every [`MoeLoraTrainerCallback`] is bound to the trainer.
    - **Model card**: the routing of the run in the MOELORA section of the adapter's card.
    """

    # Whether the loss of the parent's `compute_loss` already includes `outputs.aux_loss`; `None` decides (see above).
    model_loss_includes_aux_loss: Optional[bool] = None

    def __init__(self, *args, **kwargs):
        # Before the parent, whose own check (e.g. TRL's "not a Mixture-of-Experts model") would hide this one.
        training_args = next((a for a in (kwargs.get("args"), *args) if isinstance(a, TrainingArguments)), None)
        model, peft_config = kwargs.get("model", args[0] if args else None), kwargs.get("peft_config")
        moelora = isinstance(peft_config, MoeLoraConfig) or (
            isinstance(model, nn.Module) and any(isinstance(m, MoeLoraLayer) for m in model.modules())
        )
        if moelora and getattr(training_args, "router_aux_loss_coef", None):
            raise ValueError(
                f"`router_aux_loss_coef` ({training_args.router_aux_loss_coef}) is TRL's weight for the routers of a "
                "Mixture-of-Experts *base* model, not for MOELORA's routers. Use `moelora_aux_loss_coef` (or the "
                "adapter's `aux_loss_coef`) instead."
            )
        self.router_loss_coefficients: Optional[RouterLossCoefficients] = None
        self.router_stats: Optional[RouterStatsTracker] = None
        self._capture: Optional[_LossForwardCapture] = None
        self._gradient_probe: Optional[_GradientProbe] = None
        self._pending_routing_metrics: dict[str, float] = {}
        super().__init__(*args, **kwargs)
        self._setup_router_losses(self.args)

    def _setup_router_losses(self, args: TrainingArguments) -> None:
        overrides = {
            key: getattr(args, name)
            for name, key in COEFFICIENT_FIELDS.items()
            if getattr(args, name, None) is not None
        }
        # Raises if coefficients are set for a model without MOELORA adapter.
        coefficients = RouterLossCoefficients(self.model, overrides)
        if not coefficients.layers:  # not a MOELORA model: exactly the parent trainer
            self._bind_callbacks()
            return
        if getattr(self, "aux_loss_enabled", False):  # TRL's trainers: the base model's own router loss
            raise ValueError(
                "The base model is a Mixture-of-Experts model and TRL adds its own router loss, weighted by "
                f"`router_aux_loss_coef` ({self.router_aux_loss_coef}), to `outputs.aux_loss`, which also holds the "
                "MOELORA router losses: they would be weighted twice. Set `router_aux_loss_coef=0.0` (the base "
                "model's routers are frozen under PEFT)."
            )
        self.router_loss_coefficients = coefficients
        self._check_router_lr_ratio(args)
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

    def _check_router_lr_ratio(self, args: TrainingArguments) -> None:
        """Refuse a router learning-rate ratio that the optimizer would not get (instead of ignoring it)."""
        if _option(args, "moelora_router_lr_ratio") == 1.0:
            return
        if self.optimizer is not None:
            raise ValueError(
                "`moelora_router_lr_ratio` applies to the optimizer the trainer builds, but `optimizers=(...)` passed "
                "one: give the routers their own param group in it, or leave `moelora_router_lr_ratio` at 1.0."
            )
        deepspeed_plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if deepspeed_plugin is not None and "optimizer" in deepspeed_plugin.deepspeed_config:
            raise ValueError(
                "`moelora_router_lr_ratio` applies to the optimizer the trainer builds, but the DeepSpeed config "
                "defines its own `optimizer`: remove that section (the trainer's optimizer then runs under DeepSpeed) "
                "or leave `moelora_router_lr_ratio` at 1.0."
            )

    def create_optimizer(self, *args, **kwargs):
        """The parent's optimizer, with the routers moved to param groups at `moelora_router_lr_ratio` x the rate.

        Each param group of the parent is split in two with the same settings (weight decay, betas, ...), so the
        routers keep everything but the learning rate; the scheduler, created afterwards, scales every group alike.
        """
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        ratio = _option(self.args, "moelora_router_lr_ratio")
        if not fresh or ratio == 1.0 or self.router_loss_coefficients is None:
            return optimizer
        router_ids = {
            id(parameter)
            for layer in self.router_loss_coefficients.layers
            for name in ("moelora_router", "moelora_log_temperature")
            for parameter in getattr(layer, name).values()
        }
        router_groups = []
        for group in optimizer.param_groups:
            routers = [p for p in group["params"] if id(p) in router_ids]
            if routers:
                group["params"] = [p for p in group["params"] if id(p) not in router_ids]
                settings = {key: value for key, value in group.items() if key != "params"}
                router_groups.append({**settings, "params": routers, "lr": group["lr"] * ratio})
        if not router_groups:
            raise ValueError(
                f"`moelora_router_lr_ratio` is {ratio}, but the optimizer holds no router parameter (are the routers "
                "frozen, or does this optimizer build its own parameter groups?)."
            )
        for group in router_groups:
            optimizer.add_param_group(group)
        return optimizer

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

    def _parent_loss_includes_aux_loss(self) -> bool:
        """Whether the loss of the parent's `compute_loss` is `outputs.loss`, which includes `outputs.aux_loss`."""
        if self.model_loss_includes_aux_loss is not None:
            return self.model_loss_includes_aux_loss
        mro = type(self).__mro__
        parent = next(cls for cls in mro[mro.index(MoeLoraTrainerMixin) + 1 :] if "compute_loss" in vars(cls))
        # `Trainer.compute_loss` computes the loss from the logits itself with `compute_loss_func` or label smoothing.
        return parent is Trainer and self.compute_loss_func is None and self.label_smoother is None

    def _aux_loss_divisor(self, num_items_in_batch: Any) -> int:
        """The factor `Trainer.training_step` would divide an unscaled loss by (mirrors its rule exactly)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        # `Trainer` divides an unscaled loss itself; a scaled loss is normalised by the token count of the whole step,
        # so a per-micro-batch mean must be divided by the number of micro-batches of the step.
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return steps if scaled else 1

    def _model_loss_scale(self, num_items_in_batch: Any) -> int:
        """The factor `Trainer.compute_loss` multiplies `outputs.loss` by (mirrors its rule exactly)."""
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

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
            if not self._parent_loss_includes_aux_loss():
                loss = loss + aux_loss / divisor
            elif mode == "train":
                # The loss holds `scale * aux_loss`; keep `aux_loss / divisor` of it (see the class docstring).
                surplus = self._model_loss_scale(num_items_in_batch) - 1 / divisor
                if surplus:
                    loss = loss - surplus * aux_loss
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

    def report_routing_metrics(self, metrics: Mapping[str, float]) -> None:
        """Add training metrics measured outside the training forwards (e.g. by [`TaskSpecialisationCallback`]) to the
        next training log, with the routing metrics."""
        self._pending_routing_metrics.update(metrics)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if self.router_stats is not None or self._pending_routing_metrics:
            mode = "train" if self.model.training else "eval"
            reduce = None
            if self.accelerator.num_processes > 1:
                reduce = lambda tensor: self.accelerator.reduce(tensor, reduction="sum")  # noqa: E731
            window = None if self.router_stats is None else self.router_stats.flush(mode, reduce=reduce)
            metrics = {}
            if window is not None:
                metrics = window.metrics(
                    self.router_stats.dead_expert_threshold, per_layer=self.router_stats.per_layer
                )
                if mode == "train" and _option(self.args, "moelora_loss_warmup_steps"):
                    metrics["router/loss_scale"] = self.router_loss_coefficients.scale
            if mode == "train" and self._pending_routing_metrics:
                metrics.update(self._pending_routing_metrics)
                self._pending_routing_metrics.clear()
            if metrics:
                store = getattr(self, "_metrics", None)  # TRL's trainers average `_metrics[mode]` into the logs
                if isinstance(store, Mapping) and mode in store:
                    for key, value in metrics.items():
                        store[mode][key] = [value]
                else:
                    prefix = "eval_" if mode == "eval" else ""
                    logs = {**logs, **{prefix + key: value for key, value in metrics.items()}}
        super().log(logs, start_time)
