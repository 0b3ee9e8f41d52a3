"""MOELORA on a tiny Llama through the whole peft API. One table of configs; every check runs on every row."""

import copy
import dataclasses
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers.modeling_outputs import CausalLMOutputWithPast

from moe_peft_plugin import MoeLoraConfig, MoeLoraMergeError, RoutingStats, losses
from moe_peft_plugin.evaluation import MCItem

from .helpers import batch, build_tiny_llama


MODEL_CASES = [
    (
        "moelora-contrastive",
        {
            "num_experts": 4,
            "top_k": 2,
            "target_modules": "all-linear",
            "contrastive_loss_coef": 0.1,
            "router_z_loss_coef": 1e-3,
        },
    ),
    ("mola-2-4", {"num_experts": [2, 4], "top_k": [1, 2], "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    (
        "soft-learned-temperature",
        {
            "num_experts": 3,
            "router_type": "soft",
            "learn_router_temperature": True,
            "gate_balance_loss_coef": 0.05,
            "target_modules": ["q_proj", "o_proj", "up_proj"],
        },
    ),
    ("single-expert", {"num_experts": 1, "top_k": 1, "target_modules": ["q_proj", "gate_proj"]}),
    (
        "default-targets-rslora",
        {"num_experts": 2, "top_k": 1, "use_rslora": True, "lora_alpha": 16, "aux_loss_coef": 0.1},
    ),
    (
        "router-sharing",
        {
            "num_experts": 4,
            "top_k": 2,
            "target_modules": "all-linear",
            "router_sharing": True,
            "contrastive_loss_coef": 0.1,
        },
    ),
    (
        "router-sharing-mola-soft",
        {
            "num_experts": [2, 3],
            "router_type": "soft",
            "learn_router_temperature": True,
            "target_modules": ["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
            "router_sharing": [["k_proj", "v_proj"], ["gate_proj", "up_proj"]],
        },
    ),
]
IDS = [case[0] for case in MODEL_CASES]


def _peft_model(kwargs, init_weights=False, adapter_seed=1):
    base, tokenizer = build_tiny_llama(seed=0)
    torch.manual_seed(adapter_seed)
    config = MoeLoraConfig(task_type="CAUSAL_LM", init_weights=init_weights, **kwargs)
    return get_peft_model(base, config), tokenizer


def _lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


@pytest.mark.parametrize("name,kwargs", MODEL_CASES, ids=IDS)
def test_save_and_load_reproduce_outputs(name, kwargs, tiny_model_dir, tmp_path):
    model, tokenizer = _peft_model(kwargs)
    model.eval()
    inputs = batch(tokenizer)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(".moelora_" in key for key in keys)
    assert not any(".default." in key for key in keys), "adapter names are stripped from saved keys"

    for trainable in (False, True):
        base, _ = build_tiny_llama(seed=0)
        loaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=trainable)
        loaded.eval()
        assert loaded.peft_config["default"].peft_type == "MOELORA"
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
        assert any(p.requires_grad for p in loaded.parameters()) == trainable

    # load_adapter: a second adapter next to the first; switching gives each adapter's own outputs.
    other, _ = _peft_model(kwargs, adapter_seed=5)
    other.eval()
    other_logits = other(**inputs).logits
    other.load_adapter(tmp_path, adapter_name="loaded")
    other.set_adapter("loaded")
    torch.testing.assert_close(other(**inputs).logits, expected, rtol=0, atol=0)
    other.set_adapter("default")
    torch.testing.assert_close(other(**inputs).logits, other_logits, rtol=0, atol=0)
    other.delete_adapter("loaded")
    assert "loaded" not in other.peft_config
    torch.testing.assert_close(other(**inputs).logits, other_logits, rtol=0, atol=0)


@pytest.mark.parametrize("name,kwargs", MODEL_CASES, ids=IDS)
def test_disable_unload_and_merge(name, kwargs):
    model, tokenizer = _peft_model(kwargs)
    model.eval()
    inputs = batch(tokenizer)
    base_copy, _ = build_tiny_llama(seed=0)
    base_logits = base_copy(**inputs).logits
    adapted = model(**inputs).logits
    assert not torch.allclose(adapted, base_logits)
    with model.disable_adapter():
        torch.testing.assert_close(model(**inputs).logits, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(model(**inputs).logits, adapted, rtol=0, atol=0)
    with pytest.raises(MoeLoraMergeError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(MoeLoraMergeError):
        model.merge_adapter()
    torch.testing.assert_close(model(**inputs).logits, adapted, rtol=0, atol=0)  # nothing was touched
    unloaded = model.unload()
    assert not any("moelora" in name for name, _ in unloaded.named_parameters())
    torch.testing.assert_close(unloaded(**inputs).logits, base_logits, rtol=0, atol=0)


def test_outputs_survive_flatten_and_rebuild():
    """DDP (find_unused_parameters) and FSDP rebuild the output from its fields: `aux_loss` must be one of them."""
    model, tokenizer = _peft_model(MODEL_CASES[0][1])
    model.train()
    inputs = batch(tokenizer)
    out = model(**inputs, labels=inputs["input_ids"])
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is type(out) and isinstance(out, CausalLMOutputWithPast)
    assert rebuilt.aux_loss is out.aux_loss and rebuilt.loss is out.loss
    assert out.to_tuple()[:2] == (out.loss, out.logits) and out.to_tuple()[-1] is out.aux_loss
    restored = pickle.loads(
        pickle.dumps(out.__class__(**{k: v.detach() for k, v in out.items() if torch.is_tensor(v)}))
    )
    torch.testing.assert_close(restored.aux_loss, out.aux_loss.detach())
    assert isinstance(restored, CausalLMOutputWithPast) and "aux_loss" in restored.keys()


@pytest.mark.parametrize("name,kwargs", MODEL_CASES, ids=IDS)
def test_outputs_carry_aux_loss_and_loss_includes_it(name, kwargs):
    model, tokenizer = _peft_model(kwargs)
    model.train()
    inputs = batch(tokenizer)
    torch.manual_seed(0)
    out = model(**inputs, labels=inputs["input_ids"])
    stats = model.get_routing_stats()
    weighted = [s.weighted_loss for layer in stats.values() for s in layer.values()]
    weighted = sum(weighted) / max(len(weighted), 1)  # the mean over the routed layers
    torch.testing.assert_close(out.aux_loss.detach(), torch.as_tensor(weighted, dtype=torch.float32))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, _lm_loss(out.logits, labels) + out.aux_loss, rtol=1e-6, atol=1e-6)
    has_router = kwargs["num_experts"] != 1
    assert bool(stats) == has_router
    for layer_stats in stats.values():
        for s in layer_stats.values():
            assert torch.isclose(s.expert_load.sum(), torch.tensor(1.0)) and s.entropy >= 0


@pytest.mark.parametrize("name,kwargs", MODEL_CASES, ids=IDS)
def test_router_loss_gradient_identical_in_every_checkpointing_mode(name, kwargs):
    model, tokenizer = _peft_model(kwargs)
    inputs = batch(tokenizer)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def grads(mode, model, scale=1.0):
        model = copy.deepcopy(model)
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if mode is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
            model.enable_input_require_grads()
        out = model(**inputs, labels=labels)
        (out.loss * scale).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads(None, model)
    assert reference and all(g.abs().sum() > 0 for g in reference.values())
    for mode in ("non-reentrant", "reentrant"):
        for scale in (1.0, 0.25):
            got = grads(mode, model, scale)
            assert got.keys() == reference.keys()
            for key in reference:
                torch.testing.assert_close(got[key], reference[key] * scale, rtol=1e-5, atol=1e-7, msg=f"{mode} {key}")

    if kwargs["num_experts"] != 1:
        # The router-loss part of the router gradient is real (not zero) in every mode.
        no_aux = copy.deepcopy(model)
        no_aux.base_model.set_router_loss_coefficients(
            aux_loss_coef=0.0, router_z_loss_coef=0.0, contrastive_loss_coef=0.0, gate_balance_loss_coef=0.0
        )
        without = grads(None, no_aux)
        router_keys = [k for k in reference if "moelora_router" in k]
        assert any(not torch.allclose(reference[k], without[k]) for k in router_keys)


@pytest.mark.parametrize("name,kwargs", MODEL_CASES, ids=IDS)
def test_training_changes_every_trainable_tensor(name, kwargs):
    model, tokenizer = _peft_model(kwargs, init_weights=True)
    model.train()
    inputs = batch(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("moelora_" in n for n in before)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged


@pytest.mark.parametrize("name,kwargs", MODEL_CASES, ids=IDS)
def test_generation_with_kv_cache_matches_no_cache(name, kwargs):
    model, tokenizer = _peft_model(kwargs)
    model.eval()
    inputs = batch(tokenizer)
    kwargs_gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with_cache = model.generate(**inputs, use_cache=True, **kwargs_gen)
    without_cache = model.generate(**inputs, use_cache=False, **kwargs_gen)
    assert torch.equal(with_cache, without_cache)
    assert with_cache.shape[1] == inputs["input_ids"].shape[1] + 6


def test_cached_decoding_only_routes(monkeypatch):
    model, tokenizer = _peft_model(dict(num_experts=4, top_k=2, aux_loss_coef=0.01, router_z_loss_coef=0.001))
    model.eval()
    inputs = batch(tokenizer)
    calls = []
    for name in ("load_balancing_loss", "router_z_loss", "expert_load", "router_entropy"):
        original = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    kwargs_gen = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    model.generate(**inputs, use_cache=True, **kwargs_gen)
    assert calls == []
    with torch.no_grad():  # an evaluation forward still computes them (the trainer logs them as eval metrics)
        outputs = model(**inputs)
    assert outputs.aux_loss > 0 and {"load_balancing_loss", "router_z_loss", "expert_load"} <= set(calls)


def test_inference_only_gives_the_same_logits_without_router_losses_or_statistics(monkeypatch):
    from moe_peft_plugin.evaluation import score_items

    model, tokenizer = _peft_model(dict(num_experts=4, top_k=2, aux_loss_coef=0.01, contrastive_loss_coef=0.01))
    model.eval()
    inputs = batch(tokenizer)
    with torch.no_grad():
        full = model(**inputs)
    recorded = model.base_model.get_routing_stats()
    assert full.aux_loss > 0 and recorded
    calls = []
    for name in ("load_balancing_loss", "expert_contrastive_loss", "expert_load", "router_entropy"):
        original = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    with model.base_model.inference_only(), torch.no_grad():
        quick = model(**inputs)
    assert calls == [] and getattr(quick, "aux_loss", None) is None
    after = model.base_model.get_routing_stats()  # nothing new recorded: still those of the full forward
    assert after.keys() == recorded.keys() and all(after[k]["default"] is recorded[k]["default"] for k in after)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(quick.logits[real], full.logits[real], rtol=1e-5, atol=1e-5)
    with model.base_model.inference_only():  # forwards with gradients keep their router losses
        assert model(**inputs).aux_loss > 0
    with torch.no_grad():  # and the switch is off again on exit
        assert model(**inputs).aux_loss > 0
    # Scoring reads only the logits: it skips them, unless it collects the routing (`after_forward`).
    calls.clear()
    items = [MCItem("1", "the cat sat on the", [" mat", " dog"], 0)]
    score_items(model, tokenizer, items, progress=False)
    assert calls == []
    score_items(model, tokenizer, items, progress=False, after_forward=lambda mask: None)
    assert "expert_contrastive_loss" in calls


@pytest.mark.parametrize("extra", [{}, {"router_sharing": True, "target_modules": "all-linear"}], ids=["", "sharing"])
def test_torch_compile_traces_one_graph_and_matches_eager_forward_and_backward(extra):
    """`torch.compile(fullgraph=True)` fails on any graph break: the MOELORA layers, the routing context hooks and the
    router losses (load balancing and contrastive) trace as one graph, forward and backward (AOTAutograd,
    `aot_eager`: no C++ compiler needed), with the eager values and gradients; with `router_sharing` too."""
    model, tokenizer = _peft_model(
        dict(num_experts=4, top_k=2, aux_loss_coef=0.01, contrastive_loss_coef=0.1, **extra)
    )
    model.train()
    inputs = batch(tokenizer)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    outputs = compiled(**inputs, labels=inputs["input_ids"])
    outputs.loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    eager = model(**inputs, labels=inputs["input_ids"])
    eager.loss.backward()
    torch.testing.assert_close(outputs.loss, eager.loss)
    torch.testing.assert_close(outputs.aux_loss, eager.aux_loss)
    assert eager.aux_loss > 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(compiled_grads[name], parameter.grad, msg=name)
    assert all(compiled_grads[n].abs().sum() > 0 for n in compiled_grads if "router" in n)


@pytest.mark.parametrize("extra", [{}, {"router_sharing": True, "target_modules": "all-linear"}], ids=["", "sharing"])
def test_torch_compile_traces_cached_decoding_as_one_graph_that_reads_the_current_weights(extra):
    """`generate` with a static cache compiles the decoding forward (transformers' `compile_config`). Once eager
    decoding has prepared and cached the layers' inference weights, the compiled decoding step must still trace as one
    graph (the cache check compared data pointers, which dynamo cannot trace: a graph break in every layer) and give
    the eager logits; after an in-place update, the next eager forward (as `generate`'s prefill) revalidates what the
    compiled steps use; with nothing cached (after `eval()`), the compiled step prepares the weights itself."""
    import inspect

    from transformers import DynamicCache

    model, tokenizer = _peft_model(dict(num_experts=4, top_k=2, **extra))
    model.eval()
    wrapped = model.base_model.model
    cache_key = "cache" if "cache" in inspect.signature(type(wrapped).forward).parameters else "past_key_values"
    ids = batch(tokenizer)["input_ids"][1:]
    layers = [m for m in model.modules() if hasattr(m, "_inference_cache")]

    def step(cache):
        return model(input_ids=ids[:, -1:], use_cache=True, **{cache_key: cache}).logits

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=ids[:, :-1], use_cache=True, **{cache_key: cache})  # eager decoding: weights prepared
        assert all(layer._inference_cache for layer in layers)
        expected = step(copy.deepcopy(cache))
        torch.testing.assert_close(compiled(copy.deepcopy(cache)), expected)
        for layer in layers:
            layer.moelora_B["default"].mul_(3.0)
        updated = step(copy.deepcopy(cache))  # eager: sees the new version and prepares the weights again
        assert not torch.allclose(updated, expected)
        torch.testing.assert_close(compiled(copy.deepcopy(cache)), updated)
        model.eval()  # drops the prepared weights
        assert not any(layer._inference_cache for layer in layers)
        torch.testing.assert_close(compiled(copy.deepcopy(cache)), updated)
        assert not any(layer._inference_cache for layer in layers)  # prepared inside the graph, not cached


def test_torch_compile_compiles_once_over_training_steps():
    """Steps after the first reuse the compiled graph: no Python state of the routing context is guarded on."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, tokenizer = _peft_model(dict(num_experts=4, top_k=2, aux_loss_coef=0.01))
    model.train()
    inputs = batch(tokenizer)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(3):
        compiled(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert counter.frame_count == 1


def test_padding_tokens_do_not_change_router_losses():
    model, tokenizer = _peft_model(MODEL_CASES[0][1])
    model.eval()
    inputs = batch(tokenizer)
    aux = model(**inputs).aux_loss
    changed = dict(inputs)
    changed["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 7)
    torch.testing.assert_close(model(**changed).aux_loss, aux)
    no_mask = {"input_ids": changed["input_ids"]}
    assert not torch.allclose(model(**no_mask).aux_loss, aux)


def test_multiple_adapters_route_independently():
    model, tokenizer = _peft_model({"num_experts": 2, "top_k": 1, "target_modules": ["q_proj"]})
    model.add_adapter(
        "mola", MoeLoraConfig(num_experts=[2, 4], top_k=2, target_modules=["q_proj"], init_weights=False)
    )
    model.eval()
    inputs = batch(tokenizer)
    first = model(**inputs).logits
    model.set_adapter("mola")
    second = model(**inputs).logits
    assert not torch.allclose(first, second)
    layer = model.base_model.model.model.layers[3].self_attn.q_proj
    assert layer.num_experts == {"default": 2, "mola": 4}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".mola" in n
    }


def test_saving_unGathered_zero3_shards_fails_loudly(tmp_path):
    model, _ = _peft_model({"num_experts": 2, "top_k": 1, "target_modules": ["q_proj"]})
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.moelora_A["default"].data = torch.empty(0)  # what a ZeRO-3 partition looks like outside GatheredParameters
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="ZeRO-3"):
        model.save_pretrained(target)
    # Nothing of the adapter is written (peft itself writes its model card README.md before the weights).
    assert not (target / "adapter_model.safetensors").exists() and not (target / "adapter_config.json").exists()


def test_auto_peft_model_in_a_fresh_process(tiny_model_dir, tmp_path):
    model, tokenizer = _peft_model(MODEL_CASES[1][1])
    model.peft_config["default"].base_model_name_or_path = tiny_model_dir
    model.eval()
    inputs = batch(tokenizer)
    torch.save({"inputs": inputs, "logits": model(**inputs).logits}, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "adapter")
    code = f"""
import torch, moe_peft_plugin
from peft import AutoPeftModelForCausalLM
expected = torch.load({str(tmp_path / "expected.pt")!r})
model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r}).eval()
assert type(model.base_model).__name__ == "MoeLoraModel"
torch.testing.assert_close(model(**expected["inputs"]).logits, expected["logits"], rtol=0, atol=0)
print("OK")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_every_entry_point_gets_router_losses():
    """Without a task type peft's `PeftModel.forward` calls the base model directly; so does inject_adapter_in_model."""
    from peft import inject_adapter_in_model

    kwargs = {"num_experts": 4, "top_k": 2, "target_modules": ["q_proj"], "init_weights": False}
    _, tokenizer = build_tiny_llama()
    inputs = batch(tokenizer)
    base, _ = build_tiny_llama()
    no_task = get_peft_model(base, MoeLoraConfig(**kwargs))
    assert type(no_task).__name__ == "PeftModel"
    out = no_task(**inputs, labels=inputs["input_ids"])
    assert out.aux_loss > 0 and out.loss.grad_fn is not None
    base, _ = build_tiny_llama()
    injected = inject_adapter_in_model(MoeLoraConfig(**kwargs), base)
    out2 = injected(**inputs, labels=inputs["input_ids"])
    assert out2.aux_loss > 0


def test_plain_module_exposes_aux_loss():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(Net(), MoeLoraConfig(target_modules=["lin"], num_experts=4, top_k=2, aux_loss_coef=0.5))
    out = model(torch.randn(6, 8))
    aux = model.base_model.aux_loss
    assert isinstance(out, torch.Tensor) and aux.requires_grad and aux > 0
    (out.sum() + aux).backward()
    assert model.base_model.model.lin.moelora_router["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("mode", [None, "reentrant"])
def test_bf16_autocast_trains_with_fp32_router(mode):
    model, tokenizer = _peft_model(MODEL_CASES[0][1])
    model.train()
    if mode:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    inputs = batch(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=inputs["input_ids"])
    assert out.aux_loss.dtype == torch.float32
    out.loss.float().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    reference, _ = _peft_model(MODEL_CASES[0][1])
    reference.train()
    reference(**inputs, labels=inputs["input_ids"]).loss.backward()
    cosines = torch.stack(
        [
            F.cosine_similarity(param.grad.flatten(), grads[name].flatten(), dim=0)
            for name, param in reference.named_parameters()
            if "moelora_router" in name
        ]
    )
    # bf16 matmuls in 4 layers: close to the float32 gradient in direction, not bit-equal.
    assert cosines.min() > 0.7 and cosines.mean() > 0.9, cosines


def test_contrastive_gradient_is_bounded_at_zero_init():
    """B = 0 at init: the contrastive loss must not produce exploding gradients while the experts are ~0."""
    kwargs = {**MODEL_CASES[0][1], "contrastive_loss_coef": 1.0}
    model, tokenizer = _peft_model(kwargs, init_weights=True)
    model.train()
    inputs = batch(tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "moelora_B" in name:
                param.normal_(std=1e-8)  # what a few tiny first updates leave
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    total = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
    assert torch.isfinite(total) and total < 1e3, total


def test_router_loss_coefficients_are_set_through_the_model():
    model, tokenizer = _peft_model(MODEL_CASES[0][1])
    layers = [m for m in model.modules() if hasattr(m, "routing_options")]
    options = layers[0].routing_options["default"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.aux_loss_coef = 1.0  # nothing changes routing behind the layer's back
    model.base_model.set_router_loss_coefficients(aux_loss_coef=0.2, contrastive_loss_coef=0.0)
    assert all(layer.routing_options["default"].aux_loss_coef == 0.2 for layer in layers)
    assert all(layer.routing_options["default"].contrastive_loss_coef == 0.0 for layer in layers)
    assert model.peft_config["default"].aux_loss_coef == 0.2  # the saved config records what was trained with
    model.base_model.set_router_loss_coefficients(aux_loss_coef=0.5, update_config=False)
    assert (
        layers[-1].routing_options["default"].aux_loss_coef == 0.5
        and model.peft_config["default"].aux_loss_coef == 0.2
    )
    for bad, match in [
        ({"aux_loss_coef": -1.0}, "aux_loss_coef"),
        ({"aux_loss": 0.1}, "Unknown router-loss coefficients"),
        ({"gate_balance_loss_coef": 0.1}, "requires soft routing"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.base_model.set_router_loss_coefficients(**bad)
        assert all(layer.routing_options["default"].aux_loss_coef == 0.5 for layer in layers)  # nothing half-set
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.base_model.set_router_loss_coefficients("other", aux_loss_coef=0.1)
    # The new value is what the next forward uses.
    inputs = batch(tokenizer)
    model.train()
    model(**inputs)
    stats = next(iter(model.get_routing_stats().values()))["default"]
    torch.testing.assert_close(
        stats.weighted_loss, 0.5 * stats.losses["load_balancing"] + 1e-3 * stats.losses["router_z"]
    )


def test_routing_stats_of_one_forward_combine_and_sample_loads():
    model, tokenizer = _peft_model({"num_experts": 4, "top_k": 2, "target_modules": ["q_proj", "down_proj"]})
    model.eval()
    texts = [
        "the cat sat on the mat and looked at the dog",
        "a mixture of experts routes every token to a few experts",
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    assert bool(enc["attention_mask"].all())  # same length: the batch is exactly the two samples side by side
    model.base_model.record_sample_routing(True)
    with torch.no_grad():
        model(**enc)
        both = model.get_routing_stats()
        singles = []
        for i in range(2):
            model(input_ids=enc["input_ids"][i : i + 1], attention_mask=enc["attention_mask"][i : i + 1])
            singles.append(model.get_routing_stats())
    assert len(both) == 8
    for name, by_adapter in both.items():
        stats = by_adapter["default"]
        assert stats.num_experts == 4 and stats.experts_per_token == 2 and stats.router_type == "topk"
        assert int(stats.num_tokens) == enc["input_ids"].numel()
        torch.testing.assert_close(stats.mean_gate.sum(), torch.tensor(1.0))
        assert stats.sample_load.shape == (2, 4)
        combined = RoutingStats.combine([single[name]["default"] for single in singles])
        for field in ("expert_load", "mean_gate", "entropy", "num_tokens", "sample_load"):
            torch.testing.assert_close(getattr(combined, field).float(), getattr(stats, field).float(), msg=field)
        for i in range(2):
            torch.testing.assert_close(stats.sample_load[i], singles[i][name]["default"].expert_load)
    model.base_model.record_sample_routing(False)
    with torch.no_grad():
        model(**enc)
    assert all(s["default"].sample_load is None for s in model.get_routing_stats().values())
    # Padding is not counted.
    padded = batch(tokenizer)
    with torch.no_grad():
        model(**padded)
    stats = next(iter(model.get_routing_stats().values()))["default"]
    assert int(stats.num_tokens) == int(padded["attention_mask"].sum()) < padded["attention_mask"].numel()
