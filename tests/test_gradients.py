"""Exact gradients when several forwards share one backward, in every gradient-checkpointing mode.

Loops with more than one forward per backward are common (a pairwise or contrastive loss, two micro-batches summed,
a multi-task sum). Under gradient checkpointing every checkpointed layer is recomputed during the backward pass and
must find the forward it belongs to: its padding mask and, under reentrant checkpointing, the gradient that reached
that forward's `aux_loss`. Reference: the same losses without checkpointing, in float64.
"""

import copy
import itertools
import warnings
from functools import partial

import pytest
import torch
from peft import get_peft_model
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from moe_peft_plugin import AmbiguousRecomputationError, MoeLoraConfig

from .helpers import build_tiny_llama


TEXTS = [
    ["the cat sat on the mat", "experts learn distinct features when a loss pushes them apart"],
    ["a mixture of experts routes every token", "the quick brown fox"],
    ["low rank adapters train small matrices next to frozen weights", "the dog"],
]
WEIGHTS = [0.3, 0.7, 0.45]
MODES = {
    "none": None,
    "non-reentrant": {"use_reentrant": False},
    "reentrant": {"use_reentrant": True},
}


@pytest.fixture(scope="module")
def setup():
    base, tokenizer = build_tiny_llama(seed=0, num_layers=2)
    torch.manual_seed(1)
    config = MoeLoraConfig(
        r=4,
        num_experts=4,
        top_k=2,
        target_modules=["q_proj", "v_proj", "down_proj"],
        aux_loss_coef=0.5,
        router_z_loss_coef=0.01,
        contrastive_loss_coef=0.1,
        init_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config).double()
    return model, tokenizer


def _batches(tokenizer, num_forwards, same_padding):
    batches = []
    for i in range(num_forwards):
        texts = TEXTS[0] if same_padding else TEXTS[i]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def _gradients(model, batches, mode):
    model = copy.deepcopy(model)
    model.train()
    if mode is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=mode)
    embed = model.get_input_embeddings()
    embeds, total = [], 0.0
    for weight, inputs in zip(WEIGHTS, batches):
        x = embed(inputs["input_ids"]).detach().requires_grad_()
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        out = model(inputs_embeds=x, attention_mask=inputs["attention_mask"], labels=labels, use_cache=False)
        embeds.append(x)
        total = total + weight * out.loss
    total.backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    grads.update({f"input{i}": x.grad.clone() for i, x in enumerate(embeds)})
    return grads


CASES = list(itertools.product([1, 2, 3], ["same", "different"], ["non-reentrant", "reentrant"]))


@pytest.mark.parametrize("num_forwards,padding,mode", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_gradients_exact_for_any_number_of_forwards(setup, num_forwards, padding, mode):
    model, tokenizer = setup
    batches = _batches(tokenizer, num_forwards, padding == "same")
    reference = _gradients(model, batches, MODES["none"])
    got = _gradients(model, batches, MODES[mode])
    _assert_equal_gradients(got, reference)
    kinds = {"moelora_router": 0, "moelora_A": 0, "moelora_B": 0, "input": 0}
    for key, value in reference.items():
        for kind in kinds:
            kinds[kind] += kind in key and bool(value.abs().sum() > 0)
    assert all(kinds.values()), kinds  # every kind of gradient is checked, and is not zero


def _wrap_decoder_layers(model, impl):
    """Checkpointing that MOELORA does not see being set up (as FSDP's `apply_activation_checkpointing` does it)."""
    decoder_layer_cls = type(model.base_model.model.model.layers[0])
    apply_activation_checkpointing(
        model.base_model.model.model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=impl),
        check_fn=lambda module: isinstance(module, decoder_layer_cls),
    )
    return model


def _assert_equal_gradients(got, reference):
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)


IMPLS = {"non-reentrant": CheckpointImpl.NO_REENTRANT, "reentrant": CheckpointImpl.REENTRANT}


@pytest.mark.parametrize("impl", IMPLS, ids=list(IMPLS))
def test_foreign_checkpointing_is_exact_or_refuses(setup, impl):
    """Checkpointing applied by hand: exact where one forward is possible, a clear error where the forwards differ."""
    model, tokenizer = setup
    wrapped = _wrap_decoder_layers(copy.deepcopy(model), IMPLS[impl])
    one = _batches(tokenizer, 1, same_padding=False)
    _assert_equal_gradients(_gradients(wrapped, one, None), _gradients(model, one, None))
    with pytest.raises(AmbiguousRecomputationError, match="gradient_checkpointing_enable"):
        _gradients(wrapped, _batches(tokenizer, 2, same_padding=False), None)
    same = _batches(tokenizer, 2, same_padding=True)
    if impl == "non-reentrant":  # only the padding mask matters, and it is the same
        _assert_equal_gradients(_gradients(wrapped, same, None), _gradients(model, same, None))
    else:  # each forward's loss scale matters
        with pytest.raises(AmbiguousRecomputationError):
            _gradients(wrapped, same, None)


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_warns_once_when_router_losses_get_no_gradient(setup, mode):
    """A loss built from the logits alone (as `trl.SFTTrainer` builds its own) silently drops the router losses."""
    model, tokenizer = setup
    model = copy.deepcopy(model)
    model.train()
    if MODES[mode] is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=MODES[mode])
        model.enable_input_require_grads()
    inputs = _batches(tokenizer, 1, same_padding=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()  # includes aux_loss: silent
    with pytest.warns(UserWarning, match="MoeLoraSFTTrainer") as record:
        for _ in range(2):
            model(**inputs, use_cache=False).logits.float().pow(2).mean().backward()
    assert sum("outputs.aux_loss" in str(w.message) for w in record) == 1  # once, not at every step

    # No router losses: nothing is lost, nothing to say.
    model.base_model.set_router_loss_coefficients(
        aux_loss_coef=0.0, router_z_loss_coef=0.0, contrastive_loss_coef=0.0, gate_balance_loss_coef=0.0
    )
    fresh = copy.deepcopy(model)
    fresh.base_model._routing_state.warned_no_router_loss_gradient = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fresh(**inputs, use_cache=False).logits.float().pow(2).mean().backward()
