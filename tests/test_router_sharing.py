"""`router_sharing`: sibling projections share one router. The reference is the same model without sharing in which
every member of a group holds an identical copy of the group's router: outputs, router losses, statistics and
gradients (summed over the copies) must match it exactly, in training, evaluation, decoding and mixed batches."""

import pytest
import torch
from peft import get_peft_model

from moe_peft_plugin import MoeLoraConfig, MoeLoraLayer

from .helpers import batch, build_tiny_llama


KWARGS = {
    "num_experts": 4,
    "top_k": 2,
    "target_modules": "all-linear",
    "contrastive_loss_coef": 0.1,
    "router_z_loss_coef": 0.01,
    "aux_loss_coef": 0.05,
    "init_weights": False,
    "task_type": "CAUSAL_LM",
}
# True: q/k/v and gate/up read one input each. The second grouping puts q_proj with o_proj, which reads another tensor
# (the attention output): o_proj must route its own input with q_proj's router.
GROUPINGS = {"default": True, "different-inputs": [["q_proj", "o_proj"], ["gate_proj", "up_proj"]]}


def _layers(model) -> dict[str, MoeLoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MoeLoraLayer)}


def _shared_and_tied(router_sharing, **kwargs):
    """The model with `router_sharing` and its reference: no sharing, each member holding a copy of its group's router."""
    base, tokenizer = build_tiny_llama(seed=0)
    torch.manual_seed(1)
    shared = get_peft_model(base.double(), MoeLoraConfig(router_sharing=router_sharing, **{**KWARGS, **kwargs}))
    base, _ = build_tiny_llama(seed=0)
    tied = get_peft_model(base.double(), MoeLoraConfig(**{**KWARGS, **kwargs}))
    shared_layers, tied_layers = _layers(shared), _layers(tied)
    with torch.no_grad():
        for name, layer in shared_layers.items():
            owner = layer.router_owner.get("default", layer)
            tied_layers[name].moelora_A["default"].copy_(layer.moelora_A["default"])
            tied_layers[name].moelora_B["default"].copy_(layer.moelora_B["default"])
            tied_layers[name].moelora_router["default"].copy_(owner.moelora_router["default"])
    return shared, tied, tokenizer


def _owner_names(model) -> dict[str, str]:
    """Each MOELORA layer's name -> the name of the layer holding its router."""
    layers = _layers(model)
    names = {module: name for name, module in layers.items()}
    return {name: names[layer.router_owner.get("default", layer)] for name, layer in layers.items()}


def _router_grads_summed_by_owner(tied, owners) -> dict[str, torch.Tensor]:
    summed: dict[str, torch.Tensor] = {}
    for name, layer in _layers(tied).items():
        grad = layer.moelora_router["default"].grad
        summed[owners[name]] = grad.clone() if owners[name] not in summed else summed[owners[name]] + grad
    return summed


@pytest.mark.parametrize("router_sharing", list(GROUPINGS.values()), ids=list(GROUPINGS))
def test_shared_router_equals_tied_copies_over_two_training_steps(router_sharing):
    shared, tied, tokenizer = _shared_and_tied(router_sharing)
    owners = _owner_names(shared)
    num_routers = sum(1 for name, owner in owners.items() if name == owner)
    if router_sharing is True:
        assert num_routers == 4 * 4  # q(kv), o, gate(up), down in 4 blocks, instead of 7 per block
    else:
        assert num_routers == 5 * 4
    saved = [key for key in shared.state_dict() if "moelora_router" in key]
    assert len(saved) == num_routers
    inputs = batch(tokenizer)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (shared, tied)]
    shared.train(), tied.train()
    for _ in range(2):  # the second step routes with updated routers: nothing of the first forward may be reused
        outputs = [m(**inputs, labels=inputs["input_ids"]) for m in (shared, tied)]
        torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=0, atol=1e-12)
        torch.testing.assert_close(outputs[0].aux_loss, outputs[1].aux_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(outputs[0].loss, outputs[1].loss, rtol=1e-12, atol=0)
        stats = [m.base_model.get_routing_stats() for m in (shared, tied)]
        assert stats[0].keys() == stats[1].keys() and len(stats[0]) == len(owners)
        for name in stats[0]:
            got, want = stats[0][name]["default"], stats[1][name]["default"]
            torch.testing.assert_close(got.expert_load, want.expert_load, rtol=0, atol=1e-12)
            torch.testing.assert_close(got.entropy, want.entropy, rtol=0, atol=1e-12)
            assert got.losses.keys() == want.losses.keys() == {"load_balancing", "router_z", "contrastive"}
            for loss_name in got.losses:
                torch.testing.assert_close(got.losses[loss_name], want.losses[loss_name], rtol=1e-12, atol=0)
        for optimizer, output in zip(optimizers, outputs):
            optimizer.zero_grad()
            output.loss.backward()
        tied_layers = _layers(tied)
        router_grads = _router_grads_summed_by_owner(tied, owners)
        for name, layer in _layers(shared).items():
            for tensor in ("moelora_A", "moelora_B"):
                got, want = getattr(layer, tensor)["default"].grad, getattr(tied_layers[name], tensor)["default"].grad
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
            if owners[name] == name:
                got = layer.moelora_router["default"].grad
                torch.testing.assert_close(got, router_grads[name], rtol=1e-10, atol=1e-14)
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():  # keep the copies identical: the reference applies each copy's part of the gradient
            for name, layer in tied_layers.items():
                layer.moelora_router["default"].copy_(_layers(shared)[owners[name]].moelora_router["default"])


@pytest.mark.parametrize("router_sharing", list(GROUPINGS.values()), ids=list(GROUPINGS))
@pytest.mark.parametrize(
    "temperature_and_mask", [False, True], ids=["fixed-temperature", "learned-temperature-masked"]
)
def test_shared_router_equals_tied_copies_in_evaluation_decoding_and_mixed_batches(
    router_sharing, temperature_and_mask
):
    # A learned temperature is the owner's (a layer routing its own input with it must take it from the owner);
    # the expert mask must reach every member.
    extra = {"learn_router_temperature": True, "router_temperature": 0.7} if temperature_and_mask else {}
    shared, tied, tokenizer = _shared_and_tied(router_sharing, **extra)
    if temperature_and_mask:
        with torch.no_grad():
            for n, temperature in enumerate(_layers(shared)[name].moelora_log_temperature["default"]
                                            for name in set(_owner_names(shared).values())):  # fmt: skip
                temperature.fill_(0.3 + 0.01 * n)  # distinct per group, not the initial value
            for name, layer in _layers(shared).items():
                owner = layer.router_owner.get("default", layer)
                _layers(tied)[name].moelora_log_temperature["default"].copy_(owner.moelora_log_temperature["default"])
        for model in (shared, tied):
            model.base_model.set_expert_mask([0, 2, 3])
    inputs = batch(tokenizer)
    shared.eval(), tied.eval()
    with torch.no_grad():
        want = tied(**inputs).logits
        torch.testing.assert_close(shared(**inputs).logits, want, rtol=0, atol=1e-12)
        with shared.base_model.inference_only():
            torch.testing.assert_close(shared(**inputs).logits, want, rtol=0, atol=1e-12)
        mixed = shared(**inputs, adapter_names=["default", "__base__"]).logits
        torch.testing.assert_close(mixed[0], want[0], rtol=0, atol=1e-12)
    # Under inference mode (evaluation loops, `collect_task_routing`) the layer inputs are inference tensors, which
    # keep no version counter: the shared routing must still be found, with and without a routing context.
    with torch.inference_mode():
        torch.testing.assert_close(shared(**inputs).logits, want, rtol=0, atol=1e-12)
        with shared.base_model.inference_only():
            torch.testing.assert_close(shared(**inputs).logits, want, rtol=0, atol=1e-12)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(shared.generate(**inputs, **options), tied.generate(**inputs, **options))
    with torch.inference_mode():
        assert torch.equal(shared.generate(**inputs, **options), tied.generate(**inputs, **options))


def test_router_sharing_with_a_second_adapter_and_delete():
    base, tokenizer = build_tiny_llama(seed=0)
    model = get_peft_model(base, MoeLoraConfig(router_sharing=True, **KWARGS))
    model.add_adapter("plain", MoeLoraConfig(**KWARGS))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    assert k_proj.router_owner == {"default": q_proj} and "plain" in k_proj.moelora_router
    inputs = batch(tokenizer)
    for name in ("plain", "default"):
        model.set_adapter(name)
        assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)
    model.delete_adapter("default")
    assert k_proj.router_owner == {} and q_proj._router_users == {"plain": 1}
    assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)


@pytest.mark.parametrize(
    "value,message",
    [
        ("q_proj", "must be a bool or a list of groups"),
        ([["q_proj"]], "at least two module names"),
        ([["q_proj", "k_proj"], ["k_proj", "v_proj"]], "may appear once"),
        ([["self_attn.q_proj", "self_attn.k_proj"]], "without dots"),
        ([], "must be a bool or a list of groups"),
    ],
)
def test_bad_router_sharing_values_are_refused(value, message):
    with pytest.raises(ValueError, match=rf"`router_sharing`.*{message}"):
        MoeLoraConfig(router_sharing=value)


def test_router_sharing_that_groups_nothing_or_mismatched_layers_is_refused():
    base, _ = build_tiny_llama(seed=0)
    config = MoeLoraConfig(router_sharing=True, target_modules=["o_proj", "down_proj"])
    with pytest.raises(ValueError, match="nothing would share a router"):
        get_peft_model(base, config)
    base, _ = build_tiny_llama(seed=0)
    config = MoeLoraConfig(router_sharing=[["gate_proj", "down_proj"]], target_modules=["gate_proj", "down_proj"])
    with pytest.raises(ValueError, match="same `num_experts`, `top_k` and input size"):
        get_peft_model(base, config)


def test_router_sharing_round_trips_through_the_saved_config(tmp_path):
    groups = [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]
    config = MoeLoraConfig(router_sharing=groups)
    config.save_pretrained(tmp_path)
    loaded = MoeLoraConfig.from_pretrained(tmp_path)
    assert loaded.router_sharing == groups
    assert MoeLoraConfig(router_sharing=(("q_proj", "k_proj"),)).router_sharing == [["q_proj", "k_proj"]]


@pytest.mark.parametrize("router_sharing", list(GROUPINGS.values()), ids=list(GROUPINGS))
def test_routing_runs_once_per_router_and_input_tensor(router_sharing, monkeypatch):
    import moe_peft_plugin.layer as layer_module

    calls = {"route": 0, "inference_routing": 0}
    for function in calls:
        original = getattr(layer_module, function)

        def counted(*args, _original=original, _name=function, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(layer_module, function, counted)
    # With noisy top-k every routing call draws its own noise: members that reused nothing would disagree.
    shared, _, tokenizer = _shared_and_tied(router_sharing, router_noise_std=1.0)
    inputs = batch(tokenizer)
    routed_per_block = 4 if router_sharing is True else 6  # q(kv), o, gate(up), down; or q, k, v, o(own input), ...
    shared.train()
    shared(**inputs, labels=inputs["input_ids"])
    assert calls == {"route": 4 * routed_per_block, "inference_routing": 0}
    stats = shared.base_model.get_routing_stats()
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        members = [name for name in stats if name.rsplit(".", 1)[-1] in group and ".layers.2." in name]
        loads = [stats[name]["default"].expert_load for name in members]
        if router_sharing is True or "gate_proj" in group:
            assert all(torch.equal(load, loads[0]) for load in loads)
    shared.eval()
    with torch.no_grad(), shared.base_model.inference_only():
        shared(**inputs)
    assert calls["inference_routing"] == 4 * routed_per_block
