"""Router losses of MOELORA as pure functions of one layer's routing (float32).

Padding never counts: the means over tokens take an optional `token_share` of shape `(tokens,)`, the share of each token
in the mean (`token_shares`: 1 / number of real tokens for real tokens, 0 for padding), so that a mean is one matmul and
a layer normalises its padding mask once for all its losses and statistics. Nothing has a data-dependent shape (no
boolean indexing), so nothing forces a host-device synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


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
    index: Optional[torch.Tensor] = None,
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
    `O(tokens * E * out)`, and `O(tokens * k * E * r)` when `index` lists the `k` selected experts of each token.

    Args:
        h: `(tokens, E, r)` expert inputs `A_e x_t` (before gating and scaling).
        lora_B: `(E, out, r)` stacked B matrices.
        selected: `(tokens, E)` bool, the pairs that take part (top-k selection).
        temperature: InfoNCE temperature.
        token_weight: `(tokens,)` 1 for real tokens, 0 for padding.
        index: `(tokens, k)` the selected experts of each token (`Routing.index`), if `selected` is exactly these
            pairs: the loss is then computed on the selected pairs only (the same value in `k / E` of the work).
    """
    if h.shape[1] < 2:
        return h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    dtype = torch.promote_types(h.dtype, torch.float32)
    h = h.to(dtype)
    lora_B = lora_B.to(dtype)
    num_experts, _, rank = lora_B.shape
    flat_B = lora_B.permute(1, 0, 2).flatten(1)  # (out, E*r)
    gram = (flat_B.T @ flat_B).view(num_experts, rank, num_experts, rank)  # (E, r, E, r): B_e^T B_f
    gram_diag = gram.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (E, r, r): B_e^T B_e
    tiny = 1e-12
    # A plain normalisation has a gradient of 1/|y|, which explodes while the experts are still ~0 (B starts at 0):
    # the norm gets a floor proportional to the expert inputs (all pairs), so the loss fades in as the experts grow.
    floor_sq = CONTRASTIVE_NORM_FLOOR**2 * h.detach().square().sum(-1).mean()
    sparse = index is not None and index.shape[1] < num_experts
    if sparse:
        # Only the pairs (t, index[t, j]): (tokens, k, ...) tensors instead of (tokens, E, ...).
        # Products with every expert's matrices are cheap (r x r and r x E); gathering their results rather than the
        # matrices keeps the tensors saved for the backward pass at (tokens, k, r).
        # (Indexing, not `gather`: the backward of `gather` keeps its whole input.)
        target = index.long()
        token = torch.arange(h.shape[0], device=h.device).unsqueeze(-1)
        gram_h = torch.einsum("ter,ers->tes", h, gram_diag)  # (tokens, E, r): B_e^T B_e h[t, e]
        h = h[token, target]  # (tokens, k, r)
        norm_sq = (h * gram_h[token, target]).sum(-1)  # (tokens, k): |y|^2
        pair_weight = torch.ones(target.shape, dtype=dtype, device=h.device)
    else:
        target = torch.arange(num_experts, device=h.device).expand(h.shape[0], -1)
        norm_sq = torch.einsum("ter,ers,tes->te", h, gram_diag, h)  # (tokens, E): |y[t, e]|^2
        pair_weight = selected.to(dtype)
    if token_weight is not None:
        pair_weight = pair_weight * token_weight.to(dtype).unsqueeze(-1)
    h_unit = h * (norm_sq + floor_sq).clamp_min(tiny).rsqrt().unsqueeze(-1)  # coefficients of u in B_e's basis

    if sparse:
        flat_index = target.flatten()
        count = pair_weight.new_zeros(num_experts).index_add(0, flat_index, pair_weight.flatten())  # (E,)
        weighted = (pair_weight.unsqueeze(-1) * h_unit).flatten(0, 1)
        total = h_unit.new_zeros(num_experts, rank).index_add(0, flat_index, weighted)  # (E, r)
    else:
        count = pair_weight.sum(dim=0)  # (E,)
        total = torch.einsum("te,ter->er", pair_weight, h_unit)
    proto = total / count.clamp_min(1.0).unsqueeze(-1)  # (E, r)
    proto_norm_sq = torch.einsum("er,ers,es->e", proto, gram_diag, proto)
    proto = proto * (proto_norm_sq + CONTRASTIVE_NORM_FLOOR**2).clamp_min(tiny).rsqrt().unsqueeze(-1)

    gram_proto = torch.einsum("erfs,fs->erf", gram, proto)  # (E, r, E): B_e^T p_f
    if sparse:  # (tokens, k, E): <u[t, index[t, j]], p_f> / T
        every = torch.einsum("tkr,erf->tkef", h_unit, gram_proto)  # in every expert's basis; keep the pair's own
        sim = every[token, torch.arange(target.shape[1], device=h.device), target] / temperature
    else:  # (tokens, E, E): <u[t, e], p_f> / T
        sim = torch.einsum("ter,erf->tef", h_unit, gram_proto) / temperature
    # Experts that received no token have no prototype and are no negatives.
    sim = sim.masked_fill((count == 0).view(1, 1, -1), torch.finfo(sim.dtype).min)
    nll = F.cross_entropy(sim.flatten(0, 1), target.flatten(), reduction="none").view_as(pair_weight)
    return (nll * pair_weight).sum() / pair_weight.sum().clamp_min(1.0)
