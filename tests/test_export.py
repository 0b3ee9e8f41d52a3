"""`moe-peft export` and `moe-peft inspect` on tiny local models.

Exported adapters are checked in a fresh process that imports peft but never moe_peft_plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_peft_cli import main
from moe_peft_cli.inspect import collect_routing
from moe_peft_plugin import MoeLoraConfig
from moe_peft_plugin.export import MoeLoraExportError, read_moelora


ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "a mixture of experts routes every token to a few experts",
    "question: what is the capital of france? answer: paris",
    "low rank adapters train small matrices next to frozen weights",
]
INPUT_IDS = [[4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]

# Runs in a fresh interpreter: plain transformers + peft, the plugin must not be needed (nor imported).
PLAIN_PEFT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, ids, out, *adapters = sys.argv[1:]
results = []
for adapter in adapters:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    assert type(model.peft_config["default"]).__name__ == "LoraConfig"
    with torch.no_grad():
        results.append(model(input_ids=torch.tensor(json.loads(ids))).logits)
torch.save(results, out)
assert not any(name.startswith("moe_peft_plugin") for name in sys.modules), "the plugin was imported"
"""


def plain_peft_logits(base_dir, adapter_dirs, tmp_path):
    """Logits of each exported adapter, loaded by plain peft in one fresh process."""
    single = isinstance(adapter_dirs, str)
    out = str(tmp_path / "logits.pt")
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, base_dir, json.dumps(INPUT_IDS), out,
         *([adapter_dirs] if single else adapter_dirs)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(out)
    return results[0] if single else results


def logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(INPUT_IDS)).logits


@pytest.fixture
def moelora_dir(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = MoeLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], num_experts=4, top_k=2,
                           init_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config).eval()
    path = str(tmp_path / "moelora")
    peft_model.save_pretrained(path)
    return path, peft_model


def test_one_expert_exports_exactly_and_loads_without_the_plugin(tiny_model_dir, moelora_dir, tmp_path, capsys):
    path, peft_model = moelora_dir
    out = str(tmp_path / "expert2")
    assert main(["export", path, "--expert", "2", "--output_dir", out, "--no_measure"]) == 0
    assert "plain LoRA adapter" in capsys.readouterr().out
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    with peft_model.base_model.expert_mask([2]):  # routing forced to expert 2 at full weight in every layer
        expected = logits(peft_model)
    exported = plain_peft_logits(tiny_model_dir, out, tmp_path)
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, logits(peft_model), atol=1e-3)  # the mask mattered


def test_layers_restrict_the_export(moelora_dir, tmp_path):
    path, _ = moelora_dir
    out = str(tmp_path / "early")
    assert main(["export", path, "--expert", "0", "--layers", "0-1", "--output_dir", out, "--no_measure"]) == 0
    targets = json.load(open(os.path.join(out, "adapter_config.json")))["target_modules"]
    assert targets and all(".layers.0." in t or ".layers.1." in t for t in targets)


def test_merge_is_exact_for_a_constant_router(tiny_model_dir, tmp_path, capsys):
    """Soft routing with a zero router gives every token the same gates: the expected-gate merge is then exact."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = MoeLoraConfig(r=2, target_modules=["q_proj", "v_proj"], num_experts=3, router_type="soft",
                           init_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config).eval()
    for name, param in peft_model.named_parameters():
        if "moelora_router" in name:
            param.data.zero_()
    path = str(tmp_path / "soft")
    peft_model.save_pretrained(path)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(TEXTS) + "\n")
    out = str(tmp_path / "merged")
    status = main(["export", path, "--merge", "--output_dir", out, "--calibration_file", str(calibration),
                   "--base_model", tiny_model_dir, "--dtype", "float32"])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "quality loss" in printed and "exported LoRA" in printed
    info = json.load(open(os.path.join(out, "moe_peft_export.json")))
    quality = info["quality"]["nll"]
    assert quality["export"] == pytest.approx(quality["moelora"], abs=1e-4)
    assert quality["export"] != pytest.approx(quality["base"], abs=1e-4)
    for weights in info["per_module_weights"].values():
        np.testing.assert_allclose(weights, [1 / 3] * 3, atol=1e-6)
    assert json.load(open(os.path.join(out, "adapter_config.json")))["r"] == 6  # E * r
    torch.testing.assert_close(
        plain_peft_logits(tiny_model_dir, out, tmp_path), logits(peft_model), rtol=1e-4, atol=1e-4
    )


def test_merge_of_a_topk_adapter_measures_the_quality_loss(tiny_model_dir, moelora_dir, tmp_path, capsys):
    path, _ = moelora_dir
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(TEXTS * 2) + "\n")
    out = str(tmp_path / "merged")
    status = main(["export", path, "--merge", "--output_dir", out, "--calibration_file", str(calibration),
                   "--base_model", tiny_model_dir, "--dtype", "float32"])  # fmt: skip
    assert status == 0
    assert "quality loss: perplexity" in capsys.readouterr().out
    info = json.load(open(os.path.join(out, "moe_peft_export.json")))
    for weights in info["per_module_weights"].values():
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert set(info["quality"]["perplexity"]) == {"base", "moelora", "export"}


def _lora(tiny_model_dir, path, seed, r, target_modules=("q_proj", "v_proj")):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules),
                                            init_lora_weights=False))  # fmt: skip
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    lora.save_pretrained(path)
    return path


def test_mole_experts_export_back_to_their_loras(tiny_model_dir, tmp_path):
    loras = [_lora(tiny_model_dir, str(tmp_path / name), seed, r) for seed, (name, r) in
             enumerate([("lora_a", 2), ("lora_b", 4), ("lora_c", 2)])]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mole = get_peft_model(model, MoeLoraConfig(expert_adapters=loras, task_type="CAUSAL_LM"))
    mole_dir = str(tmp_path / "mole")
    mole.save_pretrained(mole_dir)

    one, subset = str(tmp_path / "b"), str(tmp_path / "a+c")
    assert main(["export", mole_dir, "--expert", "lora_b", "--output_dir", one, "--no_measure"]) == 0
    assert main(["export", mole_dir, "--experts", "lora_a,lora_c", "--output_dir", subset, "--no_measure"]) == 0
    exported_one, exported_subset = plain_peft_logits(tiny_model_dir, [one, subset], tmp_path)

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), loras[1]).eval()
    torch.testing.assert_close(exported_one, logits(reference), rtol=1e-4, atol=1e-4)
    both = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), loras[0], adapter_name="a")
    both.load_adapter(loras[2], adapter_name="c")
    both.base_model.set_adapter(["a", "c"])  # two active LoRAs add up
    torch.testing.assert_close(exported_subset, logits(both.eval()), rtol=1e-4, atol=1e-4)
    # Ranks are zero-padded to 4 inside the MoLE adapter: the concatenation has rank 4 + 4.
    assert json.load(open(os.path.join(subset, "adapter_config.json")))["r"] == 8


def test_export_errors(moelora_dir, tmp_path, tiny_model_dir, capsys):
    path, _ = moelora_dir
    assert main(["export", path, "--output_dir", str(tmp_path / "x")]) == 2
    assert "--expert" in capsys.readouterr().err
    assert main(["export", path, "--expert", "9", "--output_dir", str(tmp_path / "x"), "--no_measure"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["export", path, "--experts", "0,zed", "--output_dir", str(tmp_path / "x"), "--no_measure"]) == 2
    assert "Unknown expert" in capsys.readouterr().err
    lora = _lora(tiny_model_dir, str(tmp_path / "lora"), 0, 2)
    with pytest.raises(MoeLoraExportError, match="not a MOELORA adapter"):
        read_moelora(lora)


def test_collect_routing_agrees_with_the_layers_own_statistics(tiny_model_dir, moelora_dir):
    _, peft_model = moelora_dir
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    stats = collect_routing(peft_model, tokenizer, TEXTS[:1])
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        peft_model(**batch)
    own = peft_model.base_model.get_routing_stats()
    assert len(stats) == len(own) == 12
    for name, layer in stats.items():
        expected = own[name]["default"].expert_load.numpy()
        np.testing.assert_allclose(layer.expert_load.numpy(), expected, atol=1e-5)
        assert float(layer.mean_gate.sum()) == pytest.approx(1.0, abs=1e-5)
        assert int(layer.num_tokens) == batch["input_ids"].numel()


def test_inspect_command_writes_table_json_and_png(tiny_model_dir, moelora_dir, tmp_path, capsys):
    path, _ = moelora_dir
    out = str(tmp_path / "inspect")
    status = main(["inspect", path, "--base_model", tiny_model_dir, "--dtype", "float32", "--text", TEXTS[0],
                   "--text", TEXTS[1], "--output_dir", out, "--modules", r"layers\.0\."])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "L0.self_attn.q_proj" in printed and "entropy" in printed and "L1." not in printed
    stats = json.load(open(os.path.join(out, "routing_stats.json")))
    assert len(stats["layers"]) == 3 and stats["num_texts"] == 2
    with open(os.path.join(out, "routing_heatmap.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_export_layers_are_numbered_like_mola_layers():
    """`--layers` numbers decoder layers by the core rule (peft's `layers_to_transform`), honouring `layers_pattern`."""
    from moe_peft_plugin.config import split_layer_name
    from moe_peft_plugin.export import ExpertWeights, build_lora_state

    assert split_layer_name("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert split_layer_name("transformer.h.3.attn.c_attn") == (3, "attn.c_attn")
    assert split_layer_name("lm_head") == (None, "lm_head")
    # With a pattern, only that container counts: the encoder's inner `layer.0` is not the block index.
    assert split_layer_name("encoder.block.2.layer.0.SelfAttention.q", "block") == (2, "layer.0.SelfAttention.q")
    assert split_layer_name("encoder.block.2.layer.0.SelfAttention.q", "layer") == (0, "SelfAttention.q")

    experts = {
        name: ExpertWeights(torch.randn(2, 4, 8), torch.randn(2, 8, 4), 1.0)
        for name in ("encoder.block.0.layer.1.q", "encoder.block.1.layer.0.q")
    }
    weights = {name: np.array([1.0, 0.0]) for name in experts}
    state, _ = build_lora_state(experts, weights, [0, 1], layers={0}, layers_pattern="block")
    assert {key.split(".lora_")[0] for key in state} == {"base_model.model.encoder.block.0.layer.1.q"}
    state, _ = build_lora_state(experts, weights, [0, 1], layers={0}, layers_pattern="layer")
    assert {key.split(".lora_")[0] for key in state} == {"base_model.model.encoder.block.1.layer.0.q"}
