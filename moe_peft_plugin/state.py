"""How the router losses of the layers reach the loss and the gradient, in every gradient-checkpointing mode.

The layers compute their router losses where the routing happens, and record them in the [`ForwardContext`] of the
running forward. `MoeLoraModel` averages them over the layers into `outputs.aux_loss` (and adds that to
`outputs.loss`).

- A layer that runs with autograd enabled (no checkpointing, or non-reentrant checkpointing) records its weighted loss
  *with* its graph: `outputs.aux_loss` is an ordinary differentiable sum, and whatever the user does with it
  (`loss / grad_accum`, fp16 loss scaling, DeepSpeed) applies to the router losses exactly as to the rest.
- Under reentrant checkpointing the first pass of a checkpointed block runs under `no_grad`, so the recorded loss has
  no graph; the graph only exists when the block is recomputed during the backward pass. For those layers each layer
  injects the gradient of its own router loss into its backward pass during the recomputation (DeepSeek-V2's
  `AddAuxiliaryLoss` idea). To scale it like the rest of the loss, `outputs.aux_loss` contains an *anchor*: a node
  whose backward records the gradient that reaches `aux_loss`. It is created after the whole model forward, so
  autograd runs it before the checkpointed blocks are recomputed, and each layer multiplies its injected gradient by
  the recorded value. The gradient of the checkpointed layers' router losses is therefore delivered through the
  backward pass of the model output: backpropagate a loss that contains both the model output and `aux_loss` (as
  `outputs.loss` does). If the loss does not contain `aux_loss`, the routers get no router-loss gradient, exactly as
  with transformers' MoE models.

Several forwards may share one backward pass (a pairwise loss, micro-batches summed, a multi-task sum). A layer that
is recomputed by gradient checkpointing must then use the padding mask and the gradient anchor of *its* forward. The
model wraps the checkpointing function of transformers (`gradient_checkpointing_enable`, which Trainer, TRL and peft
use) so that a recomputed block runs in the context of the forward that first ran it ([`ReplayInContext`]). A
recomputation that MOELORA did not see being set up (e.g. `checkpoint_wrapper` applied by hand or by FSDP's activation
checkpointing) can only be matched to a forward when one candidate is possible; otherwise it raises
[`AmbiguousRecomputationError`] instead of training with another forward's mask or loss scale.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import torch

from . import losses


@dataclass
class RoutingStats:
    """Routing of one adapter in one layer, over one forward or combined over several ([`RoutingStats.combine`]).

    Statistics count only real tokens (padding excluded). The tensors are detached and stay on the model's device:
    reading them is what synchronises with the device.
    """

    expert_load: torch.Tensor  # (num_experts,), fraction of the routing decisions per expert (sums to 1)
    mean_gate: torch.Tensor  # (num_experts,), mean gate weight per expert (sums to 1 without an expert mask)
    entropy: torch.Tensor  # (), mean entropy of the router distribution, in nats
    num_tokens: torch.Tensor  # (), number of tokens routed
    experts_per_token: int  # top-k (1 for soft routers, whose load counts the most probable expert)
    router_type: str
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted router loss components
    weighted_loss: Optional[torch.Tensor] = None  # (), this layer's weighted router loss (`aux_loss` is their mean)
    # (batch, num_experts), each sample's share of the routing decisions per expert: only while
    # `MoeLoraModel.record_sample_routing(True)` is on, for inputs of shape (batch, sequence, features).
    sample_load: Optional[torch.Tensor] = None

    @property
    def num_experts(self) -> int:
        return self.expert_load.numel()

    @property
    def token_share(self) -> torch.Tensor:
        """(num_experts,), fraction of the tokens that reached each expert (1 for every expert of a dense router)."""
        return (self.expert_load * self.experts_per_token).clamp(max=1.0)

    @classmethod
    def combine(cls, stats: Sequence[RoutingStats]) -> RoutingStats:
        """Token-weighted statistics of several forwards of the same layer (losses: mean over the forwards)."""
        if not stats:
            raise ValueError("No routing statistics to combine.")
        weights = torch.stack([s.num_tokens.double() for s in stats])
        share = weights / weights.sum().clamp_min(1.0)

        def mean(values: list[torch.Tensor]) -> torch.Tensor:
            stacked = torch.stack([v.double() for v in values])
            return (stacked * share.reshape(-1, *([1] * (stacked.dim() - 1)))).sum(0)

        losses = {
            key: torch.stack([s.losses[key].double() for s in stats if key in s.losses]).mean()
            for key in sorted({key for s in stats for key in s.losses})
        }
        weighted = [s.weighted_loss.double() for s in stats if s.weighted_loss is not None]
        samples = [s.sample_load for s in stats]
        return cls(
            expert_load=mean([s.expert_load for s in stats]),
            mean_gate=mean([s.mean_gate for s in stats]),
            entropy=mean([s.entropy for s in stats]),
            num_tokens=weights.sum(),
            experts_per_token=stats[0].experts_per_token,
            router_type=stats[0].router_type,
            losses=losses,
            weighted_loss=torch.stack(weighted).mean() if weighted else None,
            sample_load=torch.cat(samples) if all(sample is not None for sample in samples) else None,
        )


@dataclass(eq=False)
class ForwardContext:
    """State of one model forward that the adapted layers read and write."""

    attention_mask: Optional[torch.Tensor] = None
    parent: Optional[ForwardContext] = None  # the enclosing forward, when forwards are nested
    aux_loss_grad: Optional[torch.Tensor] = None  # the gradient that reached this forward's `aux_loss` anchor
    # (layer, adapter name, statistics) of every routed layer, in the order they ran.
    records: list[tuple[torch.nn.Module, str, RoutingStats]] = field(default_factory=list)
    # Weighted losses recorded with their autograd graph, and the (layer, adapter) pairs that recorded them: those
    # must not inject their gradient again when a non-reentrant checkpoint recomputes them.
    graph_losses: list[torch.Tensor] = field(default_factory=list)
    graph_layers: set[tuple[int, str]] = field(default_factory=set)
    state: Optional[RoutingState] = None
    backward_finished: bool = False  # a backward pass that reached `aux_loss` has completed
    _watching_backward: bool = False
    # `token_weight` (dtype None) and `token_share` by (batch shape, dtype): computed once for all layers.
    _token_weights: dict[tuple, Optional[torch.Tensor]] = field(default_factory=dict)

    def token_weight(self, batch_shape: torch.Size) -> Optional[torch.Tensor]:
        """Per-token weight (1 real, 0 padding), flattened, for a layer input with leading dims `batch_shape`."""
        key = (tuple(batch_shape), None)
        if key not in self._token_weights:
            self._token_weights[key] = self._token_weight(batch_shape)
        return self._token_weights[key]

    def token_share(self, batch_shape: torch.Size, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """`token_weight` as the share of each token in a mean over the real tokens ([`losses.token_shares`]), in
        `dtype`: the layers of a forward share one padding mask, which is normalised once instead of in every layer."""
        key = (tuple(batch_shape), dtype)
        if key not in self._token_weights:
            weight = self.token_weight(batch_shape)
            self._token_weights[key] = None if weight is None else losses.token_shares(weight, dtype)
        return self._token_weights[key]

    def _token_weight(self, batch_shape: torch.Size) -> Optional[torch.Tensor]:
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or len(batch_shape) != 2 or mask.shape[0] != batch_shape[0]:
            return None
        seq_len = batch_shape[1]
        if mask.shape[1] < seq_len:
            return None
        # With a KV cache the mask covers past and current tokens; the layer sees only the current ones.
        return mask[:, -seq_len:].reshape(-1)

    def add_loss(self, layer: torch.nn.Module, adapter_name: str, weighted_loss: torch.Tensor) -> None:
        """Called by a layer in the original forward for a loss that has an autograd graph."""
        self.graph_losses.append(weighted_loss)
        self.graph_layers.add((id(layer), adapter_name))

    def needs_injection(self, layer: torch.nn.Module, adapter_name: str) -> bool:
        """Whether a recomputed layer must inject its loss gradient (its original forward had no graph)."""
        return (id(layer), adapter_name) not in self.graph_layers

    def needs_injection_anywhere(self, layer: torch.nn.Module) -> bool:
        return not any(key[0] == id(layer) for key in self.graph_layers)

    def watch_backward(self, layer_output: torch.Tensor) -> None:
        """Check, once a backward pass has reached the adapter layers, that it also reached `aux_loss`.

        Not under `torch.compile`: a hook that changes Python state would break the compiled graph at every layer, and
        the check is a diagnostic (an eager step shows the same warning)."""
        if torch.compiler.is_compiling():
            return
        if not self._watching_backward and layer_output.requires_grad:
            self._watching_backward = True
            layer_output.register_hook(lambda grad: self.backward_reached_layers())

    def backward_reached_layers(self) -> None:
        """Called during a backward pass through a layer with router losses of this forward."""
        if self.state is not None and not self.state.warned_no_router_loss_gradient:
            # At the end of this backward pass: `aux_loss`, if it is part of the loss, has been reached by then.
            torch.autograd.Variable._execution_engine.queue_callback(self._warn_without_router_loss_gradient)

    def _warn_without_router_loss_gradient(self) -> None:
        if self.aux_loss_grad is None and not self.state.warned_no_router_loss_gradient:
            self.state.warned_no_router_loss_gradient = True
            warnings.warn(NO_ROUTER_LOSS_GRADIENT_WARNING, UserWarning, stacklevel=2)

    def receive_aux_loss_grad(self, grad: torch.Tensor) -> None:
        """Called when the backward pass reaches this forward's `aux_loss` anchor with `grad`."""
        self.aux_loss_grad = grad if self.aux_loss_grad is None else self.aux_loss_grad + grad

        def finish() -> None:
            self.backward_finished = True

        torch.autograd.Variable._execution_engine.queue_callback(finish)


class AmbiguousRecomputationError(RuntimeError):
    """A layer recomputed by gradient checkpointing cannot tell which of several forwards it belongs to."""


NO_ROUTER_LOSS_GRADIENT_WARNING = (
    "MOELORA: a backward pass went through the adapter layers, but `outputs.aux_loss` (the router losses: load "
    "balancing, z-loss, contrastive) received no gradient, so the routers train without them. Backpropagate a loss "
    "that contains `outputs.aux_loss` in the same backward call (`outputs.loss` of transformers models already does), "
    "e.g. use `trainer_callbacks.MoeLoraSFTTrainer` instead of `trl.SFTTrainer`, which builds its own loss and drops "
    "it. To train without router losses, set their coefficients to 0 (`aux_loss_coef`, `router_z_loss_coef`, "
    "`contrastive_loss_coef`, `gate_balance_loss_coef`)."
)


class RoutingState:
    """Shared by the MOELORA layers of one model; tells a layer which forward it belongs to.

    - Inside a forward of the wrapped model, `active` is the context of the running forward: layers record into it and
      inject their loss gradients scaled by its anchor.
    - During the backward pass, a block recomputed by gradient checkpointing runs in the context of the forward that
      first ran it (`replaying`, set by [`ReplayInContext`]): it injects again where needed, but records nothing.
    - A layer that runs with gradients outside both (a recomputation MOELORA did not wrap) belongs to the one forward
      with gradients whose graph is still alive; several candidates that would give different gradients raise.
    - Otherwise (cached decoding: a forward with a KV cache under `no_grad`, as in `generate`; any forward under
      `no_grad` inside `MoeLoraModel.inference_only()`; or the base model called directly under `no_grad`) layers
      just route.
    """

    def __init__(self) -> None:
        self.active: Optional[ForwardContext] = None
        self.replaying: Optional[ForwardContext] = None
        # Forwards that ran with gradients, held weakly: their autograd graph (the `aux_loss` anchor) keeps them alive.
        self._grad_forwards: list[weakref.ref] = []
        self.warned_no_router_loss_gradient = False
        self.record_sample_routing = False
        self.inference_only = False  # `MoeLoraModel.inference_only()`: no-grad forwards open no context

    def open_forward(self, context: ForwardContext) -> None:
        self.active = context
        # Not under `torch.compile`: dynamo would guard on the list's length and liveness, so the second training step
        # (one forward registered, then dead) would compile the model again. The list only serves layers recomputed
        # by a checkpointing that transformers did not set up, which replays eager Python outside the compiled graph.
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._grad_forwards = [ref for ref in self._grad_forwards if ref() is not None]
            self._grad_forwards.append(weakref.ref(context))

    def context_for_layer(self, layer: torch.nn.Module) -> tuple[Optional[ForwardContext], bool]:
        """Return `(context, record)` for `layer`, which is running now."""
        if self.active is not None:
            return self.active, True
        if self.replaying is not None:
            return self.replaying, False
        if torch.is_grad_enabled():
            return self._unwrapped_recomputation_context(layer), False
        return None, False

    def _unwrapped_recomputation_context(self, layer: torch.nn.Module) -> Optional[ForwardContext]:
        alive = [context for context in (ref() for ref in self._grad_forwards) if context is not None]
        candidates = [context for context in alive if not context.backward_finished] or alive
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        # Without injection (the layer recorded its loss with a graph) only the padding mask matters.
        first = candidates[0]
        if all(not context.needs_injection_anywhere(layer) for context in candidates) and all(
            _same_mask(context.attention_mask, first.attention_mask) for context in candidates[1:]
        ):
            return first
        raise AmbiguousRecomputationError(
            f"A MOELORA layer is being recomputed by gradient checkpointing while {len(candidates)} forwards share "
            "this backward pass, and the checkpointing was not set up through transformers "
            "(`model.gradient_checkpointing_enable()`), so MOELORA cannot tell which forward (padding mask, loss "
            "scale) the recomputation belongs to. Enable checkpointing with `gradient_checkpointing_enable()` (the "
            "Trainer's `gradient_checkpointing=True` does), or run one forward per backward."
        )


def _same_mask(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _run_in_context(state: RoutingState, context: ForwardContext, function: Callable, *args, **kwargs) -> Any:
    if state.active is context:  # the first run, inside the forward itself
        return function(*args, **kwargs)
    previous = state.replaying
    state.replaying = context
    try:
        return function(*args, **kwargs)
    finally:
        state.replaying = previous


class ReplayInContext:
    """Wraps a gradient-checkpointing function (transformers' `_gradient_checkpointing_func`) so that a recomputed
    block runs in the routing context of the forward that first ran it, whatever other forwards share the backward."""

    def __init__(self, checkpoint_function: Callable, state: RoutingState) -> None:
        self.checkpoint_function = checkpoint_function
        self.state = state

    def __call__(self, function: Callable, *args, **kwargs) -> Any:
        context = self.state.active
        if context is not None:
            function = partial(_run_in_context, self.state, context, function)
        return self.checkpoint_function(function, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # e.g. `.keywords` of the wrapped `functools.partial`
        if name == "checkpoint_function":
            raise AttributeError(name)
        return getattr(self.checkpoint_function, name)


class _InjectRouterLoss(torch.autograd.Function):
    """Identity on `output`; in the backward pass, gives `loss` the gradient that reached the `aux_loss` anchor."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        ctx.context = context
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        shape, dtype, device = ctx.loss_meta
        ctx.context.backward_reached_layers()
        grad = ctx.context.aux_loss_grad
        if grad is None:
            grad_loss = torch.zeros(shape, dtype=dtype, device=device)
        else:
            grad_loss = grad.to(device=device, dtype=dtype).expand(shape)
        return grad_output, grad_loss, None


def inject_router_loss(output: torch.Tensor, loss: torch.Tensor, context: ForwardContext) -> torch.Tensor:
    """Attach the gradient of `loss` (a weighted router loss of this layer) to the backward pass through `output`."""
    if not (torch.is_grad_enabled() and loss.requires_grad and output.requires_grad):
        return output
    return _InjectRouterLoss.apply(output, loss, context)


class _AuxLossAnchor(torch.autograd.Function):
    """`graph_loss + value`; records the gradient that reaches it (times `scale`) for the layers that inject theirs."""

    @staticmethod
    def forward(
        ctx, graph_loss: torch.Tensor, value: torch.Tensor, context: ForwardContext, scale: float
    ) -> torch.Tensor:
        ctx.context = context  # also keeps the context alive exactly as long as the graph of its forward
        ctx.scale = scale
        return graph_loss.detach() + value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.context.receive_aux_loss_grad(grad.detach() * ctx.scale)
        return grad, None, None, None


def build_aux_loss(context: ForwardContext, device: torch.device) -> torch.Tensor:
    """`outputs.aux_loss` of a forward: the mean over the routed layers of their weighted router losses.

    The mean (as transformers' Mixtral computes one load-balancing loss over all layers) keeps the meaning of the
    coefficients independent of how many modules are adapted. See the module docstring for the gradient.
    """
    num_records = max(len(context.records), 1)
    # One stack and one sum rather than an addition (and a device move) per layer.
    total = _sum_on(device, [stats.weighted_loss for _, _, stats in context.records], torch.float32) / num_records
    if not torch.is_grad_enabled() or not context.records:
        return total
    graph_loss = _sum_on(device, context.graph_losses, torch.float32) / num_records
    num_without_graph = len(context.records) - len(context.graph_losses)
    context.graph_losses = []  # the context outlives the forward; do not keep the graph alive through it
    if not graph_loss.requires_grad:
        if num_without_graph == 0:
            return graph_loss  # nothing of this forward trains a router
        graph_loss = torch.zeros((), device=device, requires_grad=True)
    if num_without_graph == 0 and torch.compiler.is_compiling():
        # The anchor's backward (it records the gradient of `aux_loss` for the layers a reentrant checkpoint recomputes
        # without a graph, and for the missing-gradient warning) changes Python state, which torch.compile cannot
        # trace; with every layer's loss in the graph it is not needed, and the value and gradient are the same.
        return graph_loss + (total - graph_loss.detach())
    return _AuxLossAnchor.apply(graph_loss, total - graph_loss.detach(), context, 1.0 / num_records)


def _sum_on(device: torch.device, values: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The sum of 0-d `values` on `device`, at least in `dtype` (a zero of `dtype` if there are none)."""
    if not values:
        return torch.zeros((), device=device, dtype=dtype)
    stacked = torch.stack([value if value.device == device else value.to(device) for value in values])
    return stacked.sum(dtype=torch.promote_types(stacked.dtype, dtype))
