"""MoLE: trained LoRAs become frozen experts; only the gates train; any subset can be masked at inference."""

import shutil

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from moe_peft_plugin import MoeLoraConfig

from .helpers import batch, build_tiny_llama


LORA_SPECS = [  # (name, r, alpha, targets): different ranks and scalings on purpose
    ("math", 4, 8, ["q_proj", "v_proj"]),
    ("code", 8, 8, ["q_proj", "v_proj"]),
    ("chat", 2, 16, ["q_proj", "v_proj"]),
]


def _save_lora(path, r, alpha, targets, seed, **model_kwargs):
    base, _ = build_tiny_llama(**model_kwargs)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [
        _save_lora(root / name, r, alpha, targets, seed) for seed, (name, r, alpha, targets) in enumerate(LORA_SPECS)
    ]


def _mole(lora_dirs, dtype=torch.float32, **kwargs):
    base, tokenizer = build_tiny_llama()
    config = MoeLoraConfig(expert_adapters=lora_dirs, task_type="CAUSAL_LM", **kwargs)
    return get_peft_model(base.to(dtype), config), tokenizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mole_defaults_and_frozen_experts(lora_dirs, dtype):
    # On a bf16 base, peft upcasts the adapter tensors to float32 (`autocast_adapter_dtype`): they stay frozen.
    model, _ = _mole(lora_dirs, dtype=dtype)
    config = model.peft_config["default"]
    assert (config.num_experts, config.router_type, config.freeze_experts) == (3, "soft", True)
    assert config.learn_router_temperature and config.expert_names == ["math", "code", "chat"]
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"moelora_router", "moelora_log_temperature"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.moelora_A["default"].shape == (3, 8, 64)  # padded to the largest rank
    assert layer.moelora_A["default"].dtype == torch.float32
    assert not hasattr(model.base_model.model.model.layers[0].mlp.up_proj, "moelora_A")


@pytest.mark.parametrize("index", range(len(LORA_SPECS)))
def test_masking_to_one_expert_reproduces_that_lora(lora_dirs, index):
    model, tokenizer = _mole(lora_dirs)
    model.eval()
    inputs = batch(tokenizer)
    base, _ = build_tiny_llama()
    lora = PeftModel.from_pretrained(base, lora_dirs[index]).eval()
    expected = lora(**inputs).logits
    with model.expert_mask([index]):
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    with model.expert_mask([LORA_SPECS[index][0]]):  # by name
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(**inputs).logits, expected, atol=1e-5)


def test_masking_renormalises_the_remaining_gates(lora_dirs):
    model, tokenizer = _mole(lora_dirs)
    model.eval()
    inputs = batch(tokenizer)
    model(**inputs)
    model.set_expert_mask([0, 2])
    model(**inputs)
    for layer_stats in model.get_routing_stats().values():
        load = layer_stats["default"].expert_load
        assert load[1] == 0 and torch.isclose(load.sum(), torch.tensor(1.0))
    model.set_expert_mask(None)


def test_checkpoint_is_self_contained(lora_dirs, tmp_path):
    copies = [shutil.copytree(d, tmp_path / f"copy{i}") for i, d in enumerate(lora_dirs)]
    model, tokenizer = _mole([str(c) for c in copies], gate_balance_loss_coef=0.1)
    model.eval()
    inputs = batch(tokenizer)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "mole")
    for c in copies:
        shutil.rmtree(c)
    base, _ = build_tiny_llama()
    loaded = PeftModel.from_pretrained(base, tmp_path / "mole").eval()
    torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    config = loaded.peft_config["default"]
    assert config.expert_adapters is None and config.expert_names == ["copy0", "copy1", "copy2"]
    with loaded.expert_mask(["copy1"]):
        loaded(**inputs)


def test_only_the_gates_train_with_the_balance_loss(lora_dirs):
    model, tokenizer = _mole(lora_dirs, gate_balance_loss_coef=0.5)
    model.train()
    inputs = batch(tokenizer)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "moelora_A" in n or "moelora_B" in n}
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = model(**inputs, labels=inputs["input_ids"])
    components = next(iter(model.get_routing_stats().values()))["default"].losses
    assert "gate_balance" in components and components["gate_balance"] > 0
    out.loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, gates[n]) for n, p in model.named_parameters() if n in gates)


@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "v_proj"],
        ("v_proj", "q_proj"),
        {"q_proj", "v_proj"},
        r".*\.(q_proj|v_proj)",
        [f"model.layers.{i}.self_attn.{m}" for i in range(4) for m in ("q_proj", "v_proj")],
    ],
    ids=["list", "tuple", "set", "regex", "full-names"],
)
def test_target_modules_that_match_the_loras_are_accepted(lora_dirs, targets):
    model, tokenizer = _mole(lora_dirs)
    expected = model.eval()(**batch(tokenizer)).logits
    same, _ = _mole(lora_dirs, target_modules=targets)
    assert set(same.peft_config["default"].target_modules) == set(model.peft_config["default"].target_modules)
    torch.testing.assert_close(same.eval()(**batch(tokenizer)).logits, expected, rtol=0, atol=0)


def test_target_modules_all_linear_matches_all_linear_loras(tmp_path):
    dirs = [_save_lora(tmp_path / name, 4, 8, "all-linear", seed) for seed, name in enumerate(["a", "b"])]
    model, _ = _mole(dirs, target_modules="all-linear")
    assert sum(hasattr(m, "moelora_A") for m in model.modules()) == 4 * 7  # every linear layer but lm_head


@pytest.mark.parametrize(
    "targets,fragments",
    [
        (["q_proj"], ["not selected by `target_modules`: 4 (v_proj)"]),
        (["q_proj", "v_proj", "k_proj"], ["selected but not adapted by the LoRAs: 4 (k_proj)"]),
        ("all-linear", ["selected but not adapted by the LoRAs: 20 (down_proj, gate_proj, k_proj, o_proj, up_proj)"]),
        (["k_proj"], ["8 (q_proj, v_proj)", "4 (k_proj)"]),
    ],
)
def test_target_modules_that_differ_from_the_loras_are_refused(lora_dirs, targets, fragments):
    base, _ = build_tiny_llama()
    before = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="`target_modules`") as info:
        get_peft_model(base, MoeLoraConfig(expert_adapters=lora_dirs, target_modules=targets))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert [n for n, _ in base.named_modules()] == before


def test_bad_expert_adapters(lora_dirs, tmp_path):
    other_shape = _save_lora(tmp_path / "wide", 4, 8, ["q_proj", "v_proj"], 0, hidden_size=128)
    other_targets = _save_lora(tmp_path / "mlp", 4, 8, ["up_proj"], 0)
    base, _ = build_tiny_llama()
    ia3 = str(tmp_path / "ia3")
    get_peft_model(base, IA3Config(target_modules=["q_proj"], feedforward_modules=[])).save_pretrained(ia3)
    cases = [
        ([lora_dirs[0], other_shape], "another base model"),
        ([lora_dirs[0], other_targets], "same modules"),
        ([lora_dirs[0], ia3], "only LoRA"),
        ([lora_dirs[0], str(tmp_path / "missing")], "not a folder"),
    ]
    for dirs, message in cases:
        base, _ = build_tiny_llama()
        before = [n for n, _ in base.named_modules()]
        with pytest.raises(ValueError, match=message):
            get_peft_model(base, MoeLoraConfig(expert_adapters=dirs))
        assert [n for n, _ in base.named_modules()] == before
