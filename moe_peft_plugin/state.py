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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


class _GradientCell:
    """Holds the gradient that reached the `aux_loss` anchor of one forward."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Optional[torch.Tensor] = None

    def add(self, grad: torch.Tensor) -> None:
        self.grad = grad if self.grad is None else self.grad + grad


@dataclass
class RouterRecord:
    """What one adapted layer reports about one adapter's routing in one forward (all tensors detached)."""

    layer: torch.nn.Module
    adapter_name: str
    expert_load: torch.Tensor  # (num_experts,), fraction of routing decisions per expert
    entropy: torch.Tensor  # (), mean router entropy
    losses: dict[str, torch.Tensor]  # unweighted loss components, e.g. {"load_balancing": ...}
    weighted_loss: torch.Tensor  # (), sum of coefficient * component


@dataclass
class ForwardContext:
    """State of one model forward that the adapted layers read and write."""

    attention_mask: Optional[torch.Tensor] = None
    parent: Optional[ForwardContext] = None  # the enclosing forward, when forwards are nested
    cell: _GradientCell = field(default_factory=_GradientCell)
    records: list[RouterRecord] = field(default_factory=list)
    # Weighted losses recorded with their autograd graph, and the (layer, adapter) pairs that recorded them: those
    # must not inject their gradient again when a non-reentrant checkpoint recomputes them.
    graph_losses: list[torch.Tensor] = field(default_factory=list)
    graph_layers: set[tuple[int, str]] = field(default_factory=set)

    def token_weight(self, batch_shape: torch.Size) -> Optional[torch.Tensor]:
        """Per-token weight (1 real, 0 padding), flattened, for a layer input with leading dims `batch_shape`."""
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


class RoutingState:
    """Shared by the MOELORA layers of one model; tells a layer which forward it belongs to.

    - Inside a forward of the wrapped model, `active` is the context of the running forward: layers record into it and inject
      their loss gradients scaled by its anchor.
    - Outside of it with gradients enabled, a layer is being recomputed by gradient checkpointing during the backward
      pass of the last forward that ran with gradients (`last_grad_forward`): it injects again, but records nothing.
    - Otherwise (cached decoding: a forward with a KV cache under `no_grad`, as in `generate`; or the base model
      called directly under `no_grad`) layers just route.
    """

    def __init__(self) -> None:
        self.active: Optional[ForwardContext] = None
        self.last_grad_forward: Optional[ForwardContext] = None

    def context_for_layer(self) -> tuple[Optional[ForwardContext], bool]:
        """Return `(context, record)` for a layer that is running now."""
        if self.active is not None:
            return self.active, True
        if torch.is_grad_enabled() and self.last_grad_forward is not None:
            return self.last_grad_forward, False
        return None, False


class _InjectRouterLoss(torch.autograd.Function):
    """Identity on `output`; in the backward pass, gives `loss` the gradient that reached the `aux_loss` anchor."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor, cell: _GradientCell) -> torch.Tensor:
        ctx.cell = cell
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        shape, dtype, device = ctx.loss_meta
        grad = ctx.cell.grad
        if grad is None:
            grad_loss = torch.zeros(shape, dtype=dtype, device=device)
        else:
            grad_loss = grad.to(device=device, dtype=dtype).expand(shape)
        return grad_output, grad_loss, None


def inject_router_loss(output: torch.Tensor, loss: torch.Tensor, context: ForwardContext) -> torch.Tensor:
    """Attach the gradient of `loss` (a weighted router loss of this layer) to the backward pass through `output`."""
    if not (torch.is_grad_enabled() and loss.requires_grad and output.requires_grad):
        return output
    return _InjectRouterLoss.apply(output, loss, context.cell)


class _AuxLossAnchor(torch.autograd.Function):
    """`graph_loss + value`; records the gradient that reaches it (times `scale`) for the layers that inject theirs."""

    @staticmethod
    def forward(ctx, graph_loss: torch.Tensor, value: torch.Tensor, cell: _GradientCell, scale: float) -> torch.Tensor:
        ctx.cell = cell
        ctx.scale = scale
        return graph_loss.detach() + value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.cell.add(grad.detach() * ctx.scale)
        return grad, None, None, None


def build_aux_loss(context: ForwardContext, device: torch.device) -> torch.Tensor:
    """`outputs.aux_loss` of a forward: the mean over the routed layers of their weighted router losses.

    The mean (as transformers' Mixtral computes one load-balancing loss over all layers) keeps the meaning of the
    coefficients independent of how many modules are adapted. See the module docstring for the gradient.
    """
    num_records = max(len(context.records), 1)
    total = torch.zeros((), device=device, dtype=torch.float32)
    for record in context.records:
        total = total + record.weighted_loss.to(device)
    total = total / num_records
    if not torch.is_grad_enabled():
        return total
    graph_loss = sum((loss.to(device) for loss in context.graph_losses), torch.zeros((), device=device))
    graph_loss = graph_loss / num_records
    num_without_graph = len(context.records) - len(context.graph_losses)
    context.graph_losses = []  # the context outlives the forward; do not keep the graph alive through it
    if num_without_graph == 0:
        return graph_loss
    if not graph_loss.requires_grad:
        graph_loss = torch.zeros((), device=device, requires_grad=True)
    return _AuxLossAnchor.apply(graph_loss, total - graph_loss.detach(), context.cell, 1.0 / num_records)
