"""MoeLoraConfig: registration with peft, LoRA compatibility, and a clear ValueError for every bad input."""

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_config, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import moe_peft_plugin
from moe_peft_plugin import MoeLoraConfig, MoeLoraModel
from moe_peft_plugin.config import expand_per_layer, mola_group_sizes

from .helpers import build_tiny_llama


# (kwargs, the field the error must name) -- every one must raise ValueError at construction.
BAD_CONFIGS = [
    ({"r": 0}, "r"),
    ({"r": -4}, "r"),
    ({"r": 2.5}, "r"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"bias": "lora_only"}, "bias"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"num_experts": 0}, "num_experts"),
    ({"num_experts": True}, "num_experts"),
    ({"num_experts": "8"}, "num_experts"),
    ({"num_experts": []}, "num_experts"),
    ({"num_experts": [2, 0, 4]}, "num_experts"),
    ({"num_experts": [2, 4.0]}, "num_experts"),
    ({"top_k": 0}, "top_k"),
    ({"num_experts": 4, "top_k": 5}, "top_k"),
    ({"num_experts": [2, 4], "top_k": [3, 2]}, "top_k"),
    ({"num_experts": [2, 4, 6, 8], "top_k": 3}, "top_k"),
    ({"router_type": "switch"}, "router_type"),
    ({"router_temperature": 0}, "router_temperature"),
    ({"contrastive_temperature": -1.0}, "contrastive_temperature"),
    ({"router_jitter_noise": 1.5}, "router_jitter_noise"),
    ({"router_noise_std": -0.1}, "router_noise_std"),
    ({"aux_loss_coef": -0.01}, "aux_loss_coef"),
    ({"router_z_loss_coef": float("nan")}, "router_z_loss_coef"),
    ({"contrastive_loss_coef": "0.1"}, "contrastive_loss_coef"),
    ({"gate_balance_loss_coef": 0.1, "router_type": "topk"}, "gate_balance_loss_coef"),
    ({"expert_adapters": "path/to/lora"}, "expert_adapters"),
    ({"expert_adapters": []}, "expert_adapters"),
    ({"expert_adapters": ["a", "a"]}, "expert_adapters"),
    ({"expert_adapters": ["a", "b"], "num_experts": 3}, "num_experts"),
    ({"expert_adapters": ["a", "b", "c"], "num_experts": 8}, "num_experts"),  # 8 is the default: still explicit
    ({"expert_adapters": ["a", "b"], "num_experts": [1, 2]}, "num_experts"),
    ({"expert_adapters": ["a", "b"], "top_k": 3, "router_type": "topk"}, "top_k"),
    ({"num_experts": 2, "expert_names": ["a", "b", "c"]}, "expert_names"),
    ({"task_type": "NOT_A_TASK"}, "task type"),
]


@pytest.mark.parametrize("kwargs,field", BAD_CONFIGS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_CONFIGS)])
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("_", "_")) as info:
        MoeLoraConfig(**kwargs)
    assert field.split()[0].lower() in str(info.value).lower()


# Bad inputs that only show against a model: (config kwargs, expected message fragment)
BAD_FOR_MODEL = [
    ({"num_experts": [2, 4, 6, 8, 8], "target_modules": ["q_proj"]}, "num_experts"),
    ({"num_experts": [2, 4], "top_k": [2, 2, 2, 2, 2, 2, 2, 2, 2, 2], "target_modules": ["q_proj"]}, "top_k"),
    ({"num_experts": [1, 2], "top_k": 2, "target_modules": ["q_proj"]}, "top_k"),
    ({"target_modules": ["embed_tokens"]}, "not supported"),
]


@pytest.mark.parametrize("kwargs,fragment", BAD_FOR_MODEL)
def test_bad_config_for_model_raises_before_touching_the_model(kwargs, fragment):
    model, _ = build_tiny_llama()
    before = [name for name, _ in model.named_modules()]
    with pytest.raises((ValueError, TypeError), match=fragment):
        get_peft_model(model, MoeLoraConfig(**kwargs))
    if fragment != "not supported":
        # Validation happens before injection: the model is left untouched.
        assert [name for name, _ in model.named_modules()] == before


def test_registration_is_idempotent_and_uses_a_unique_prefix():
    moe_peft_plugin.register()
    moe_peft_plugin.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MOELORA"] is MoeLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["MOELORA"] is MoeLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["MOELORA"] == "moelora_"
    assert list(PEFT_TYPE_TO_PREFIX_MAPPING.values()).count("moelora_") == 1


def test_get_peft_config_and_roundtrip(tmp_path):
    config = get_peft_config({"peft_type": "MOELORA", "num_experts": [2, 4], "top_k": 1, "target_modules": ["q_proj"]})
    assert isinstance(config, MoeLoraConfig) and config.peft_type == "MOELORA"
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MOELORA" and saved["num_experts"] == [2, 4]
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MoeLoraConfig) and loaded.num_experts == [2, 4] and loaded.top_k == 1
    with pytest.raises(TypeError):
        get_peft_config({"peft_type": "MOELORA", "not_a_field": 1})


def test_num_experts_unset_is_not_the_default_value():
    assert MoeLoraConfig().num_experts == 8
    assert MoeLoraConfig(num_experts=None).num_experts == 8
    assert MoeLoraConfig(expert_adapters=["a", "b", "c"]).num_experts == 3
    assert MoeLoraConfig(expert_adapters=["a", "b", "c"], num_experts=3).num_experts == 3
    with pytest.raises(ValueError, match=r"`num_experts` \(8\) must equal the number of `expert_adapters` \(3\)"):
        MoeLoraConfig(expert_adapters=["a", "b", "c"], num_experts=8)
    assert MoeLoraConfig.from_lora_config(LoraConfig(target_modules=["q_proj"])).num_experts == 8
    # A saved config always records the resolved count, and reads back to the same config.
    for config in (MoeLoraConfig(target_modules=["q_proj"]), MoeLoraConfig(expert_adapters=["a", "b", "c"])):
        saved = json.loads(json.dumps(config.to_dict(), default=sorted))
        assert saved["num_experts"] == config.num_experts
        assert get_peft_config(saved).to_dict() == config.to_dict()


def test_saved_adapters_round_trip(tmp_path):
    """Plain MOELORA adapters load back with the expert count they were saved with (also the default one)."""
    for name, kwargs in {"default": {}, "four": {"num_experts": 4}, "mola": {"num_experts": [2, 4]}}.items():
        model, tokenizer = build_tiny_llama()
        config = MoeLoraConfig(target_modules=["q_proj"], top_k=1, init_weights=False, **kwargs)
        model = get_peft_model(model, config).eval()
        inputs = tokenizer(["the cat sat on the mat"], return_tensors="pt")
        expected = model(**inputs).logits
        model.save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert saved["num_experts"] == config.num_experts
        assert get_peft_config(saved).num_experts == config.num_experts
        loaded = PeftModel.from_pretrained(build_tiny_llama()[0], tmp_path / name).eval()
        assert loaded.peft_config["default"].num_experts == config.num_experts
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


def test_from_lora_config_copies_lora_fields():
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        bias="lora_only",
        use_rslora=True,
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    config = MoeLoraConfig.from_lora_config(lora, num_experts=4, top_k=1, lora_dropout=0.0)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.0)
    assert config.target_modules == {"q_proj", "v_proj"} and config.modules_to_save == ["lm_head"]
    assert config.bias == "moelora_only" and config.use_rslora and config.init_weights is False
    assert (config.num_experts, config.top_k, config.task_type) == (4, 1, "CAUSAL_LM")
    with pytest.raises(ValueError, match="use_dora"):
        MoeLoraConfig.from_lora_config(LoraConfig(use_dora=True))
    with pytest.raises(ValueError, match="rank_pattern"):
        MoeLoraConfig.from_lora_config(LoraConfig(rank_pattern={"q_proj": 4}))
    with pytest.raises(ValueError, match="LoraConfig"):
        MoeLoraConfig.from_lora_config(config)


def test_mola_expansion():
    assert expand_per_layer("num_experts", 3, 4) == [3, 3, 3, 3]
    assert expand_per_layer("num_experts", [2, 4, 6, 8], 32)[::8] == [2, 4, 6, 8]
    assert expand_per_layer("num_experts", [2, 4, 6, 8], 32)[7:9] == [2, 4]
    assert expand_per_layer("num_experts", [1, 2, 3], 3) == [1, 2, 3]  # one entry per layer
    with pytest.raises(ValueError, match="`num_experts` has 5 entries.*4 layers"):
        expand_per_layer("num_experts", [1, 2, 3, 4, 5], 4)


# (layers, groups, group sizes): as even as possible, the larger groups first at the ends (first, last, second, ...)
MOLA_GROUPS = [
    (32, 4, [8, 8, 8, 8]),
    (30, 4, [8, 7, 7, 8]),  # SmolLM2-135M: the split of the MoLA study (docs/science)
    (7, 3, [3, 2, 2]),
    (31, 4, [8, 8, 7, 8]),
    (29, 4, [8, 7, 7, 7]),
    (10, 3, [4, 3, 3]),
    (11, 3, [4, 3, 4]),
    (5, 4, [2, 1, 1, 1]),
    (22, 5, [5, 4, 4, 4, 5]),
    (4, 4, [1, 1, 1, 1]),
]


@pytest.mark.parametrize("num_layers,num_groups,sizes", MOLA_GROUPS)
def test_mola_groups_are_as_even_as_possible(num_layers, num_groups, sizes):
    assert mola_group_sizes(num_layers, num_groups) == sizes
    per_layer = expand_per_layer("num_experts", list(range(1, num_groups + 1)), num_layers)
    assert per_layer == [g + 1 for g, size in enumerate(sizes) for _ in range(size)]
    # With an even remainder the sizes are symmetric: an allocation and its reverse have the same number of experts.
    if (num_layers % num_groups) % 2 == 0:
        assert sizes == sizes[::-1]


@pytest.mark.parametrize("num_layers,num_groups", [(7, 3), (30, 4)])
def test_mola_groups_reach_the_model_layers(num_layers, num_groups):
    model, _ = build_tiny_llama(num_layers=num_layers)
    counts = [2 * (g + 1) for g in range(num_groups)]  # [2, 4, 6(, 8)]
    config = MoeLoraConfig(num_experts=counts, top_k=[1] * num_groups, target_modules=["q_proj", "down_proj"])
    model = get_peft_model(model, config)
    expected = [c for c, size in zip(counts, mola_group_sizes(num_layers, num_groups)) for _ in range(size)]
    for module in ("self_attn.q_proj", "mlp.down_proj"):
        got = [
            model.get_submodule(f"base_model.model.model.layers.{i}.{module}").num_experts["default"]
            for i in range(num_layers)
        ]
        assert got == expected


def test_loading_without_the_plugin_fails_and_with_it_works(tiny_model_dir, tmp_path):
    model, _ = build_tiny_llama()
    peft_model = get_peft_model(model, MoeLoraConfig(target_modules=["q_proj"], num_experts=2, top_k=1))
    peft_model.save_pretrained(tmp_path / "adapter")
    code = (
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        f"base = AutoModelForCausalLM.from_pretrained({tiny_model_dir!r})\n"
        f"PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})\n"
    )
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert without.returncode != 0 and "MOELORA" in without.stderr
    with_plugin = subprocess.run(
        [sys.executable, "-c", "import moe_peft_plugin\n" + code], capture_output=True, text=True
    )
    assert with_plugin.returncode == 0, with_plugin.stderr[-2000:]


def test_peft_type_behaves_like_a_peft_type_member():
    """peft and its testers read `config.peft_type.value`; JSON, pickle and deepcopy keep the plain string."""
    import copy
    import pickle

    config = MoeLoraConfig(target_modules=["q_proj"])
    assert config.peft_type == "MOELORA" and config.peft_type.value == "MOELORA" and config.peft_type.name == "MOELORA"
    assert f"{config.peft_type.value.lower()}_only" == "moelora_only"
    assert json.loads(json.dumps(config.to_dict(), default=sorted))["peft_type"] == "MOELORA"
    assert pickle.loads(pickle.dumps(config)).peft_type.value == "MOELORA"
    assert copy.deepcopy(config).peft_type.value == "MOELORA"
