"""The routing figures: one screen for 210 modules, MoLA expert counts, task x expert panels; sizes and layouts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from moe_peft_plugin import task_routing
from trainer_callbacks import save_expert_load_summary, save_specialisation_report
from trainer_callbacks.plots import _group, layer_index_and_type


pytest.importorskip("matplotlib")

TYPES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
TYPES += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_module_names_are_grouped_by_decoder_layer_and_type():
    assert layer_index_and_type("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert layer_index_and_type("transformer.h.3.attn.c_attn") == (3, "attn.c_attn")
    assert layer_index_and_type("encoder.block.0.layer.1.DenseReluDense.wi") == (0, "layer.1.DenseReluDense.wi")
    assert layer_index_and_type("lm_head") == (None, "lm_head")
    grouped = _group(["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                      "lm_head"])  # fmt: skip
    assert grouped.layers == [0, 1] and grouped.other == ["lm_head"]
    assert list(grouped.labels.values()) == ["q_proj", "up_proj"]
    # The same leaf name in two stacks (encoder, decoder) or two places stays apart.
    grouped = _group(["model.encoder.layers.0.fc1", "model.decoder.layers.0.fc1"])
    assert sorted(grouped.labels.values()) == ["decoder.fc1", "encoder.fc1"]
    grouped = _group(["model.layers.0.self_attn.out_proj", "model.layers.0.cross_attn.out_proj"])
    assert sorted(grouped.labels.values()) == ["cross_attn.out_proj", "self_attn.out_proj"]


def test_expert_load_summary_fits_one_screen(tmp_path):
    rng = np.random.default_rng(0)
    # SmolLM2-135M all-linear: 30 decoder layers x 7 modules x 8 experts.
    loads = {f"model.layers.{layer}.{t}": rng.dirichlet(np.ones(8)) for layer in range(30) for t in TYPES}
    path = save_expert_load_summary(loads, str(tmp_path / "sub" / "load.png"), title="Expert load, step 10")
    pixels = _pixels(path)
    height, width, _ = pixels.shape
    assert 600 <= width <= 1600 and 400 <= height <= 1600 and pixels.std() > 10
    # 64 experts per module or 80 layers still stay within 1600 px.
    many = {f"model.layers.{layer}.{t}": rng.dirichlet(np.ones(64)) for layer in range(80) for t in TYPES}
    height, width, _ = _pixels(save_expert_load_summary(many, str(tmp_path / "many.png"))).shape
    assert width <= 1600 and height <= 1600


def test_expert_load_summary_mola_padding_and_other_modules(tmp_path):
    rng = np.random.default_rng(1)
    # MoLA 2/4/6/8: `moe-peft inspect` gives vectors of different lengths, the trainer NaN-padded rows: same picture.
    ragged = {
        f"model.layers.{layer}.{t}": rng.dirichlet(np.ones([2, 4, 6, 8][layer * 4 // 30]))
        for layer in range(30)
        for t in TYPES
    }
    padded = {name: np.concatenate([load, np.full(8 - len(load), np.nan)]) for name, load in ragged.items()}
    a = _pixels(save_expert_load_summary(ragged, str(tmp_path / "ragged.png")))
    b = _pixels(save_expert_load_summary(padded, str(tmp_path / "padded.png")))
    np.testing.assert_array_equal(a, b)
    # Modules outside numbered layers get a panel of their own; names without any layer still draw.
    with_head = {**ragged, "lm_head": rng.dirichlet(np.ones(8))}
    assert _pixels(save_expert_load_summary(with_head, str(tmp_path / "head.png"))).shape[1] <= 1600
    plain = {"0": [0.5, 0.5], "2": [0.9, 0.1], "4": [0.0, 1.0]}
    assert _pixels(save_expert_load_summary(plain, str(tmp_path / "plain.png"), expert_names=["x", "y"])).std() > 10
    with pytest.raises(ValueError, match="No expert loads"):
        save_expert_load_summary({}, str(tmp_path / "empty.png"))


def _results(num_layers: int, tasks: list, num_experts=lambda layer: 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.repeat(tasks, 20)
    counts = rng.integers(5, 50, size=len(labels))
    results = {}
    for layer in range(num_layers):
        for t in TYPES:
            experts = num_experts(layer)
            strength = layer / max(num_layers - 1, 1)
            prefs = {task: rng.dirichlet(np.ones(experts)) for task in tasks}
            loads = [(1 - strength) * rng.dirichlet(np.ones(experts)) + strength * prefs[label] for label in labels]
            results[f"model.layers.{layer}.{t}"] = task_routing(loads, labels, counts, experts_per_token=2)
    return results


def test_specialisation_report(tmp_path):
    tasks = ["ARC-e", "ARC-c", "BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "OBQA"]
    results = _results(30, tasks)
    chance = {name: 0.01 for name in results}
    path = save_specialisation_report(results, str(tmp_path / "spec.png"), chance=chance)
    pixels = _pixels(path)
    assert pixels.shape[0] <= 1600 and pixels.shape[1] <= 1600 and pixels.std() > 10
    # Spread over depth; chosen modules; MoLA expert counts; few layers, two tasks.
    save_specialisation_report(results, str(tmp_path / "spread.png"), spread=True, max_panels=4)
    save_specialisation_report(results, str(tmp_path / "chosen.png"), modules=["model.layers.0.mlp.up_proj"])
    mola = _results(4, ["a", "b"], num_experts=lambda layer: [2, 4][layer // 2])
    assert _pixels(save_specialisation_report(mola, str(tmp_path / "mola.png"))).std() > 10
    with pytest.raises(ValueError, match="Unknown modules"):
        save_specialisation_report(results, str(tmp_path / "bad.png"), modules=["nope"])
    # A single task has no specialisation (NaN): drawn without panels rather than failing.
    single = {name: task_routing([[0.5, 0.5]], ["a"]) for name in ["model.layers.0.q", "model.layers.1.q"]}
    save_specialisation_report(single, str(tmp_path / "single.png"))
