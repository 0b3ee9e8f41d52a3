"""The MOELORA layer: LoRA experts and a router around a linear (optionally quantized) base layer."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from torch import nn

from . import losses
from .config import MoeLoraConfig, lora_scaling
from .routing import (
    Routing,
    RoutingOptions,
    expert_down,
    expert_down_with_router,
    expert_up,
    inference_expert_up,
    inference_routing,
    inference_selected_experts,
    route,
    router_fuses,
    router_logits,
)
from .state import ForwardContext, RoutingState, RoutingStats, inject_router_loss


class _InferenceWeights(NamedTuple):
    """One adapter of one layer, prepared for inference (`MoeLoraLayer._inference_weights`)."""

    key: Optional[tuple]  # storage and version of the adapter tensors it was built from (None: built under compile)
    sources: tuple  # (A, B, router, log temperature) it was built from: the parameter objects, compared by identity
    expert_mask: Optional[torch.Tensor]  # the mask it was built with (compared by identity)
    down: torch.Tensor  # (E*r, in) `[A_1; ...; A_E]`, then the E router rows when they share the matmul (`fused`)
    up: torch.Tensor  # (rows of `down`, out) `[B_1 ... B_E]^T` times the LoRA scaling, zero for the router rows
    gate_expand: torch.Tensor  # (rows of `down`, E) 0/1: the expert whose gate scales a row; 0 for router rows
    down_by_expert: torch.Tensor  # (E, r, in): a view of the expert rows of `down`
    up_by_expert: torch.Tensor  # (E, r, out): a view of the expert rows of `up`
    router_rows: Optional[torch.Tensor]  # (E, in): a view of the router rows of `down` (None unless `fused`)
    rank_total: int  # E*r
    num_experts: int
    top_k: int
    router_type: str
    temperature: torch.Tensor | float  # the router temperature (a learned one as of building)
    fused: bool
    sparse: bool  # top-k routing of fewer than all experts: the gates come as (weights, index)
    shares_router: bool  # `router_sharing`: the layer takes part in a group


class MoeLoraMergeError(NotImplementedError):
    """Raised by merge operations: MOELORA routing depends on the input, so its update is no fixed weight delta."""


MERGE_ERROR_MESSAGE = (
    "MOELORA adapters cannot be merged into the base weights: the router picks different experts for every token, so "
    "the adapter is not a fixed weight update. Use `unload()` to get the base model back, or export a single expert "
    "(or a router-weighted approximation) as a plain LoRA adapter."
)


class MoeLoraLayer(BaseTunerLayer):
    """Mixin holding the per-adapter MOELORA state of one adapted layer (keyed by adapter name, like LoRA)."""

    # Trainable adapter tensors; the experts are stacked: A (E, r, in), B (E, out, r), router (E, in).
    adapter_layer_names = ("moelora_A", "moelora_B", "moelora_router", "moelora_log_temperature")
    other_param_names = (
        "r",
        "num_experts",
        "top_k",
        "scaling",
        "moelora_dropout",
        "routing_options",
        "expert_mask",
        "router_owner",
        "_router_users",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.r: dict[str, int] = {}
        self.num_experts: dict[str, int] = {}
        self.top_k: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.routing_options: dict[str, RoutingOptions] = {}
        self.expert_mask: dict[str, Optional[torch.Tensor]] = {}
        # `router_sharing`: the layer holding the router this layer uses, per adapter (absent: its own router). A plain
        # dict, so the owner is not registered as a submodule (its parameters stay in one place in the state dict).
        self.router_owner: dict[str, MoeLoraLayer] = {}
        self._router_users: dict[str, int] = {}  # on an owner: the number of layers using its router, itself included
        self._shared_routing: dict[tuple[str, bool], list] = {}  # on an owner: see `_shared_routing_of`
        self.moelora_A = nn.ParameterDict({})
        self.moelora_B = nn.ParameterDict({})
        self.moelora_router = nn.ParameterDict({})
        self.moelora_log_temperature = nn.ParameterDict({})
        self.moelora_dropout = nn.ModuleDict({})
        # Per instance, so that freezing the experts of one adapter does not leak into other layers.
        self.frozen_peft_weight_names = {}
        self._routing_state: Optional[RoutingState] = None
        self._inference_cache: dict[str, tuple] = {}  # see `_inference_weights`
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Unsupported layer type {type(self.get_base_layer())} for MOELORA.")
        self.in_features = in_features
        self.out_features = out_features

    def update_layer(
        self,
        adapter_name: str,
        config: MoeLoraConfig,
        num_experts: int,
        top_k: int,
        experts: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        inference_mode: bool = False,
        router_owner: Optional[MoeLoraLayer] = None,
    ) -> None:
        """Create (or re-create) the experts and the router of `adapter_name` in this layer.

        Args:
            num_experts, top_k: resolved for this layer (MoLA lists are expanded by the model).
            experts: MoLE: `(A, B)` stacked weights of trained LoRAs, `(E, r, in)` and `(E, out, r)`, with the LoRA
                scaling already folded into B.
            router_owner: `router_sharing`: the layer whose router (and learned temperature) this layer uses; it gets
                none of its own.
        """
        r = config.r
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"`top_k` ({top_k}) must be between 1 and `num_experts` ({num_experts}).")
        if router_owner is not None:
            owner_shape = (router_owner.num_experts.get(adapter_name), router_owner.top_k.get(adapter_name))
            if owner_shape != (num_experts, top_k) or router_owner.in_features != self.in_features:
                raise ValueError(
                    f"`router_sharing`: layers that share a router need the same `num_experts`, `top_k` and input "
                    f"size; this layer has ({num_experts}, {top_k}, {self.in_features}), the router's owner "
                    f"({owner_shape[0]}, {owner_shape[1]}, {router_owner.in_features})."
                )
            if num_experts == 1:
                router_owner = None  # no router to share
        self.r[adapter_name] = r
        self.num_experts[adapter_name] = num_experts
        self.top_k[adapter_name] = top_k
        # MoLE experts have their own LoRA scaling folded into B and come with lora_alpha = r, i.e. a scaling of 1.
        self.scaling[adapter_name] = lora_scaling(config.lora_alpha, r, config.use_rslora)
        self.routing_options[adapter_name] = RoutingOptions.from_config(config)
        self.expert_mask[adapter_name] = None
        self.moelora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )

        self.moelora_A[adapter_name] = nn.Parameter(torch.empty(num_experts, r, self.in_features))
        self.moelora_B[adapter_name] = nn.Parameter(torch.empty(num_experts, self.out_features, r))
        for name in ("moelora_router", "moelora_log_temperature"):
            if adapter_name in getattr(self, name):  # re-created below, unless another layer holds the router
                del getattr(self, name)[adapter_name]
        self.router_owner.pop(adapter_name, None)
        self._router_users[adapter_name] = 1
        if router_owner is not None:
            self.router_owner[adapter_name] = router_owner
            router_owner._router_users[adapter_name] += 1
        elif num_experts > 1:
            # With a single expert the gate is always 1: there is no router (its weights could never train).
            self.moelora_router[adapter_name] = nn.Parameter(torch.empty(num_experts, self.in_features))
            if config.learn_router_temperature:
                self.moelora_log_temperature[adapter_name] = nn.Parameter(torch.empty(1))
        self.reset_parameters(adapter_name, config.init_weights, config.router_temperature)
        if experts is not None:
            lora_A, lora_B = experts
            with torch.no_grad():
                self.moelora_A[adapter_name].copy_(lora_A)
                self.moelora_B[adapter_name].copy_(lora_B)
        if config.freeze_experts:
            self.frozen_peft_weight_names[adapter_name] = ("moelora_A", "moelora_B")

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_parameters(self, adapter_name: str, init_weights: bool = True, temperature: float = 1.0) -> None:
        if adapter_name not in self.moelora_A:
            return
        with torch.no_grad():
            lora_A = self.moelora_A[adapter_name]
            for expert in lora_A:
                # LoRA's initialisation of A (nn.Linear's default), independently per expert.
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.moelora_B[adapter_name])
            else:
                for expert in self.moelora_B[adapter_name]:
                    nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            if adapter_name in self.moelora_router:
                # Small random weights, as Mixtral's gate (initializer_range 0.02): tokens differ in their routing
                # from the first step, and no expert is preferred on average.
                nn.init.normal_(self.moelora_router[adapter_name], std=0.02)
            if adapter_name in self.moelora_log_temperature:
                self.moelora_log_temperature[adapter_name].fill_(math.log(temperature))

    def set_expert_mask(self, adapter_name: str, mask: Optional[torch.Tensor]) -> None:
        """Restrict routing of `adapter_name` to the experts where `mask` is True (None removes the mask)."""
        if mask is not None:
            num_experts = self.num_experts[adapter_name]
            mask = torch.as_tensor(mask, dtype=torch.bool, device=self.moelora_A[adapter_name].device)
            if mask.shape != (num_experts,):
                raise ValueError(f"The expert mask must have shape ({num_experts},), got {tuple(mask.shape)}.")
            if not mask.any():
                raise ValueError("The expert mask must keep at least one expert.")
        self.expert_mask[adapter_name] = mask

    def set_router_loss_coefficients(self, adapter_name: str, **coefficients: float) -> None:
        """Set router-loss coefficients of `adapter_name` in this layer (e.g. `aux_loss_coef=0.02`).

        They take effect at the next forward (and its recomputation under gradient checkpointing)."""
        if adapter_name not in self.routing_options:
            raise ValueError(
                f"This layer has no MOELORA adapter {adapter_name!r}; it has {sorted(self.routing_options)}."
            )
        self.routing_options[adapter_name] = self.routing_options[adapter_name].with_coefficients(**coefficients)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise MoeLoraMergeError(MERGE_ERROR_MESSAGE)

    def unmerge(self) -> None:
        warnings.warn("MOELORA adapters are never merged; nothing to unmerge.", stacklevel=2)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise MoeLoraMergeError(MERGE_ERROR_MESSAGE)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


def set_router_loss_coefficients(
    layers: Iterable[MoeLoraLayer], adapter_name: Optional[str] = None, **coefficients: float
) -> set[str]:
    """Set router-loss coefficients of `adapter_name` (every adapter by default) in `layers`; returns the adapters
    changed. Every value is checked against every layer before any layer changes."""
    updates = [
        (layer, name, options.with_coefficients(**coefficients))
        for layer in layers
        for name, options in layer.routing_options.items()
        if adapter_name in (None, name)
    ]
    for layer, name, options in updates:
        layer.routing_options[name] = options
    return {name for _, name, _ in updates}


class Linear(nn.Module, MoeLoraLayer):
    """MOELORA around an `nn.Linear`, a `transformers` `Conv1D`, or a quantized linear layer (bitsandbytes 4/8-bit ...)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MoeLoraConfig,
        num_experts: int,
        top_k: int,
        experts: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        router_owner: Optional[MoeLoraLayer] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        MoeLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, config, num_experts=num_experts, top_k=top_k, experts=experts, router_owner=router_owner
        )

    def _base_result(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output, cloned where a quantized backend returns a tensor the adapters must not modify."""
        result = self.base_layer(x, *args, **kwargs)
        if not self.disable_adapters and self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        return result

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        previous_dtype = x.dtype
        result = self._base_result(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        context, record = (None, False) if self._routing_state is None else self._routing_state.context_for_layer(self)
        for active_adapter in self.active_adapters:
            if active_adapter not in self.moelora_A:
                continue
            result = self._add_adapter_output(result, x, active_adapter, context, record)
        return result.to(previous_dtype)

    def _add_adapter_output(
        self,
        result: torch.Tensor,
        x: torch.Tensor,
        adapter_name: str,
        context: Optional[ForwardContext],
        record: bool,
    ) -> torch.Tensor:
        batch_shape = x.shape[:-1]
        if context is None and not self.training and not torch.is_grad_enabled():
            # Inference without router losses (cached decoding): the same output in the fewest operations.
            update = self._inference_update(x, adapter_name)  # already in the batch shape
            return result + (update if update.dtype == result.dtype else update.to(result.dtype))
        lora_A = self.moelora_A[adapter_name]
        lora_B = self.moelora_B[adapter_name]
        options = self.routing_options[adapter_name]
        layer_input = x  # as the model passed it: `router_sharing` recognises a shared input by its identity
        tokens = self._cast_input_dtype(x, lora_A.dtype).reshape(-1, x.shape[-1])  # (tokens, in)

        shared = self._shared_routing_of(layer_input, adapter_name, context, inference=False)
        if shared is not None:
            # `router_sharing`: another layer routed this input with the router both use. This layer counts its
            # routing, router losses and statistics as its own, as if each had an identical copy of the router.
            h = expert_down(self.moelora_dropout[adapter_name](tokens), lora_A)
            routing, weighted_loss, components, stats = shared
            components = dict(components)
            stats = None if stats is None else dataclasses.replace(stats)
        else:
            h, logits = self._expert_inputs_and_logits(tokens, adapter_name)  # (tokens, E*r), (tokens, E) float32
            if logits is None:  # a single expert
                update = expert_up(h, tokens.new_ones(tokens.shape[0], 1), None, lora_B, self.scaling[adapter_name])
                return _add_update(result, update, batch_shape)
            sample_shape = None
            if record and self._routing_state.record_sample_routing and len(batch_shape) == 2:
                sample_shape = tuple(batch_shape)
            routed = self._route(logits, adapter_name, context, batch_shape, record, sample_shape)
            routing, weighted_loss, components, stats = routed
            self._share_routing(layer_input, adapter_name, context, routed, inference=False)
        update = expert_up(h, routing.weights, routing.index, lora_B, self.scaling[adapter_name])  # (tokens, out)
        result = _add_update(result, update, batch_shape)
        if context is None:
            return result

        contrastive_coef = options.contrastive_loss_coef
        if contrastive_coef:
            contrastive = losses.expert_contrastive_loss(
                h.unflatten(-1, (lora_B.shape[0], -1)),
                lora_B,
                routing.selected,
                options.contrastive_temperature,
                context.token_weight(batch_shape),
            )
            components["contrastive"] = contrastive
            weighted_contrastive = contrastive_coef * contrastive
            weighted_loss = weighted_contrastive if weighted_loss is None else weighted_loss + weighted_contrastive

        if weighted_loss is not None and weighted_loss.requires_grad:
            if record:
                context.add_loss(self, adapter_name, weighted_loss)
                context.watch_backward(result)
            elif context.needs_injection(self, adapter_name):
                # Recomputed by reentrant gradient checkpointing: the original forward ran without a graph.
                result = inject_router_loss(result, weighted_loss, context)
        if record:
            stats.losses = {name: value.detach() for name, value in components.items()}
            stats.weighted_loss = weighted_loss.detach() if weighted_loss is not None else stats.entropy.new_zeros(())
            context.records.append((self, adapter_name, stats))
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample through the adapter named for it (`"__base__"` or an adapter absent here: the base layer alone).

        peft's mixed-adapter batches (`adapter_names=[...]`, set by `MoeLoraModel._enable_peft_forward_hooks`). Routing
        is per token, so a sample gets exactly the output it gets alone with its adapter. No router losses or
        statistics are recorded (no routing context).
        """
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"`adapter_names` has {len(adapter_names)} entries but the batch has {x.shape[0]} samples: give one "
                "adapter name per sample ('__base__' for none)."
            )
        previous_dtype = x.dtype
        result = self._base_result(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter_name in dict.fromkeys(adapter_names):  # unique, in order
            if adapter_name not in self.moelora_A:
                continue
            rows = torch.tensor([i for i, name in enumerate(adapter_names) if name == adapter_name], device=x.device)
            sub_result = self._add_adapter_output(result[rows], x[rows], adapter_name, None, False)
            result = result.index_copy(0, rows, sub_result)
        return result.to(previous_dtype)

    def train(self, mode: bool = True):
        self._inference_cache.clear()
        self._shared_routing.clear()
        return super().train(mode)

    def _inference_weights(self, adapter_name: str) -> _InferenceWeights:
        """What inference needs of `adapter_name`, laid out for the fewest operations per call (see
        [`_InferenceWeights`]).

        Cached per adapter so that decoding neither copies the weights nor looks up the layer's settings at every
        token; rebuilt whenever a tensor is replaced or modified in place (its storage or autograd version changes) or
        the expert mask changes, and dropped by `train()`. Writes through `param.data` bypass version counting (as they
        bypass autograd): call `train()`/`eval()` after them.

        Under `torch.compile` (e.g. `generate` with a static cache and a compiled forward) dynamo cannot compare data
        pointers or version counters (the check would break the graph in every layer), so a compiled forward takes the
        prepared weights as the last eager call validated them, provided they were built from these very parameter
        objects, and otherwise prepares them inside the graph (from the parameters as they are at that call) without
        caching them. `generate` runs its prefill eagerly, so every call revalidates the cache before its compiled
        decoding steps; a compiled forward called directly sees in-place changes made in eval mode only after an eager
        forward or `train()`/`eval()`.
        """
        lora_A, lora_B = self.moelora_A[adapter_name], self.moelora_B[adapter_name]
        # None with a single expert, and in a layer that uses a shared router (it mostly reuses the routing).
        router = self.moelora_router.get(adapter_name)
        log_temperature = self.moelora_log_temperature.get(adapter_name)
        mask = self.expert_mask[adapter_name]
        compiling = torch.compiler.is_compiling()
        key = None
        if compiling:
            cached = self._inference_cache.get(adapter_name)
            if (
                cached is not None
                and cached.sources[0] is lora_A
                and cached.sources[1] is lora_B
                and cached.sources[2] is router
                and cached.sources[3] is log_temperature
                and cached.expert_mask is mask
            ):
                return cached
        else:
            key = (lora_A.data_ptr(), lora_A._version, lora_B.data_ptr(), lora_B._version, lora_A.dtype, lora_A.device)
            if router is not None:
                key += (router.data_ptr(), router._version)
            if log_temperature is not None:
                key += (log_temperature.data_ptr(), log_temperature._version)
            cached = self._inference_cache.get(adapter_name)
            if cached is not None and cached.key == key and cached.expert_mask is mask:
                return cached
        num_experts, scaling = self.num_experts[adapter_name], self.scaling[adapter_name]
        options = self.routing_options[adapter_name]
        rank = lora_A.shape[1]
        rank_total = num_experts * rank
        down = lora_A.flatten(0, 1)
        fused = router is not None and router_fuses(lora_A, router)
        # Laid out (rows, out) with the LoRA scaling folded in (one multiplication less per call), so that each
        # expert's rows are one contiguous block for the selected-experts path.
        up = (lora_B.transpose(1, 2) * scaling).reshape(rank_total, lora_B.shape[1])
        # Gating as one small matmul: `gates @ gate_expand.T` spreads each expert's gate over its r columns of the
        # down-projection's output (exact: a single nonzero term per column). With the router rows in `down`, their
        # columns get gate 0 and the up-projection zero rows, so the output needs no split.
        gate_expand = torch.eye(num_experts, dtype=down.dtype, device=down.device).repeat_interleave(rank, dim=0)
        if fused:
            down = torch.cat([down, router])
            gate_expand = torch.cat([gate_expand, gate_expand.new_zeros(num_experts, num_experts)])
            up = torch.cat([up, up.new_zeros(num_experts, up.shape[1])])
        temperature: torch.Tensor | float = options.router_temperature
        if log_temperature is not None:
            temperature = log_temperature.detach().exp()
        top_k = self.top_k[adapter_name]
        prepared = _InferenceWeights(
            key=key,
            sources=(lora_A, lora_B, router, log_temperature),
            expert_mask=mask,
            down=down,
            up=up,
            gate_expand=gate_expand,
            down_by_expert=down[:rank_total].view(num_experts, rank, -1),
            up_by_expert=up[:rank_total].view(num_experts, rank, -1),
            router_rows=down[rank_total:] if fused else None,
            rank_total=rank_total,
            num_experts=num_experts,
            top_k=top_k,
            router_type=options.router_type,
            temperature=temperature,
            fused=fused,
            sparse=options.router_type != "soft" and top_k < num_experts,
            shares_router=self._router_users.get(adapter_name, 1) > 1 or adapter_name in self.router_owner,
        )
        if not compiling:
            self._inference_cache[adapter_name] = prepared
        return prepared

    def _inference_update(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's output `(*batch, out)` for the layer input `x` `(*batch, in)` in eval mode without autograd or
        a routing context: no losses, no statistics. The batch dimensions are kept (no reshapes): every operation here
        works on the last dimension.

        An eager call on so few tokens that they select at most half of the experts (tokens x top_k <= E / 2: cached
        decoding of a small batch) reads only those experts' weights ([`inference_selected_experts`]); otherwise
        every expert is computed and the unselected ones get gate 0 ([`inference_expert_up`]). Decoding one token is
        bound by reading the weights, and the dense form reads as many bytes as LoRA of rank E*r; nearer to E selected
        experts the gathers cost what they save (measured in docs/benchmarks.md)."""
        weights = self._inference_weights(adapter_name)
        tokens = self._cast_input_dtype(x, weights.down.dtype)
        if weights.num_experts == 1:
            return F.linear(tokens, weights.down) @ weights.up
        # Eager only: inductor lowers the small gathered matmuls to loops over gathered rows, which measured slower
        # than the dense form on a CPU (docs/benchmarks.md); a compiled forward computes every expert.
        selective = (
            weights.sparse
            and 2 * x.shape[:-1].numel() * weights.top_k <= weights.num_experts
            and not torch.compiler.is_compiling()
        )
        # The experts' inputs, then the router logits where `fused` (not needed when only selected experts run).
        h = None if selective else F.linear(tokens, weights.down)
        gates = self._shared_routing_of(x, adapter_name, None, inference=True) if weights.shares_router else None
        if gates is None:
            if weights.fused and not torch.is_autocast_enabled(tokens.device.type):
                logits = F.linear(tokens, weights.router_rows) if selective else h[..., weights.rank_total :]
            else:  # no router rows, or autocast (it would run the fused router rows in half precision)
                router, log_temperature = self._router_tensors(adapter_name)
                logits = router_logits(tokens, router)
            if adapter_name in self.router_owner:  # the temperature is the router owner's
                temperature, mask = self._temperature_and_mask(logits, adapter_name, log_temperature)
            else:
                temperature, mask = weights.temperature, weights.expert_mask
                mask = None if mask is None else mask.to(logits.device)
            gates = inference_routing(
                logits, top_k=weights.top_k, router_type=weights.router_type, temperature=temperature, expert_mask=mask
            )
            if weights.shares_router:
                self._share_routing(x, adapter_name, None, gates, inference=True)
        if selective:
            return inference_selected_experts(tokens, *gates, weights.down_by_expert, weights.up_by_expert)
        return inference_expert_up(h, *gates, weights.up, weights.gate_expand)

    def _router_tensors(self, adapter_name: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """`(router, log_temperature)` of `adapter_name`: this layer's, or those of the layer it shares a router with
        (`router_sharing`). Each is None where absent (a single expert; a fixed temperature)."""
        owner = self.router_owner.get(adapter_name, self)
        router = owner.moelora_router.get(adapter_name)
        if owner is not self and router is not None and router.numel() == 0:
            # DeepSpeed ZeRO-3 gathers a module's parameters only around that module's own forward.
            raise RuntimeError(
                "`router_sharing`: this layer must route its own input with the router of another layer, whose "
                "weights are partitioned now (DeepSpeed ZeRO-3). Under ZeRO-3 the members of a group must read the "
                "same input tensor (as q/k/v and gate/up do), or use `router_sharing=False`."
            )
        return router, owner.moelora_log_temperature.get(adapter_name)

    def _shared_routing_of(
        self, layer_input: torch.Tensor, adapter_name: str, context: Optional[ForwardContext], inference: bool
    ) -> Optional[Any]:
        """`router_sharing`: the routing that a layer sharing this layer's router computed for this very input tensor
        in this forward (and with the router as it is now), or None: then this layer routes its input itself.

        The routing is kept on the router's owner until every layer of the group has taken it, so that nothing of a
        forward outlives it. A layer that gets another tensor (e.g. the keys of a cross-attention) finds none."""
        owner = self.router_owner.get(adapter_name, self)
        key = (adapter_name, inference)
        slot = owner._shared_routing.get(key)
        if slot is None:
            return None
        shared_input, versions, shared_context, routing, remaining = slot
        if shared_input is not layer_input or shared_context is not context:
            return None
        if versions is not None and versions != _versions(layer_input, owner.moelora_router[adapter_name]):
            return None  # the input or the router changed in place since
        if remaining == 1:
            del owner._shared_routing[key]
        else:
            slot[-1] = remaining - 1
        return routing

    def _share_routing(
        self,
        layer_input: torch.Tensor,
        adapter_name: str,
        context: Optional[ForwardContext],
        routing: Any,
        inference: bool,
    ) -> None:
        """Offer `routing` of `layer_input` to the other layers that share this layer's router (`router_sharing`)."""
        owner = self.router_owner.get(adapter_name, self)
        users = owner._router_users.get(adapter_name, 1)
        if users > 1:
            # Under torch.compile a version counter is data-dependent (it cannot be traced); the identity of the input
            # tensor and of the forward's context still tell a fresh input apart.
            versions = (
                None if torch.compiler.is_compiling() else _versions(layer_input, owner.moelora_router[adapter_name])
            )
            owner._shared_routing[(adapter_name, inference)] = [layer_input, versions, context, routing, users - 1]

    def _temperature_and_mask(
        self, logits: torch.Tensor, adapter_name: str, log_temperature: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor | float, Optional[torch.Tensor]]:
        """The router temperature (fixed, or learned as `log_temperature`) and the expert mask, for `logits`."""
        options = self.routing_options[adapter_name]
        temperature = options.router_temperature if log_temperature is None else log_temperature.to(logits.dtype).exp()
        mask = self.expert_mask[adapter_name]
        return temperature, None if mask is None else mask.to(logits.device)

    def _expert_inputs_and_logits(
        self, tokens: torch.Tensor, adapter_name: str
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The expert inputs `(tokens, E*r)` and the router logits `(tokens, E)` (None with a single expert).

        One matmul gives both ([`expert_down_with_router`]) when the router sees the same input as the experts (no
        dropout, no jitter) and can run in their dtype; otherwise the dropout applies to the expert input only and the
        jitter to the router input only.
        """
        lora_A = self.moelora_A[adapter_name]
        router = self._router_tensors(adapter_name)[0]
        dropout = self.moelora_dropout[adapter_name]
        jitter = self.routing_options[adapter_name].router_jitter_noise if self.training else 0.0
        if (
            router is not None
            and isinstance(dropout, nn.Identity)
            and jitter == 0
            and tokens.dtype == lora_A.dtype
            and router_fuses(lora_A, router)
            and not torch.is_autocast_enabled(tokens.device.type)
        ):
            return expert_down_with_router(tokens, lora_A, router)
        h = expert_down(dropout(tokens), lora_A)
        if router is None:
            return h, None
        router_input = tokens
        if jitter > 0:
            router_input = router_input * torch.empty_like(router_input).uniform_(1.0 - jitter, 1.0 + jitter)
        return h, router_logits(router_input, router)

    def _route(
        self,
        logits: torch.Tensor,
        adapter_name: str,
        context: Optional[ForwardContext],
        batch_shape: torch.Size,
        record: bool,
        sample_shape: Optional[tuple[int, int]] = None,
    ) -> tuple[Routing, Optional[torch.Tensor], dict[str, torch.Tensor], Optional[RoutingStats]]:
        """Routing by the router `logits`, the router losses that need no expert outputs (in a routing `context`) and,
        when the forward records, the routing statistics: `(routing, weighted loss, unweighted losses, statistics)`.

        It runs once per forward with autograd: what it saves for the backward pass is a few bytes per token (the
        `(tokens, E)` float32 probabilities and the top-k indices and weights), while recomputing it in the backward
        pass (activation checkpointing) would run the router matmul and every routing operation a second time.
        """
        options = self.routing_options[adapter_name]
        temperature, mask = self._temperature_and_mask(logits, adapter_name, self._router_tensors(adapter_name)[1])
        routing = route(
            logits,
            top_k=self.top_k[adapter_name],
            router_type=options.router_type,
            temperature=temperature,
            noise_std=options.router_noise_std if self.training else 0.0,
            expert_mask=mask,
        )
        weighted_loss, components, stats = None, {}, None
        if context is None:
            return routing, weighted_loss, components, stats
        token_share = context.token_share(batch_shape, logits.dtype)
        load = losses.expert_load(routing.selected, token_share) if record or options.aux_loss_coef else None
        terms = (
            ("load_balancing", "aux_loss_coef", losses.load_balancing_loss, (routing.probs, load)),
            ("router_z", "router_z_loss_coef", losses.router_z_loss, (routing.logits,)),
            ("gate_balance", "gate_balance_loss_coef", losses.gate_balance_loss, (routing.gates,)),
        )
        for name, coef_name, loss_fn, loss_args in terms:
            coef = getattr(options, coef_name)
            if coef:
                components[name] = value = loss_fn(*loss_args, token_share)
                weighted_loss = coef * value if weighted_loss is None else weighted_loss + coef * value
        if record:
            with torch.no_grad():
                stats = self._routing_stats(
                    routing, load, adapter_name, context.token_weight(batch_shape), token_share, sample_shape
                )
        return routing, weighted_loss, components, stats

    def _routing_stats(
        self,
        routing: Routing,
        load: torch.Tensor,
        adapter_name: str,
        token_weight: Optional[torch.Tensor],
        token_share: Optional[torch.Tensor],
        sample_shape: Optional[tuple[int, int]],
    ) -> RoutingStats:
        router_type = self.routing_options[adapter_name].router_type
        num_experts = self.num_experts[adapter_name]
        sample_load = None
        if sample_shape is not None:
            selected = routing.selected.float().reshape(*sample_shape, num_experts)
            if token_weight is not None:
                selected = selected * token_weight.reshape(*sample_shape, 1).to(selected.dtype)
            sample_load = selected.sum(1)
            sample_load = sample_load / sample_load.sum(-1, keepdim=True).clamp_min(1.0)
        num_tokens = (
            token_weight.sum() if token_weight is not None else routing.probs.new_tensor(routing.probs.shape[0])
        )
        return RoutingStats(
            expert_load=load,
            mean_gate=losses.mean_gate(routing.gates, token_share),
            entropy=losses.router_entropy(routing.probs, token_share),
            num_tokens=num_tokens.float(),
            experts_per_token=1 if router_type == "soft" else min(self.top_k[adapter_name], num_experts),
            router_type=router_type,
            sample_load=sample_load,
        )

    def __repr__(self) -> str:
        return "moelora." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)


def _versions(*tensors: torch.Tensor) -> tuple[Optional[int], ...]:
    """The autograd version counters of `tensors`: they change with every in-place write (e.g. an optimizer step).

    None for an inference tensor (made under `torch.inference_mode()`), which keeps no counter: it can only be written
    in place inside inference mode, and its identity is what tells it apart (as under torch.compile).
    """
    return tuple(None if tensor.is_inference() else tensor._version for tensor in tensors)


def _add_update(result: torch.Tensor, update: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """`result + update`, with the `(tokens, out)` update reshaped to the batch shape and cast to the result's dtype."""
    update = update.reshape(*batch_shape, -1)
    return result + (update if update.dtype == result.dtype else update.to(result.dtype))
