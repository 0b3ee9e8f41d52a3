"""The MOELORA tuner: creates MOELORA layers in a model and turns their router losses into `outputs.aux_loss`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from peft.tuners.lora.model import _adapter_names_pre_forward_hook, _get_encoder
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    AuxiliaryTrainingWrapper,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput

from .config import MoeLoraConfig, expand_per_layer, layer_index, router_sharing_groups
from .constants import PREFIX
from .layer import MERGE_ERROR_MESSAGE, Linear, MoeLoraLayer, MoeLoraMergeError, set_router_loss_coefficients
from .mole import LoraExperts, check_target_modules, load_lora_experts
from .outputs import with_aux_loss_field
from .routing import ROUTER_LOSS_COEFFICIENTS
from .state import ForwardContext, ReplayInContext, RoutingState, RoutingStats, build_aux_loss


# Expected number of dimensions of each adapter tensor in a state dict; anything else (notably the empty (0,) tensors
# of ZeRO-3 partitions that were not gathered) means the checkpoint would be unusable.
_ADAPTER_TENSOR_DIMS = {"moelora_A": 3, "moelora_B": 3, "moelora_router": 2, "moelora_log_temperature": 1}


def _get_tuner_layer_class(target_base_layer: nn.Module) -> Optional[type[MoeLoraLayer]]:
    if isinstance(target_base_layer, (nn.Linear, Conv1D)):
        return Linear
    backend = resolve_quantization_backend(target_base_layer)
    if backend is not None and backend.layer_type == "linear":
        return Linear
    return None


def _device_of(outputs: Any, context: ForwardContext) -> torch.device:
    if context.records:
        return context.records[0][2].weighted_loss.device
    values = outputs.values() if isinstance(outputs, dict) else [outputs]
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _without_aux_loss(module: nn.Module, args: tuple, outputs: Any) -> Any:
    """Forward hook for mixed-adapter batches, which compute no router losses: `outputs.aux_loss` is None."""
    if isinstance(outputs, dict) and "aux_loss" in outputs:
        outputs["aux_loss"] = None
    return outputs


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
        # `router_sharing`: the layer holding the router of each group, by (adapter, parent module, group index).
        self.__dict__["_router_owners"] = {}
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
            if peft_config.target_modules is not None:
                check_target_modules(self.model, peft_config.target_modules, peft_config.task_type, experts)
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
        index = layer_index(key, config.layers_pattern)
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
        group = self._router_group(moelora_config, adapter_name, current_key, target_name)
        router_owner = self._router_owners.get(group)

        if isinstance(target, MoeLoraLayer):
            target.update_layer(
                adapter_name,
                moelora_config,
                num_experts=num_experts,
                top_k=top_k,
                experts=experts,
                inference_mode=moelora_config.inference_mode,
                router_owner=router_owner,
            )
            if group is not None and router_owner is None:
                self._router_owners[group] = target
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
            router_owner=router_owner,
            **get_quantization_kwargs(self),
        )
        new_module._routing_state = self._routing_state
        if group is not None and router_owner is None:
            self._router_owners[group] = new_module
        if adapter_name not in self.active_adapters:
            # adding an additional adapter: it is not automatically trainable
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _router_group(config: MoeLoraConfig, adapter_name: str, key: str, name: str) -> Optional[tuple[str, str, int]]:
        """`router_sharing`: the group of module `key` (named `name` in its parent), as `(adapter, parent, index)`,
        or None when it has a router of its own. The members of a group are siblings: one `self_attn`, one `mlp`."""
        for index, names in enumerate(router_sharing_groups(config.router_sharing)):
            if name in names:
                return adapter_name, key.rpartition(".")[0], index
        return None

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._pending_experts.pop(id(self.peft_config.get(adapter_name)), None)
            self.__dict__["_router_owners"] = {}
        config = self.peft_config.get(adapter_name)
        if config is not None and config.router_sharing:
            layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer) and adapter_name in m.moelora_A]
            if not any(adapter_name in layer.router_owner for layer in layers):
                groups = [list(group) for group in router_sharing_groups(config.router_sharing)]
                raise ValueError(
                    f"`router_sharing`={config.router_sharing!r}, but no two adapted modules of one parent module "
                    f"form a group of {groups}: nothing would share a router. Name the sibling projections that read "
                    "the same input (e.g. `router_sharing=[['query', 'key', 'value']]`), or set `router_sharing=False`."
                )

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
        if state.active is None and not torch.is_grad_enabled() and (kv_cache is not None or state.inference_only):
            return  # cached decoding (`generate`) or `inference_only()`: the layers only route; no losses or statistics
        context = ForwardContext(attention_mask=kwargs.get("attention_mask"), parent=state.active, state=state)
        if torch.is_grad_enabled() and module.training:
            self._replay_checkpoints_in_context(module)
        state.open_forward(context)

    def _replay_checkpoints_in_context(self, model: nn.Module) -> None:
        """Make blocks recomputed by transformers' gradient checkpointing run in the context of their own forward.

        Checked at every training forward, because checkpointing can be enabled (or re-enabled, which replaces the
        function) after the adapter was created, as the Trainer does. transformers sets the function only on modules
        with a `gradient_checkpointing` flag (the model and its repeated blocks), so only those are looked at: walking
        every module would cost ~2 ms per forward on a 30-layer model.
        """
        modules = self.__dict__.get("_checkpointing_modules")
        if modules is None:
            modules = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
            self.__dict__["_checkpointing_modules"] = modules
        for module in modules:
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

        Layers are listed in model order, named as in the wrapped model (`model.layers.0.self_attn.q_proj`). The values
        are detached tensors; nothing is synchronised with the device until you read them. Combine several forwards
        with [`RoutingStats.combine`]; per-sample loads need [`record_sample_routing`].
        """
        names = {module: name for name, module in self.model.named_modules() if isinstance(module, MoeLoraLayer)}
        stats: dict[str, dict[str, RoutingStats]] = {}
        for layer, adapter_name, layer_stats in self._last_records:
            stats.setdefault(names.get(layer, "?"), {})[adapter_name] = layer_stats
        return stats

    def record_sample_routing(self, enabled: bool = True) -> None:
        """Also record each sample's expert load (`RoutingStats.sample_load`, `(batch, num_experts)`), e.g. to see
        which experts each task uses. Off by default: it costs a little per layer and forward."""
        self._routing_state.record_sample_routing = bool(enabled)

    def set_router_loss_coefficients(
        self, adapter_name: Optional[str] = None, *, update_config: bool = True, **coefficients: float
    ) -> None:
        """Set router-loss coefficients in every layer, e.g. `model.set_router_loss_coefficients(aux_loss_coef=0.02)`.

        Args:
            adapter_name: the adapter to change; every MOELORA adapter of the model by default.
            update_config: also write the values into the adapter's `peft_config`, so that the saved
                `adapter_config.json` records them. Pass False for transient values (e.g. a warm-up schedule).
            **coefficients: `aux_loss_coef`, `router_z_loss_coef`, `contrastive_loss_coef`, `gate_balance_loss_coef`.

        Nothing changes if any value is invalid. The values take effect at the next forward.
        """
        if adapter_name is not None and adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter {adapter_name!r}; available: {sorted(self.peft_config)}.")
        layers = [module for module in self.model.modules() if isinstance(module, MoeLoraLayer)]
        changed = set_router_loss_coefficients(layers, adapter_name, **coefficients)
        if update_config:
            for name in changed:
                for key, value in coefficients.items():
                    setattr(self.peft_config[name], key, float(value))

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
    def inference_only(self) -> Iterator[None]:
        """Forwards under `no_grad` (or `inference_mode`) compute the outputs only: no router losses (no
        `outputs.aux_loss`, as in cached decoding) and no routing statistics are recorded (`get_routing_stats()`
        keeps those of the last forward that recorded them).

        A forward in eval mode normally still computes the router losses and statistics, so that an evaluation loop
        can report them. A loop that reads only the logits (scoring, perplexity) gets the same logits in fewer
        operations here, through the path of cached decoding. Forwards with gradients are not affected.
        """
        state: RoutingState = self._routing_state
        previous = state.inference_only
        state.inference_only = True
        try:
            yield
        finally:
            state.inference_only = previous

    @contextlib.contextmanager
    def without_router_losses(self) -> Iterator[None]:
        """Forwards inside compute no router losses (every coefficient is 0) but still record routing statistics,
        e.g. to collect the routing on evaluation text (the contrastive loss alone can cost 15% of a forward). The
        coefficients of every layer are restored on exit; the saved config is never changed."""
        layers = [module for module in self.model.modules() if isinstance(module, MoeLoraLayer)]
        saved = [(layer, dict(layer.routing_options)) for layer in layers]
        set_router_loss_coefficients(layers, None, **dict.fromkeys(ROUTER_LOSS_COEFFICIENTS, 0.0))
        try:
            yield
        finally:
            for layer, options_by_adapter in saved:
                layer.routing_options.update(options_by_adapter)

    @contextlib.contextmanager
    def expert_mask(self, experts: Sequence[Union[int, str]], adapter_name: Optional[str] = None) -> Iterator[None]:
        """Context manager form of [`set_expert_mask`]; the mask is removed on exit."""
        self.set_expert_mask(experts, adapter_name)
        try:
            yield
        finally:
            self.set_expert_mask(None, adapter_name)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """Mixed-adapter batches: `model(**batch, adapter_names=[...])` and `model.generate(..., adapter_names=[...])`.

        `PeftModel` enters this around `forward`/`generate`. As for LoRA, `adapter_names` has one adapter name per
        sample (`"__base__"`: the base model alone), and every sample gets exactly the output it gets alone with its
        adapter. It is for inference: refused in training mode, and no router losses or routing statistics are
        computed for a mixed batch (`outputs.aux_loss` is None, `get_routing_stats()` is empty), because a router loss
        over samples of different adapters has no meaning for any one of them. To get them, run each adapter's samples
        as a batch of their own with `set_adapter`.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "`adapter_names` (mixed-adapter batches) cannot be used in training mode: it is for inference, call "
                "`model.eval()` first; to train several adapters, train each with `set_adapter`."
            )
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ValueError(
                f"`adapter_names` must be a list with one adapter name per sample, got {adapter_names!r}."
            )
        # Checked here, not per layer: an adapter need not target every layer, but a typo must not pass silently.
        known = {name for m in self.model.modules() if isinstance(m, MoeLoraLayer) for name in m.moelora_A}
        unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
        if unknown:
            raise ValueError(
                f"`adapter_names` names unknown adapter(s) {unknown}; the adapters are {sorted(known)}, and "
                "'__base__' means no adapter."
            )
        original_names = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            # `generate` repeats each sample `num_beams` times (consecutively).
            adapter_names = [name for name in original_names for _ in range(num_beams)]
        handles = []
        for module in self.model.modules():
            if isinstance(module, (MoeLoraLayer, AuxiliaryTrainingWrapper)):
                hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        encoder = _get_encoder(self.model)
        if encoder is not None and len(adapter_names) != len(original_names):
            # The encoder of an encoder-decoder model sees the samples before the beams are expanded.
            for module in encoder.modules():
                if isinstance(module, (MoeLoraLayer, AuxiliaryTrainingWrapper)):
                    hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=original_names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        # Runs after the routing hooks: the layers recorded nothing, so there is no router loss to report.
        handles.append(self.model.register_forward_hook(_without_aux_loss))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_merge_allowed(self):
        raise MoeLoraMergeError(MERGE_ERROR_MESSAGE)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise MoeLoraMergeError(MERGE_ERROR_MESSAGE)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        to_return = _complete_wrapped_selection(model, adapter_name, state_dict, to_return)
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


# Wrappers that add a segment to the module names (`named_modules`) but remove it from the state dict keys: FSDP1
# (`FullyShardedDataParallel`) and activation checkpointing (`checkpoint_wrapper`, e.g. accelerate's FSDP
# `activation_checkpointing`).
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _state_dict_name(module_name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        module_name = module_name.replace(segment, "")
    return module_name


def _complete_wrapped_selection(model, adapter_name, state_dict, selected):
    """The adapter tensors of `state_dict`, also where wrappers nested inside the model renamed its modules.

    peft finds the adapter tensors by the module names of the model, and strips only a *leading*
    `_fsdp_wrapped_module.`: with FSDP1 wrapping each decoder layer (accelerate's `TRANSFORMER_BASED_WRAP`) or with
    activation-checkpoint wrappers, no key matches and peft would save an adapter with no tensors, without an error.
    The same selection is made here with the wrapper segments removed. If MOELORA layers of the adapter still have no
    tensor in the state dict, saving is refused.
    """
    from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

    if not state_dict:
        # Nothing to select from: the non-main ranks of a rank-0-only full state dict (e.g. FSDP's
        # `get_model_state_dict(..., full_state_dict=True, cpu_offload=True)`), which write nothing.
        return selected
    layers = [
        name
        for name, module in model.named_modules()
        if isinstance(module, MoeLoraLayer) and adapter_name in module.moelora_A
    ]

    def missing_layers() -> list[str]:
        return [
            _state_dict_name(name)
            for name in layers
            if not any(f"{n}.moelora_A.{adapter_name}" in selected for n in (name, _state_dict_name(name)))
        ]

    missing = missing_layers()
    if not missing:
        return selected
    if any(segment in name for name, _ in model.named_modules() for segment in _WRAPPER_SEGMENTS):
        prefixes = {_state_dict_name(prefix) for prefix in _get_tuner_state_dict_key_prefixes(model)}
        selected = {**_filter_state_dict_by_key_prefixes(state_dict, prefixes), **selected}
        missing = missing_layers()
    if missing:
        what = "no tensor at all" if len(missing) == len(layers) else f"no tensors for {len(missing)} of them"
        raise ValueError(
            f"Refusing to save MOELORA adapter {adapter_name!r}: the model has {len(layers)} MOELORA layer(s) with "
            f"this adapter, but the state dict being saved holds {what} (e.g. {missing[0]}.moelora_A.{adapter_name}; "
            f"the state dict has {len(state_dict)} entries, e.g. {next(iter(state_dict))!r}). The saved adapter "
            "would be unusable. The keys of the state dict must be the model's parameter names: under FSDP, save a "
            "full state dict (FSDP2: `torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True, cpu_offload=True))`, then "
            "`model.save_pretrained(output_dir, state_dict=full_state_dict)` on rank 0; with the Trainer, "
            "`trainer.save_model()` and `fsdp_state_dict_type: FULL_STATE_DICT`), and pass it as `state_dict=`."
        )
    return selected
