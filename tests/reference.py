"""Plain, loop-based reference implementations of the MOELORA math, used to check the fast paths (in float64)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F  # noqa: F401

from moe_peft_plugin.losses import CONTRASTIVE_NORM_FLOOR


def reference_gates(x, router, top_k, router_type, temperature=1.0, expert_mask=None):
    """Per-token loop: softmax over (masked) logits, then top-k renormalised (raw prob for k=1) or dense."""
    logits = (x @ router.T) / temperature
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask, float("-inf"))
    probs = logits.softmax(-1)
    num_experts = router.shape[0]
    gates = torch.zeros_like(probs)
    for t in range(x.shape[0]):
        if router_type == "soft" or top_k >= num_experts:
            gates[t] = probs[t]
            continue
        order = sorted(range(num_experts), key=lambda e: -logits[t, e].item())[:top_k]
        weight = probs[t, order]
        if top_k > 1:
            weight = weight / weight.sum()
        for e, w in zip(order, weight):
            gates[t, e] = w
    return gates, probs, logits


def reference_layer(x, weight, lora_A, lora_B, router, top_k, router_type, scaling, temperature=1.0, expert_mask=None):
    """base(x) + scaling * sum_e gate_e(x) * B_e A_e x, one expert at a time."""
    gates, probs, logits = reference_gates(x, router, top_k, router_type, temperature, expert_mask)
    out = x @ weight.T
    for e in range(lora_A.shape[0]):
        out = out + scaling * gates[:, e : e + 1] * (x @ lora_A[e].T @ lora_B[e].T)
    return out, gates, probs, logits


def reference_load_balancing(probs, gates, token_weight=None):
    num_experts = probs.shape[-1]
    keep = torch.ones(probs.shape[0], dtype=torch.bool) if token_weight is None else token_weight.bool()
    selected = (gates > 0).float()[keep]
    f = selected.sum(0) / selected.sum()
    p = probs[keep].mean(0)
    return num_experts * (f * p).sum()


def reference_contrastive(x, lora_A, lora_B, selected, temperature, token_weight: Optional[torch.Tensor] = None):
    """InfoNCE against per-expert prototypes, materialising every expert output (tokens, E, out)."""
    num_experts = lora_A.shape[0]
    outputs = torch.stack([x @ lora_A[e].T @ lora_B[e].T for e in range(num_experts)], dim=1)
    inputs = torch.stack([x @ lora_A[e].T for e in range(num_experts)], dim=1)  # (tokens, E, r)
    floor_sq = CONTRASTIVE_NORM_FLOOR**2 * inputs.detach().square().sum(-1).mean()
    unit = outputs / (outputs.square().sum(-1, keepdim=True) + floor_sq).sqrt()
    keep = selected.clone()
    if token_weight is not None:
        keep &= token_weight.bool().unsqueeze(-1)
    protos = {}
    for e in range(num_experts):
        rows = unit[keep[:, e], e]
        if len(rows):
            mean = rows.mean(0)
            protos[e] = mean / (mean.square().sum() + CONTRASTIVE_NORM_FLOOR**2).sqrt()
    active = sorted(protos)
    losses = []
    for t in range(x.shape[0]):
        for e in range(num_experts):
            if keep[t, e]:
                sims = torch.stack([unit[t, e] @ protos[f] for f in active]) / temperature
                losses.append(-torch.log_softmax(sims, dim=0)[active.index(e)])
    return torch.stack(losses).mean() if losses else x.new_zeros(())


def reference_training_layer(
    x,
    weight,
    lora_A,
    lora_B,
    router,
    top_k,
    router_type,
    scaling,
    temperature=1.0,
    expert_mask=None,
    token_weight=None,
    dropout_mask=None,
    jitter=None,
    noise=None,
    contrastive_temperature=0.1,
):
    """A training forward of one layer, one token and one expert at a time: output, router losses and statistics.

    `dropout_mask` multiplies the expert input only, `jitter` the router input only, and `noise` is added to the
    logits for the top-k selection only. Returns `(output, losses, stats)`; `losses` maps each loss name of the layer
    to its unweighted value, `stats` holds `expert_load`, `mean_gate`, `entropy` and `num_tokens`.
    """
    num_tokens, num_experts = x.shape[0], lora_A.shape[0]
    expert_in = x if dropout_mask is None else x * dropout_mask
    router_in = x if jitter is None else x * jitter
    logits = (router_in @ router.T) / temperature
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask, float("-inf"))
    probs = logits.softmax(-1)
    scores = logits if noise is None else logits + noise
    gates = torch.zeros_like(probs)
    selected = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    dense = router_type == "soft" or top_k >= num_experts
    for t in range(num_tokens):
        if dense:
            gates[t] = probs[t]
            if router_type == "soft":
                selected[t, probs[t].argmax()] = True
            else:
                selected[t] = True if expert_mask is None else expert_mask
            continue
        order = sorted(range(num_experts), key=lambda e: -scores[t, e].item())[:top_k]
        chosen = probs[t, order]
        if top_k > 1:
            chosen = chosen / chosen.sum()
        for e, w in zip(order, chosen):
            gates[t, e] = w
            selected[t, e] = True
    out = x @ weight.T
    for e in range(num_experts):
        out = out + scaling * gates[:, e : e + 1] * (expert_in @ lora_A[e].T @ lora_B[e].T)

    keep = torch.ones(num_tokens, dtype=torch.bool) if token_weight is None else token_weight.bool()
    count = selected[keep].double().sum(0)
    mean_gate = gates[keep].mean(0)
    finite = logits[keep].masked_fill(~torch.isfinite(logits[keep]), torch.finfo(logits.dtype).min)
    losses = {
        "load_balancing": num_experts * (count / count.sum() * probs[keep].mean(0)).sum(),
        "router_z": torch.logsumexp(finite, -1).square().mean(),
        "gate_balance": -torch.log(mean_gate.clamp_min(torch.finfo(mean_gate.dtype).tiny)).sum(),
        "contrastive": reference_contrastive(
            expert_in, lora_A, lora_B, selected, contrastive_temperature, None if token_weight is None else keep
        ),
    }
    p = probs[keep]
    stats = {
        "expert_load": count / count.sum(),
        "mean_gate": mean_gate,
        "entropy": -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1).mean(),
        "num_tokens": keep.sum().double(),
    }
    return out, losses, stats
