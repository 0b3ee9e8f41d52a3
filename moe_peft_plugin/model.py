"""The MOELORA tuner: creates MOELORA layers in a model and turns their router losses into `outputs.aux_loss`."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput

from .config import MoeLoraConfig, expand_per_layer
from .constants import PREFIX
from .layer import MERGE_ERROR_MESSAGE, Linear, MoeLoraLayer, MoeLoraMergeError
from .mole import LoraExperts, load_lora_experts
from .outputs import with_aux_loss_field
from .state import ForwardContext, ReplayInContext, RoutingState, build_aux_loss


# Expected number of dimensions of each adapter tensor in a state dict; anything else (notably the empty (0,) tensors
# of ZeRO-3 partitions that were not gathered) means the checkpoint would be unusable.
_ADAPTER_TENSOR_DIMS = {"moelora_A": 3, "moelora_B": 3, "moelora_router": 2, "moelora_log_temperature": 1}


@dataclass
class RoutingStats:
    """Routing of one adapter in one layer during the last forward (tensors are detached, on the model's device)."""

    expert_load: torch.Tensor  # (num_experts,), fraction of routing decisions per expert (sums to 1)
    entropy: torch.Tensor  # (), mean entropy of the router distribution, in nats
    losses: dict[str, torch.Tensor]  # unweighted router loss components
    weighted_loss: torch.Tensor  # (), this layer's weighted router loss (`outputs.aux_loss` is their mean)


def _get_tuner_layer_class(target_base_layer: nn.Module) -> Optional[type[MoeLoraLayer]]:
    if isinstance(target_base_layer, (nn.Linear, Conv1D)):
        return Linear
    backend = resolve_quantization_backend(target_base_layer)
    if backend is not None and backend.layer_type == "linear":
        return Linear
    return None


def _layer_index(key: str, layers_pattern: Union[str, list[str], None]) -> Optional[int]:
    """Index of the decoder layer that module `key` belongs to (same rules as peft's `layers_to_transform`)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _device_of(outputs: Any, context: ForwardContext) -> torch.device:
    if context.records:
        return context.records[0].weighted_loss.device
    values = outputs.values() if isinstance(outputs, dict) else [outputs]
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _num_layers(model_config: dict) -> Optional[int]:
    for config in (model_config, model_config.get("text_config") or {}):
        for name in ("num_hidden_layers", "num_layers", "n_layer"):
            if isinstance(config.get(name), int):
                return config[name]
    return None


class MoeLoraModel(BaseTuner):
    """
    Mixture of LoRA experts (MoELoRA, MoLA, MoLE) from a pretrained model, as a peft tuner.

    Every targeted linear layer gets `num_experts` LoRA experts and a router. The forward output of the model carries
    `aux_loss` (the weighted router losses of that forward) and, when the model computes a loss, `outputs.loss`
    includes it, so a plain training loop trains the routers. The gradient of the router losses reaches the routers
    identically with no gradient checkpointing, non-reentrant and reentrant checkpointing (see `state.py`).

    Args:
        model ([`~transformers.PreTrainedModel`]): The model to be adapted.
        config ([`MoeLoraConfig`]): The configuration of the MOELORA adapter.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.
        low_cpu_mem_usage (`bool`, *optional*, defaults to `False`): Create empty adapter weights on the meta device.

    Example:

        ```py
        >>> import moe_peft_plugin  # registers MOELORA with peft
        >>> from peft import get_peft_model
        >>> from moe_peft_plugin import MoeLoraConfig

        >>> config = MoeLoraConfig(r=8, num_experts=8, top_k=2, target_modules="all-linear", task_type="CAUSAL_LM")
        >>> model = get_peft_model(base_model, config)
        >>> outputs = model(**batch, labels=batch["input_ids"])  # outputs.loss includes outputs.aux_loss
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = MoeLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: MoeLoraConfig, adapter_name: str) -> None:
        # Plain python objects on a Module must be set after nn.Module.__init__, which has run at this point.
        self.__dict__.setdefault("_routing_state", RoutingState())
        self.__dict__.setdefault("_pending_experts", {})
        self.__dict__.setdefault("_last_records", [])
        self.__dict__.setdefault("_last_aux_loss", None)
        if "_routing_hooks" not in self.__dict__:
            self._register_routing_hooks(model)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # peft upcasts bf16/fp16 adapter tensors to float32 by re-assigning them into their `ParameterDict`, which wraps
        # each one in a new `nn.Parameter` with `requires_grad=True`: frozen experts (MoLE) would silently train.
        requires_grad = {name: param.requires_grad for name, param in self.model.named_parameters()}
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for name, param in self.model.named_parameters():
            if requires_grad.get(name, param.requires_grad) != param.requires_grad:
                param.requires_grad_(requires_grad[name])

    def _prepare_adapter_config(self, peft_config: MoeLoraConfig, model_config: dict) -> MoeLoraConfig:
        if peft_config.expert_adapters:
            experts = load_lora_experts(self.model, peft_config.expert_adapters)
            self._pending_experts[id(peft_config)] = experts
            # The experts keep their own LoRA scaling (folded into B), so the layer scaling must be 1.
            peft_config.r = experts.rank
            peft_config.lora_alpha = experts.rank
            peft_config.use_rslora = False
            peft_config.expert_names = experts.names
            peft_config.target_modules = sorted(experts.weights)
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if isinstance(peft_config.num_experts, list) or isinstance(peft_config.top_k, list):
            num_layers = _num_layers(model_config)
            if num_layers is None:
                raise ValueError(
                    "`num_experts`/`top_k` are per-layer lists, but the number of layers of this model is unknown "
                    "(no `num_hidden_layers` in its config); pass ints instead."
                )
            experts_per_layer = expand_per_layer("num_experts", peft_config.num_experts, num_layers)
            top_k_per_layer = expand_per_layer("top_k", peft_config.top_k, num_layers)
            for index, (num_experts, top_k) in enumerate(zip(experts_per_layer, top_k_per_layer)):
                if peft_config.router_type == "topk" and top_k > num_experts:
                    raise ValueError(
                        f"`top_k` ({top_k}) is larger than `num_experts` ({num_experts}) for layer {index}."
                    )
        return peft_config

    def _experts_for_module(self, config: MoeLoraConfig, key: str) -> tuple[int, int]:
        """`(num_experts, top_k)` of the module `key` (MoLA lists resolved by layer index)."""
        num_experts, top_k = config.num_experts, config.top_k
        if isinstance(num_experts, int) and isinstance(top_k, int):
            return num_experts, min(top_k, num_experts)
        index = _layer_index(key, config.layers_pattern)
        if index is None:
            raise ValueError(
                f"`num_experts`/`top_k` are per-layer lists, but the module {key!r} is not inside a numbered layer; "
                "set `layers_pattern` or restrict `target_modules` to the decoder layers."
            )
        num_layers = _num_layers(self.get_model_config(self.model))
        num_experts = expand_per_layer("num_experts", num_experts, num_layers)[index]
        top_k = expand_per_layer("top_k", top_k, num_layers)[index]
        return num_experts, min(top_k, num_experts)

    def _create_and_replace(
        self,
        moelora_config: MoeLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        num_experts, top_k = self._experts_for_module(moelora_config, current_key)
        experts = None
        pending: Optional[LoraExperts] = self._pending_experts.get(id(moelora_config))
        if pending is not None:
            experts = pending.weights[current_key]

        if isinstance(target, MoeLoraLayer):
            target.update_layer(
                adapter_name,
                moelora_config,
                num_experts=num_experts,
                top_k=top_k,
                experts=experts,
                inference_mode=moelora_config.inference_mode,
            )
            return
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_cls = _get_tuner_layer_class(base_layer)
        if layer_cls is None:
            raise TypeError(
                f"Target module {current_key} ({type(base_layer).__name__}) is not supported by MOELORA. Supported: "
                "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D` and quantized linear layers."
            )
        new_module = layer_cls(
            target,
            adapter_name,
            moelora_config,
            num_experts=num_experts,
            top_k=top_k,
            experts=experts,
            **get_quantization_kwargs(self),
        )
        new_module._routing_state = self._routing_state
        if adapter_name not in self.active_adapters:
            # adding an additional adapter: it is not automatically trainable
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._pending_experts.pop(id(self.peft_config.get(adapter_name)), None)

    # The routing context is opened by hooks on the wrapped model rather than in `forward`, because several entry points
    # call the wrapped model directly: `PeftModel.forward` without a task type, `generate`, `inject_adapter_in_model`.
    def _register_routing_hooks(self, model: nn.Module) -> None:
        self._routing_hooks = [
            model.register_forward_pre_hook(self._open_routing_context, with_kwargs=True),
            model.register_forward_hook(self._close_routing_context, with_kwargs=True, always_call=True),
        ]

    def _open_routing_context(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state: RoutingState = self._routing_state
        # transformers < 5.24 passes the KV cache as `past_key_values`, later versions as `cache`.
        kv_cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if state.active is None and kv_cache is not None and not torch.is_grad_enabled():
            return  # cached decoding (`generate`): the layers only route; no router losses or statistics
        context = ForwardContext(attention_mask=kwargs.get("attention_mask"), parent=state.active, state=state)
        if torch.is_grad_enabled() and module.training:
            self._replay_checkpoints_in_context(module)
        state.open_forward(context)

    def _replay_checkpoints_in_context(self, model: nn.Module) -> None:
        """Make blocks recomputed by transformers' gradient checkpointing run in the context of their own forward.

        Done at every training forward, because checkpointing can be enabled (or re-enabled, which replaces the
        function) after the adapter was created, as the Trainer does.
        """
        for module in model.modules():
            function = module.__dict__.get("_gradient_checkpointing_func")
            if function is not None and not isinstance(function, ReplayInContext):
                module._gradient_checkpointing_func = ReplayInContext(function, self._routing_state)

    def _close_routing_context(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        state: RoutingState = self._routing_state
        context = state.active
        if context is None:  # the pre-hook did not run (e.g. an exception before it)
            return outputs
        state.active = context.parent
        if context.parent is not None:
            return outputs
        self._last_records = context.records
        if not isinstance(outputs, dict):
            # Plain modules return tensors: keep the loss for `aux_loss` (see there).
            self._last_aux_loss = build_aux_loss(context, _device_of(outputs, context))
            return outputs
        self._last_aux_loss = None
        aux_loss = build_aux_loss(context, _device_of(outputs, context))
        if outputs.get("aux_loss") is not None:
            aux_loss = outputs["aux_loss"] + aux_loss
        if isinstance(outputs, ModelOutput):
            outputs = with_aux_loss_field(outputs, aux_loss)
        else:
            outputs["aux_loss"] = aux_loss
        if outputs.get("loss") is not None:
            outputs["loss"] = outputs["loss"] + aux_loss.to(outputs["loss"].dtype)
        return outputs

    @property
    def aux_loss(self) -> Optional[torch.Tensor]:
        """Weighted router losses of the last forward, for models whose output is not a `ModelOutput`.

        transformers models get the same value as `outputs.aux_loss` (already included in `outputs.loss`). For a plain
        `nn.Module` that returns a tensor, add this to your loss: `loss = criterion(model(x)) + model.aux_loss`.
        """
        return self._last_aux_loss

    def _unload_and_optionally_merge(self, merge: bool = True, *args, **kwargs):
        if merge:
            self._check_merge_allowed()
        for handle in self._routing_hooks:
            handle.remove()
        self._routing_hooks = []
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)

    def get_routing_stats(self) -> dict[str, dict[str, RoutingStats]]:
        """Routing statistics of the last forward through this model: `{module name: {adapter name: RoutingStats}}`.

        Layers are listed in model order. The values are detached tensors; nothing is synchronised with the device
        until you read them.
        """
        names = {module: name for name, module in self.model.named_modules() if isinstance(module, MoeLoraLayer)}
        stats: dict[str, dict[str, RoutingStats]] = {}
        for record in self._last_records:
            stats.setdefault(names.get(record.layer, "?"), {})[record.adapter_name] = RoutingStats(
                expert_load=record.expert_load,
                entropy=record.entropy,
                losses=record.losses,
                weighted_loss=record.weighted_loss,
            )
        return stats

    def set_expert_mask(
        self, experts: Optional[Sequence[Union[int, str]]], adapter_name: Optional[str] = None
    ) -> None:
        """Route only to the given experts (MoLE inference-time masking); the remaining gates are renormalised.

        Args:
            experts: indices of the experts to keep, or their names (`config.expert_names`, e.g. the folder names of
                the MoLE LoRAs). `None` removes the mask.
            adapter_name: the adapter to mask; the active adapter by default.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter {adapter_name!r}; available: {sorted(self.peft_config)}.")
        layers = [m for m in self.model.modules() if isinstance(m, MoeLoraLayer) and adapter_name in m.moelora_A]
        if experts is None:
            for layer in layers:
                layer.set_expert_mask(adapter_name, None)
            return
        names = self.peft_config[adapter_name].expert_names or []
        indices = []
        for expert in experts:
            if isinstance(expert, str):
                if expert not in names:
                    raise ValueError(f"Unknown expert {expert!r}; the experts of {adapter_name!r} are {names}.")
                expert = names.index(expert)
            indices.append(int(expert))
        if not indices:
            raise ValueError("`experts` must keep at least one expert (pass None to remove the mask).")
        # Validate against every layer first, so that a bad index leaves no layer masked.
        for layer in layers:
            num_experts = layer.num_experts[adapter_name]
            if any(not 0 <= i < num_experts for i in indices):
                raise ValueError(f"Expert indices {indices} out of range for a layer with {num_experts} experts.")
        for layer in layers:
            mask = torch.zeros(layer.num_experts[adapter_name], dtype=torch.bool)
            mask[indices] = True
            layer.set_expert_mask(adapter_name, mask)

    @contextlib.contextmanager
    def expert_mask(self, experts: Sequence[Union[int, str]], adapter_name: Optional[str] = None) -> Iterator[None]:
        """Context manager form of [`set_expert_mask`]; the mask is removed on exit."""
        self.set_expert_mask(experts, adapter_name)
        try:
            yield
        finally:
            self.set_expert_mask(None, adapter_name)

    def _check_merge_allowed(self):
        raise MoeLoraMergeError(MERGE_ERROR_MESSAGE)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise MoeLoraMergeError(MERGE_ERROR_MESSAGE)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        bad = []
        for key, tensor in to_return.items():
            for name, dims in _ADAPTER_TENSOR_DIMS.items():
                if f".{name}." in f"{key}." and isinstance(tensor, torch.Tensor):
                    if tensor.dim() != dims or (dims and 0 in tensor.shape):
                        bad.append(f"{key}: {tuple(tensor.shape)}")
        if bad:
            raise ValueError(
                f"Refusing to save MOELORA adapter {adapter_name!r}: {len(bad)} tensor(s) are empty or have the wrong "
                f"number of dimensions ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). This happens when "
                "DeepSpeed ZeRO-3 (or FSDP) shards were not gathered before saving: save through the Trainer "
                "(`trainer.save_model`), or wrap the call in `deepspeed.zero.GatheredParameters(model.parameters())`."
            )
        return to_return
