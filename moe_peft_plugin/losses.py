"""Router losses of MOELORA as pure functions of one layer's routing (float32).

Padding never counts: the means over tokens take an optional `token_share` of shape `(tokens,)`, the share of each token
in the mean (`token_shares`: 1 / number of real tokens for real tokens, 0 for padding), so that a mean is one matmul and
a layer normalises its padding mask once for all its losses and statistics. Nothing has a data-dependent shape (no
boolean indexing), so nothing forces a host-device synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch


# Relative floor of the norms in the contrastive loss (see `expert_contrastive_loss`).
CONTRASTIVE_NORM_FLOOR = 1e-2


def token_shares(token_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(tokens,)` share of each token in a mean over the real tokens: `token_weight` (1 real, 0 padding) divided by
    the number of real tokens (0 everywhere if there is none), in `dtype`."""
    weight = token_weight.to(dtype)
    return weight / weight.sum().clamp_min(1.0)


def _token_mean(values: torch.Tensor, token_share: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the token dimension (dim 0) of `(tokens,)` or `(tokens, E)` values, over the real tokens only."""
    if token_share is None:
        return values.mean(dim=0)
    return token_share @ values


def expert_load(selected: torch.Tensor, token_share: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of the routing decisions that went to each expert, `(num_experts,)`, summing to 1."""
    load = _token_mean(selected.to(torch.float32 if token_share is None else token_share.dtype), token_share)
    return load / load.sum().clamp_min(torch.finfo(load.dtype).tiny)


def mean_gate(gates: torch.Tensor, token_share: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean gate weight of each expert over the tokens, `(num_experts,)`."""
    return _token_mean(gates, token_share)


def load_balancing_loss(
    probs: torch.Tensor, load: torch.Tensor, token_share: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss `E * sum_e f_e * P_e` (arXiv 2101.03961, eq. 4).

    `f_e = load[e]` is the fraction of routing decisions sent to expert `e` ([`expert_load`], not differentiable; the
    layer computes it once for the loss and its statistics) and `P_e` the mean router
    probability of `e`. It equals 1 when routing is uniform and grows as it collapses. With top-k routing `f_e` counts
    all k choices, normalised so that the balanced value stays 1 for every k.
    """
    num_experts = probs.shape[-1]
    return num_experts * (load * _token_mean(probs, token_share)).sum()


def router_z_loss(logits: torch.Tensor, token_share: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss `mean_t logsumexp(logits_t)^2` (arXiv 2202.08906, eq. 5)."""
    return _token_mean(torch.logsumexp(logits, dim=-1).square(), token_share)


def gate_balance_loss(gates: torch.Tensor, token_share: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoLE gating-balance loss `-log prod_e q_e = -sum_e log q_e` (arXiv 2404.13628, eq. 14-16).

    `q_e` is the mean gate weight of expert `e` over the batch. The loss is differentiable with respect to the gates
    (unlike the released MoLE code) and is minimal when every expert gets the same mean weight.
    """
    mean = mean_gate(gates, token_share)
    return -torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny)).sum()


def router_entropy(probs: torch.Tensor, token_share: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean entropy (nats) of the per-token router distribution (`entr(p) = -p log p`, 0 at p = 0)."""
    return _token_mean(torch.special.entr(probs).sum(dim=-1), token_share)


def expert_contrastive_loss(
    h: torch.Tensor,
    lora_B: torch.Tensor,
    selected: torch.Tensor,
    temperature: float,
    token_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """InfoNCE contrastive loss over expert outputs (MoELoRA, arXiv 2402.12851), computed in rank space.

    Let `y[t, e] = B_e h[t, e]` be the output of expert `e` for token `t` and `u[t, e] = y / sqrt(|y|^2 + c^2)` its
    (softly) normalised direction, where the floor `c = CONTRASTIVE_NORM_FLOOR * rms_{t,e} |h[t, e]|` keeps the
    gradient bounded while the experts are still near zero (B starts at 0). For every
    selected pair `(t, e)` the positive is the prototype of the same expert, `p_e = normalize(mean_t u[t, e])` over the
    tokens routed to `e`, and the negatives are the prototypes of the other experts that received tokens:

        loss = mean_{(t, e) selected} -log softmax_f(<u[t, e], p_f> / temperature)[e]

    This pulls each expert's outputs together and pushes different experts apart, so experts learn distinct
    features. All inner products are taken through the Gram matrix `B_e^T B_f` (`(E, r, E, r)`), so the
    `(tokens, E, out)` expert outputs are never materialised: the cost is `O(tokens * E^2 * r)` instead of
    `O(tokens * E * out)`.

    It runs in float32 (float64 for float64 inputs), autocast or not, as one autograd node with a hand-written
    backward pass (see [`_ExpertContrastive`]), which keeps nothing per token for the backward pass but `h`, which
    the expert up-projection keeps anyway, and the `(E,)` pair weights.

    Args:
        h: `(tokens, E, r)` expert inputs `A_e x_t` (before gating and scaling).
        lora_B: `(E, out, r)` stacked B matrices.
        selected: `(tokens, E)` bool, the pairs that take part (top-k selection).
        temperature: InfoNCE temperature.
        token_weight: `(tokens,)` 1 for real tokens, 0 for padding.
    """
    dtype = torch.promote_types(h.dtype, torch.float32)
    if h.shape[1] < 2:
        return h.new_zeros((), dtype=dtype)
    pair_weight = selected.T.to(dtype)  # (E, tokens), expert-major like every per-pair tensor below
    if token_weight is not None:
        pair_weight = pair_weight * token_weight.to(dtype)
    return _ExpertContrastive.apply(h, lora_B, pair_weight, float(temperature))


def _gram(lora_B: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(F, G, D)`: `F = [B_1 ... B_E]` `(out, E*r)`, the Gram matrix `G[e, :, f, :] = B_e^T B_f` `(E, r, E, r)` and
    its diagonal blocks `D[e] = B_e^T B_e` `(E, r, r)`, in `dtype`."""
    num_experts, _, rank = lora_B.shape
    flat_B = lora_B.to(dtype).permute(1, 0, 2).flatten(1)
    gram = (flat_B.T @ flat_B).view(num_experts, rank, num_experts, rank)
    return flat_B, gram, gram.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _expert_major(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(tokens, E, r)` -> `(E, r, tokens)` in `dtype`, contiguous: the layout of the per-token work of
    [`_ExpertContrastive`], where every product is a `bmm` and the softmax over experts runs over a middle dimension
    (on CPU a softmax over a last dimension of size E is ~20x slower)."""
    return h.to(dtype).permute(1, 2, 0).contiguous()


def _normalised(
    h: torch.Tensor, gram_diag: torch.Tensor, floor_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(D h, scale, u)` for the expert-major `(E, r, tokens)` inputs `h`: `scale = (|B_e h|^2 + c^2)^-1/2`
    `(E, tokens)` and the softly normalised expert outputs `u = scale * h`, in the basis of each `B_e`."""
    gram_h = torch.bmm(gram_diag, h)
    scale = ((gram_h * h).sum(1) + floor_sq).clamp_min(1e-12).rsqrt()
    return gram_h, scale, h * scale.unsqueeze(1)


def _similarities(
    unit: torch.Tensor, gram: torch.Tensor, proto: torch.Tensor, count: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B_e^T p_f (E, r, E), <u[t, e], p_f> / temperature (E, E, tokens))`; experts without tokens have no prototype
    and are no negatives (their similarity is the dtype's minimum)."""
    gram_proto = (gram * proto).sum(-1)  # sum_s G[e, r, f, s] p[f, s]
    no_token = ((count == 0).to(unit.dtype) * torch.finfo(unit.dtype).min).view(1, -1, 1)
    return gram_proto, torch.baddbmm(no_token, gram_proto.transpose(1, 2), unit, alpha=1.0 / temperature)


class _ExpertContrastive(torch.autograd.Function):
    """[`expert_contrastive_loss`] of `(h, lora_B, pair_weight (E, tokens), temperature)` with its gradient by hand.

    Autograd over the formula records every elementwise step of the normalisations, the prototypes and the softmax,
    each with a backward node and its saved tensors: 0.6-1 KiB per token and layer in float32 with E=8, r=8, which
    made the contrastive loss the largest part of a MOELORA layer's activation memory. This saves `h`, `B`, the pair
    weights and `(E, r)`-sized tensors only, recomputes the per-token quantities in the backward pass (two batched
    matmuls and the softmax), and applies the chain rule by hand in the expert-major layout (see [`_expert_major`]).
    The floor `c^2` is a constant (the loss computes it from `h` detached). `tests/test_layer.py` checks value and
    gradients against a float64 reference that materialises every expert output.
    """

    @staticmethod
    def forward(ctx, h, lora_B, pair_weight, temperature):
        with torch.autocast(device_type=h.device.type, enabled=False):
            dtype = pair_weight.dtype
            h_e = _expert_major(h, dtype)
            _, gram, gram_diag = _gram(lora_B, dtype)
            floor_sq = CONTRASTIVE_NORM_FLOOR**2 * h_e.square().sum(1).mean()
            count = pair_weight.sum(-1)  # (E,) weighted number of tokens routed to each expert
            unit = _normalised(h_e, gram_diag, floor_sq)[2]
            # Prototypes: the mean direction of each expert's tokens, softly normalised.
            mean = torch.bmm(unit, pair_weight.unsqueeze(-1)).squeeze(-1) / count.clamp_min(1.0).unsqueeze(-1)
            gram_mean = torch.bmm(gram_diag, mean.unsqueeze(-1)).squeeze(-1)  # (E, r)
            proto_scale = ((gram_mean * mean).sum(-1) + CONTRASTIVE_NORM_FLOOR**2).rsqrt()  # (E,)
            sim = _similarities(unit, gram, mean * proto_scale.unsqueeze(-1), count, temperature)[1]
            own = sim.log_softmax(1).diagonal(dim1=0, dim2=1)  # (tokens, E): log p(the pair's own expert)
            total_weight = pair_weight.sum().clamp_min(1.0)
            loss = -(own * pair_weight.T).sum() / total_weight
        ctx.save_for_backward(h, lora_B, pair_weight, mean, proto_scale, floor_sq, total_weight)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, lora_B, pair_weight, mean, proto_scale, floor_sq, total_weight = ctx.saved_tensors
        temperature = ctx.temperature
        with torch.autocast(device_type=h.device.type, enabled=False):
            dtype = pair_weight.dtype
            num_experts, out_features, rank = lora_B.shape
            h_e = _expert_major(h, dtype)
            flat_B, gram, gram_diag = _gram(lora_B, dtype)
            count = pair_weight.sum(-1)
            proto = mean * proto_scale.unsqueeze(-1)
            gram_h, scale, unit = _normalised(h_e, gram_diag, floor_sq)
            gram_proto, sim = _similarities(unit, gram, proto, count, temperature)

            # Cross entropy: d loss / d sim[e, f, t] = w[e, t] / W * (softmax(sim[e, :, t])[f] - [f == e]).
            pair_grad = (grad.to(dtype) / (total_weight * temperature)) * pair_weight  # (E, tokens), 1/T folded in
            grad_sim = sim.softmax(1) * pair_grad.unsqueeze(1)
            grad_sim.diagonal(dim1=0, dim2=1).sub_(pair_grad.T)
            grad_unit = torch.bmm(gram_proto, grad_sim)  # (E, r, tokens)
            grad_gram_proto = torch.bmm(unit, grad_sim.transpose(1, 2))  # (E, r, E)
            grad_gram = grad_gram_proto.unsqueeze(-1) * proto  # (E, r, E, r): d loss / d G[e, r, f, s]
            grad_proto = (gram * grad_gram_proto.unsqueeze(-1)).sum((0, 1))  # (E, r)

            # proto = mean * (mean^T D mean + c0^2)^-1/2
            gram_mean = torch.bmm(gram_diag, mean.unsqueeze(-1)).squeeze(-1)
            proto_term = proto_scale.pow(3) * (grad_proto * mean).sum(-1)  # (E,)
            grad_mean = proto_scale.unsqueeze(-1) * grad_proto - proto_term.unsqueeze(-1) * gram_mean
            grad_diag = -0.5 * proto_term.view(-1, 1, 1) * mean.unsqueeze(-1) * mean.unsqueeze(1)  # (E, r, r)
            # mean[e] = sum_t w[e, t] u[t, e] / count[e]
            token_share = pair_weight / count.clamp_min(1.0).unsqueeze(-1)
            grad_unit = torch.baddbmm(grad_unit, grad_mean.unsqueeze(-1), token_share.unsqueeze(1))
            # u = h * (h^T D h + c^2)^-1/2
            unit_term = scale.pow(3) * (grad_unit * h_e).sum(1)  # (E, tokens)
            grad_diag = torch.baddbmm(grad_diag, h_e * unit_term.unsqueeze(1), h_e.transpose(1, 2), alpha=-0.5)
            grad_gram.diagonal(dim1=0, dim2=2).add_(grad_diag.permute(1, 2, 0))

            grad_h = grad_B = None
            if ctx.needs_input_grad[0]:
                grad_h = scale.unsqueeze(1) * grad_unit - unit_term.unsqueeze(1) * gram_h
                grad_h = grad_h.permute(2, 0, 1).to(h.dtype)
            if ctx.needs_input_grad[1]:
                grad_gram = grad_gram.view(num_experts * rank, num_experts * rank)
                grad_flat_B = flat_B @ (grad_gram + grad_gram.T)  # G = F^T F
                grad_B = grad_flat_B.view(out_features, num_experts, rank).permute(1, 0, 2).to(lora_B.dtype)
        return grad_h, grad_B, None, None
