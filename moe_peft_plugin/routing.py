"""Routing and expert computation of a MOELORA layer (pure functions, no module state)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F


ROUTER_LOSS_COEFFICIENTS = ("aux_loss_coef", "router_z_loss_coef", "contrastive_loss_coef", "gate_balance_loss_coef")


@dataclasses.dataclass(frozen=True)
class RoutingOptions:
    """How one adapter routes in one layer, and the weights of its router losses.

    Built from the adapter's [`MoeLoraConfig`] (the fields have the same names and meaning) when the layer is created.
    Frozen, so that nothing changes routing behind the layer's back: change the loss coefficients of a whole model with
    [`MoeLoraModel.set_router_loss_coefficients`] (or of one layer with `MoeLoraLayer.set_router_loss_coefficients`).
    """

    router_type: str
    router_temperature: float
    router_jitter_noise: float
    router_noise_std: float
    aux_loss_coef: float
    router_z_loss_coef: float
    contrastive_loss_coef: float
    contrastive_temperature: float
    gate_balance_loss_coef: float

    @classmethod
    def from_config(cls, config: Any) -> RoutingOptions:
        values = {field.name: getattr(config, field.name) for field in dataclasses.fields(cls)}
        return cls(**{name: value if name == "router_type" else float(value) for name, value in values.items()})

    @property
    def coefficients(self) -> dict[str, float]:
        """The router-loss coefficients, keyed like `MoeLoraConfig`."""
        return {name: getattr(self, name) for name in ROUTER_LOSS_COEFFICIENTS}

    def with_coefficients(self, **coefficients: float) -> RoutingOptions:
        """A copy with new router-loss coefficients (validated like `MoeLoraConfig`)."""
        unknown = sorted(set(coefficients) - set(ROUTER_LOSS_COEFFICIENTS))
        if unknown:
            raise ValueError(f"Unknown router-loss coefficients {unknown}; valid: {list(ROUTER_LOSS_COEFFICIENTS)}.")
        for name, value in coefficients.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value >= 0
                or value == float("inf")
            ):
                raise ValueError(f"`{name}` must be a float >= 0 (0 disables the loss), got {value!r}.")
        if coefficients.get("gate_balance_loss_coef") and self.router_type != "soft":
            raise ValueError(
                "`gate_balance_loss_coef` (MoLE) requires soft routing, but this adapter uses "
                f"router_type={self.router_type!r}."
            )
        return dataclasses.replace(self, **{name: float(value) for name, value in coefficients.items()})


class _Fp32Linear(torch.autograd.Function):
    """`x @ weight.T` computed in float32 without keeping a float32 copy of `x` for the backward pass.

    The router must run in float32 (a bf16 softmax over router logits is too coarse for top-k selection and its
    losses), but `F.linear(x.float(), weight.float())` would save a float32 copy of every layer input for the backward
    pass. This saves the original `x`, which the base layer already keeps alive, and upcasts again in the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        return grad_x, grad_w


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits `x @ weight.T` in float32 (or float64 when both are float64), whatever the input dtypes.

    Autocast is disabled here: under bf16/fp16 autocast the router would otherwise silently run in half precision.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        if x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64):
            return F.linear(x, weight)
        return _Fp32Linear.apply(x, weight)


class Routing(NamedTuple):
    logits: torch.Tensor  # (tokens, num_experts), float32, after temperature and mask
    probs: torch.Tensor  # (tokens, num_experts), softmax of logits
    gates: torch.Tensor  # (tokens, num_experts), weight of each expert per token, 0 for unselected experts
    selected: torch.Tensor  # (tokens, num_experts), bool: the expert counts as selected for load statistics
    weights: torch.Tensor  # the gates in compact form: (tokens, top_k) with `index`, or (tokens, num_experts)
    index: Optional[torch.Tensor]  # (tokens, top_k) expert indices of `weights`, or None when `weights` is dense


def route(
    logits: torch.Tensor,
    top_k: int,
    router_type: str,
    temperature: torch.Tensor | float = 1.0,
    noise_std: float = 0.0,
    expert_mask: Optional[torch.Tensor] = None,
) -> Routing:
    """Turn router logits into per-token expert gates.

    Args:
        logits: `(tokens, num_experts)` float32 (or float64) router logits.
        top_k: experts per token for `router_type="topk"`.
        router_type: `"topk"` (sparse, weights of the selected experts renormalised to sum to 1; with `top_k=1` the raw
            probability as in Switch Transformers) or `"soft"` (softmax over all experts).
        temperature: softmax temperature (a float or a 0-d tensor, e.g. a learnable one).
        noise_std: standard deviation of Gaussian noise added to the logits for the top-k *selection* only.
        expert_mask: optional `(num_experts,)` bool tensor; `False` experts get probability 0 and the others are
            renormalised.
    """
    if not (isinstance(temperature, float) and temperature == 1.0):
        logits = logits / temperature
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask, torch.finfo(logits.dtype).min)
    probs = logits.softmax(dim=-1)
    num_experts = logits.shape[-1]
    if router_type == "soft" or top_k >= num_experts:
        if expert_mask is not None:
            probs = probs * expert_mask
        gates = weights = probs
        index = None
        if router_type == "soft":
            # Load statistics of a dense router count the most probable expert of each token (as with top-1).
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, probs.argmax(dim=-1, keepdim=True), True)
        else:
            selected = torch.ones_like(probs, dtype=torch.bool)
            if expert_mask is not None:
                selected = selected & expert_mask
    else:
        scores = logits if noise_std == 0 else logits + noise_std * torch.randn_like(logits)
        top_scores, index = scores.topk(top_k, dim=-1)  # (tokens, top_k)
        if top_k == 1:
            weights = probs.gather(-1, index)
        else:
            # The selected probabilities renormalised, i.e. the softmax over the selected logits: fewer operations
            # (forward and backward) than gathering the probabilities and dividing by their sum.
            weights = (top_scores if noise_std == 0 else logits.gather(-1, index)).softmax(dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, index, weights)
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)
    return Routing(logits=logits, probs=probs, gates=gates, selected=selected, weights=weights, index=index)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without dispatching an operator when it already has that dtype (runs in every layer)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _dense_gates(
    weights: torch.Tensor, index: Optional[torch.Tensor], num_experts: int, dtype: torch.dtype, scaling: float
) -> torch.Tensor:
    """The `(tokens, E)` gates times `scaling`, in `dtype` (a scaling of 1, the default, multiplies nothing)."""
    if index is not None:
        weights = weights.new_zeros(weights.shape[0], num_experts).scatter(-1, _cast(index, torch.int64), weights)
    weights = _cast(weights, dtype)
    return weights if scaling == 1.0 else weights * scaling


class _GatedExpertUp(torch.autograd.Function):
    """`y = scaling * (h * gates expanded over r) @ B_cat.T`, saving only `h`, the compact gates and `B`.

    Autograd would keep `h`, the gated `h` (each `(tokens, E*r)`), the dense gates and a concatenated copy of B alive
    for the backward pass. This keeps `h` and the top-k weights and indices, and rebuilds the rest in the backward
    pass (an elementwise multiply and a scatter), so saved activations stay at the level of one LoRA of rank `E*r`.
    """

    @staticmethod
    def forward(ctx, h, weights, index, lora_B, scaling):
        # h: (tokens, E*r), weights: (tokens, top_k) or (tokens, E), index: (tokens, top_k) or None, lora_B: (E, out, r)
        num_experts = lora_B.shape[0]
        gates = _dense_gates(weights, index, num_experts, h.dtype, scaling)
        gated = (h.unflatten(-1, (num_experts, -1)) * gates.unsqueeze(-1)).flatten(-2)
        small_index = None if index is None else index.to(torch.int16 if num_experts > 127 else torch.int8)
        ctx.save_for_backward(h, weights, small_index, lora_B)
        ctx.scaling = scaling
        return F.linear(gated, lora_B.permute(1, 0, 2).flatten(1))

    @staticmethod
    def backward(ctx, grad):
        h, weights, index, lora_B = ctx.saved_tensors
        index = None if index is None else index.long()
        num_experts, out_features, rank = lora_B.shape
        # Under autocast the forward matmul ran in half precision, so `grad` may differ in dtype from the saved
        # tensors: compute in the dtype of `grad` (as autocast did) and return each gradient in its input's dtype.
        dtype = grad.dtype
        gates = _dense_gates(weights, index, num_experts, dtype, ctx.scaling)
        h_experts = _cast(h, dtype).unflatten(-1, (num_experts, -1))  # (tokens, E, r)
        grad_h = grad_weights = grad_B = None
        weight = _cast(lora_B, dtype).permute(1, 0, 2).flatten(1)  # (out, E*r)
        grad_gated = (grad @ weight).unflatten(-1, (num_experts, -1))  # (tokens, E, r)
        if ctx.needs_input_grad[0]:
            grad_h = _cast((grad_gated * gates.unsqueeze(-1)).flatten(-2), h.dtype)
        if ctx.needs_input_grad[1]:
            grad_gates = (grad_gated * h_experts).sum(-1)  # (tokens, E)
            if ctx.scaling != 1.0:
                grad_gates = grad_gates * ctx.scaling
            grad_weights = grad_gates if index is None else grad_gates.gather(-1, index)
            grad_weights = _cast(grad_weights, weights.dtype)
        if ctx.needs_input_grad[3]:
            gated = (h_experts * gates.unsqueeze(-1)).flatten(-2)
            grad_B = (grad.T @ gated).view(out_features, num_experts, rank).permute(1, 0, 2)
            grad_B = _cast(grad_B, lora_B.dtype)
        return grad_h, grad_weights, None, grad_B, None


def expert_down(x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """Inputs of all experts in one matmul: `(tokens, in) x (E, r, in) -> (tokens, E*r)`."""
    return F.linear(x, lora_A.flatten(0, 1))


def router_fuses(lora_A: torch.Tensor, router: torch.Tensor) -> bool:
    """Whether the router can share the matmul of [`expert_down`] (see [`expert_down_with_router`]): it has the dtype
    of the experts, float32 or float64, so that its logits come out as [`router_logits`] gives them. Autocast, which
    would run the shared matmul in half precision, is for the caller to check when it runs."""
    return router.dtype == lora_A.dtype and lora_A.dtype in (torch.float32, torch.float64)


class _DownWithRouter(torch.autograd.Function):
    """`x @ [A_1; ...; A_E; router]^T` in one matmul, saving `x` and the weights rather than their concatenation.

    Autograd would keep the concatenated weight, a copy of the adapter's down-projection, alive in every layer until
    the backward pass, which concatenates it again instead.
    """

    @staticmethod
    def forward(ctx, x, lora_A, router):
        ctx.save_for_backward(x, lora_A, router)
        return F.linear(x, torch.cat([lora_A.flatten(0, 1), router]))

    @staticmethod
    def backward(ctx, grad):
        x, lora_A, router = ctx.saved_tensors
        grad_x = grad_A = grad_router = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ torch.cat([lora_A.flatten(0, 1), router])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_A, grad_router = (grad.T @ x).split([lora_A.shape[0] * lora_A.shape[1], router.shape[0]])
            grad_A = grad_A.view_as(lora_A) if ctx.needs_input_grad[1] else None
            grad_router = grad_router if ctx.needs_input_grad[2] else None
        return grad_x, grad_A, grad_router


def expert_down_with_router(
    x: torch.Tensor, lora_A: torch.Tensor, router: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`expert_down`] and [`router_logits`] of the same `(tokens, in)` `x` in one matmul.

    `(tokens, E*r)` expert inputs and `(tokens, E)` logits, as views of one output: one matmul instead of two in the
    forward pass and two instead of four in the backward pass. Only where [`router_fuses`] and autocast is off.
    """
    both = _DownWithRouter.apply(x, lora_A, router)
    return both.split([lora_A.shape[0] * lora_A.shape[1], router.shape[0]], dim=-1)


def expert_up(
    h: torch.Tensor, weights: torch.Tensor, index: Optional[torch.Tensor], lora_B: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """Gate-weighted sum of the expert outputs, `scaling * sum_e gates[:, e] * B_e h_e`, in one matmul.

    This "dense-cat" formulation computes the rank-`E*r` product for every token and multiplies the unselected experts
    by a zero gate. It is exactly equal to evaluating only the selected experts, with static shapes and no host-device
    synchronisation, and is the fastest formulation for `E*r <= 64` (see NOTES in the repository).

    Args:
        h: `(tokens, E*r)` output of [`expert_down`].
        weights, index: the gates, as `Routing.weights` and `Routing.index`.
        lora_B: `(E, out, r)` stacked LoRA B matrices.
        scaling: the LoRA scaling.
    """
    return _GatedExpertUp.apply(h, weights, index, lora_B, scaling)


def inference_routing(
    logits: torch.Tensor,
    top_k: int,
    router_type: str,
    temperature: torch.Tensor | float = 1.0,
    expert_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The gates of [`route`] (without noise) in as few operations as possible, in the compact form of
    `Routing.weights` and `Routing.index`: `(..., top_k)` weights of the experts `index` selects, or dense
    `(..., num_experts)` gates and None (soft routing; top-k of all experts).

    Cached decoding runs every layer on one token at a time, where the cost is the number of operations, not their
    size. The top-k weights are the softmax over the selected logits, which equals the renormalised probabilities.
    """
    if not (isinstance(temperature, float) and temperature == 1.0):
        logits = logits / temperature
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask, torch.finfo(logits.dtype).min)
    if router_type == "soft" or top_k >= logits.shape[-1]:
        gates = logits.softmax(dim=-1)
        return (gates if expert_mask is None else gates * expert_mask), None
    values, index = logits.topk(top_k, dim=-1)
    weights = values.softmax(dim=-1) if top_k > 1 else logits.softmax(dim=-1).gather(-1, index)
    return weights, index


def inference_expert_up(
    h: torch.Tensor, weights: torch.Tensor, index: Optional[torch.Tensor], up: torch.Tensor, gate_expand: torch.Tensor
) -> torch.Tensor:
    """`expert_up` for inference (no autograd), computing every expert ("dense-cat"): `h` `(..., columns)` holds the
    experts' inputs (and possibly router logits), `weights`/`index` are the gates of [`inference_routing`],
    `gate_expand` `(columns, E)` maps each column to its expert's gate (0 for a router column), `up` `(columns, out)`
    is `[B_1 ... B_E]^T` with the LoRA scaling folded in (zero for a router column).

    Spreading the gates over the columns is one small matmul (exact: one nonzero term per column)."""
    gates = weights
    if index is not None:
        gates = weights.new_zeros(*weights.shape[:-1], gate_expand.shape[1]).scatter_(-1, index, weights)
    if gates.dtype != gate_expand.dtype:
        gates = gates.to(gate_expand.dtype)
    return (h * F.linear(gates, gate_expand)) @ up


def inference_selected_experts(
    tokens: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    down_by_expert: torch.Tensor,
    up_by_expert: torch.Tensor,
) -> torch.Tensor:
    """`expert_up(expert_down(...))` for inference reading only the selected experts' weights: `tokens` `(..., in)`,
    `weights`/`index` `(..., k)` the top-k gates of [`inference_routing`], `down_by_expert` `(E, r, in)` the stacked
    `A_e`, `up_by_expert` `(E, r, out)` the stacked `B_e^T` with the LoRA scaling folded in; returns `(..., out)`.

    Why: decoding a batch of one token per layer call is bound by reading weights, not by arithmetic. "Dense-cat"
    ([`inference_expert_up`]) reads all E experts, as many bytes as LoRA of rank `E*r`; this path gathers the `k`
    experts of each token (two gathers, two batched matmuls), so it reads fewer bytes as long as tokens x k < E (the
    layer takes it up to E / 2). The result is the same sum over the selected experts, in another order of summation.
    """
    rank, in_features = down_by_expert.shape[1], down_by_expert.shape[2]
    num_tokens, top_k = index.shape[:-1].numel(), index.shape[-1]
    flat_index = index.view(-1)
    down = down_by_expert.index_select(0, flat_index).view(num_tokens, top_k * rank, in_features)
    h = torch.bmm(down, tokens.reshape(num_tokens, in_features, 1))  # (tokens, k*r, 1)
    h = (h.view(num_tokens, top_k, rank) * weights.view(num_tokens, top_k, 1)).view(num_tokens, 1, -1)
    up = up_by_expert.index_select(0, flat_index).view(num_tokens, top_k * rank, -1)
    return torch.bmm(h, up).view(*tokens.shape[:-1], -1)
