"""How the router losses of the layers reach the loss and the gradient, in every gradient-checkpointing mode.

The layers compute their router losses where the routing happens. Two things are needed from them:

1. The *value* of the weighted router losses of one forward, for `outputs.aux_loss` and logging. Each layer records it
   (detached) in the [`ForwardContext`] of the running forward.
2. Their *gradient*, whenever the router losses are part of the loss the user backpropagates. Collecting the loss
   tensors from the layers does not work under reentrant gradient checkpointing (the first pass runs under
   `no_grad`, so the collected tensors have no graph). Instead each layer injects the gradient of its own router loss
   in its backward pass (DeepSeek-V2's `AddAuxiliaryLoss` idea), which works with no checkpointing, non-reentrant and
   reentrant checkpointing alike.

The injected gradient must be scaled like the rest of the loss (gradient accumulation, fp16 loss scaling, a user
who writes `loss / 4`). `outputs.aux_loss` is therefore an *anchor*: a scalar whose value is the detached sum of the
layers' losses and whose backward records the gradient that reaches it. Because the anchor is created after the
whole model forward, autograd runs its backward before that of any layer, and each layer multiplies its injected
gradient by the recorded value. If the loss the user backpropagates does not contain `outputs.aux_loss` (nor
`outputs.loss`, which includes it), the routers get no router-loss gradient, exactly as with transformers' MoE models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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
    cell: _GradientCell = field(default_factory=_GradientCell)
    records: list[RouterRecord] = field(default_factory=list)

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

    def aux_loss(self, device: torch.device) -> torch.Tensor:
        total = torch.zeros((), device=device, dtype=torch.float32)
        for record in self.records:
            total = total + record.weighted_loss.to(device)
        return total


class RoutingState:
    """Shared by the MOELORA layers of one model; tells a layer which forward it belongs to.

    - Inside `MoeLoraModel.forward`, `active` is the context of the running forward: layers record into it and inject
      their loss gradients scaled by its anchor.
    - Outside of it with gradients enabled, a layer is being recomputed by gradient checkpointing during the backward
      pass of the last forward that ran with gradients (`last_grad_forward`): it injects again, but records nothing.
    - Otherwise (e.g. `generate`, or the base model called directly under `no_grad`) layers just route.
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
    @staticmethod
    def forward(ctx, value: torch.Tensor, dummy: torch.Tensor, cell: _GradientCell) -> torch.Tensor:
        ctx.cell = cell
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.cell.add(grad.detach())
        return None, None, None


def aux_loss_anchor(context: ForwardContext, device: torch.device) -> torch.Tensor:
    """`outputs.aux_loss` of a forward: its value is the weighted router loss; see the module docstring."""
    value = context.aux_loss(device)
    if not torch.is_grad_enabled():
        return value
    dummy = torch.zeros((), device=device, requires_grad=True)
    return _AuxLossAnchor.apply(value, dummy, context.cell)


def summarize_records(records: list[RouterRecord]) -> dict[str, Any]:
    """Sum the loss components of a list of records (tensors, detached)."""
    totals: dict[str, torch.Tensor] = {}
    for record in records:
        for name, value in record.losses.items():
            totals[name] = totals[name] + value if name in totals else value
    return totals
