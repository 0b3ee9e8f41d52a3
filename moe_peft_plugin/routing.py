"""Routing and expert computation of a MOELORA layer (pure functions, no module state)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


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
    """Router logits `x @ weight.T` in float32 (or float64 when both are float64), whatever the input dtypes."""
    if x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64):
        return F.linear(x, weight)
    return _Fp32Linear.apply(x, weight)


class Routing(NamedTuple):
    logits: torch.Tensor  # (tokens, num_experts), float32, after temperature and mask
    probs: torch.Tensor  # (tokens, num_experts), softmax of logits
    gates: torch.Tensor  # (tokens, num_experts), weight of each expert per token, 0 for unselected experts
    selected: torch.Tensor  # (tokens, num_experts), bool: the expert counts as selected for load statistics


def route(
    logits: torch.Tensor,
    top_k: int,
    router_type: str,
    temperature: torch.Tensor | float = 1.0,
    noise_std: float = 0.0,
    expert_mask: Optional[torch.Tensor] = None,
) -> Routing:
    """Turn float32 router logits into per-token expert gates.

    Args:
        logits: `(tokens, num_experts)` float32 router logits.
        top_k: experts per token for `router_type="topk"`.
        router_type: `"topk"` (sparse, weights of the selected experts renormalised to sum to 1; with `top_k=1` the raw
            probability as in Switch Transformers) or `"soft"` (softmax over all experts).
        temperature: softmax temperature (a float or a 0-d tensor, e.g. a learnable one).
        noise_std: standard deviation of Gaussian noise added to the logits for the top-k *selection* only.
        expert_mask: optional `(num_experts,)` bool tensor; `False` experts get probability 0 and the others are
            renormalised.
    """
    logits = logits / temperature
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask, torch.finfo(logits.dtype).min)
    probs = logits.softmax(dim=-1)
    num_experts = logits.shape[-1]
    if router_type == "soft" or top_k >= num_experts:
        if expert_mask is not None:
            probs = probs * expert_mask
        gates = probs
        # Load statistics of a dense router count the most probable expert of each token (as with top-1).
        top_index = probs.argmax(dim=-1, keepdim=True) if router_type == "soft" else None
    else:
        scores = logits if noise_std == 0 else logits + noise_std * torch.randn_like(logits)
        top_index = scores.topk(top_k, dim=-1).indices  # (tokens, top_k)
        top_weights = probs.gather(-1, top_index)  # (tokens, top_k)
        if top_k > 1:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        gates = torch.zeros_like(probs).scatter(-1, top_index, top_weights)
    if top_index is None:
        selected = torch.ones_like(probs, dtype=torch.bool)
        if expert_mask is not None:
            selected = selected & expert_mask
    else:
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_index, True)
    return Routing(logits=logits, probs=probs, gates=gates, selected=selected)


class _GatedExpertUp(torch.autograd.Function):
    """`y = (h * gates expanded over r) @ B_cat.T` that saves `h` and `gates` but not their product.

    Autograd would keep both `h` and the gated `h` (each `(tokens, E*r)`) alive for the backward pass; the product
    is recomputed instead, which costs one elementwise multiply and keeps saved activations at the level of a single
    LoRA of rank `E*r`.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # h: (tokens, E*r), gates: (tokens, E), weight: (out, E*r)
        num_experts = gates.shape[-1]
        gated = (h.unflatten(-1, (num_experts, -1)) * gates.unsqueeze(-1)).flatten(-2)
        ctx.save_for_backward(h, gates, weight)
        return F.linear(gated, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, gates, weight = ctx.saved_tensors
        num_experts = gates.shape[-1]
        grad_h = grad_gates = grad_w = None
        grad_gated = grad @ weight  # (tokens, E*r)
        if ctx.needs_input_grad[0]:
            grad_h = (grad_gated.unflatten(-1, (num_experts, -1)) * gates.unsqueeze(-1)).flatten(-2)
        if ctx.needs_input_grad[1]:
            grad_gates = (grad_gated.unflatten(-1, (num_experts, -1)) * h.unflatten(-1, (num_experts, -1))).sum(-1)
        if ctx.needs_input_grad[2]:
            gated = (h.unflatten(-1, (num_experts, -1)) * gates.unsqueeze(-1)).flatten(-2)
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ gated.reshape(-1, gated.shape[-1])
        return grad_h, grad_gates, grad_w


def expert_down(x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """Inputs of all experts in one matmul: `(tokens, in) x (E, r, in) -> (tokens, E*r)`."""
    return F.linear(x, lora_A.flatten(0, 1))


def expert_up(h: torch.Tensor, gates: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of the expert outputs: `sum_e gates[:, e] * B_e h_e`, in one matmul.

    This "dense-cat" formulation computes the rank-`E*r` product for every token and multiplies the unselected experts
    by a zero gate. It is exactly equal to evaluating only the selected experts, with static shapes and no host-device
    synchronisation, and is the fastest formulation for `E*r <= 64` (see NOTES in the repository).

    Args:
        h: `(tokens, E*r)` output of [`expert_down`].
        gates: `(tokens, E)` gate weights (zeros for unselected experts), already multiplied by the LoRA scaling.
        lora_B: `(E, out, r)` stacked LoRA B matrices.
    """
    weight = lora_B.permute(1, 0, 2).flatten(1)  # (out, E*r)
    return _GatedExpertUp.apply(h, gates.to(h.dtype), weight)
