"""The parts of `benchmarks/science.py` that decide its numbers: the run plan, the measures and the report."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model

from moe_peft_plugin import MoeLoraConfig, MoeLoraLayer

from .helpers import build_tiny_llama


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "science.py"


@pytest.fixture(scope="module")
def science():
    spec = importlib.util.spec_from_file_location("science_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_mola_allocations_have_equal_totals_and_follow_the_layer_order(science):
    totals = {name: sum(science.mola_list(a)) for name, a in science.MOLA_ALLOCATIONS.items()}
    assert set(totals.values()) == {150}, totals
    counts = science.mola_list((2, 4, 6, 8))
    assert len(counts) == science.NUM_LAYERS
    assert counts[0] == 2 and counts[-1] == 8 and counts == sorted(counts)


def test_mola_groups_are_the_library_rule_and_the_documented_ones(science):
    """The study's layer groups come from the library's rule, and are the groups the results page describes."""
    from moe_peft_plugin.config import mola_group_sizes

    assert science.mola_group_sizes() == mola_group_sizes(30, 4) == [8, 7, 7, 8]
    results = (Path(__file__).resolve().parents[1] / "docs" / "science" / "RESULTS.md").read_text()
    assert "Groups of 8-7-7-8 consecutive layers" in results
    counts = science.mola_list((2, 4, 6, 8))
    assert counts == [2] * 8 + [4] * 7 + [6] * 7 + [8] * 8


def test_plan_runs_inputs_first_and_seeds_every_trained_comparison(science):
    runs = science.plan(["moelora", "mola", "mole"], seeds=[0, 1, 2], max_steps=5, eval_size=10)
    seen = set()
    for run in runs:
        assert all(i in seen for i in run.inputs), f"{run.run_dir} runs before its inputs {run.inputs}"
        seen.add(run.run_dir)
    assert len(seen) == len(runs), "two runs share a result folder"
    by_name = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run.seed)
    for name in ("lora_r64", "moelora", "moelora_contrastive", "mola_2468", "mola_5555", "mola_8642", "mole"):
        assert by_name[name] == [0, 1, 2], name
    assert by_name["mole_lr1e-2"] == [0, 1, 2]
    mole = [r for r in runs if r.name == "mole"]
    assert [r.mask_experts for r in mole] == [True, False, False]
    assert all(r.adapter["router_type"] == "soft" and len(r.inputs) == 3 for r in mole)
    # Equal trainable parameters: E * r of MoELoRA equals the rank of the LoRA baseline.
    moelora = next(r for r in runs if r.name == "moelora").adapter
    assert moelora["num_experts"] * moelora["r"] == next(r for r in runs if r.name == "lora_r64").adapter["r"]
    base = next(r for r in runs if r.kind == "base")
    assert set(base.eval_tasks) == {science.MOELORA_TASK, *science.MOLE_TASKS}


def test_router_study_chooses_on_validation_questions_in_the_multi_task_setting(science):
    from moe_peft_cli.data import COMMONSENSE_TASKS

    runs = science.plan(["router"], seeds=[0, 1], max_steps=150, eval_size=10)
    assert [(r.name, r.seed) for r in runs] == [(n, s) for s in (0, 1) for n in science.ROUTER_LR_RATIOS]
    for run in runs:
        assert run.mixture and run.eval_split == "validation" and run.probe_every > 0  # never the held-out questions
        assert run.train_tasks == run.eval_tasks == list(COMMONSENSE_TASKS) and run.max_steps == 150
        assert run.router_lr_ratio == science.ROUTER_LR_RATIOS[run.name]
    assert len({json.dumps(r.adapter, sort_keys=True) for r in runs}) == 1  # only the router learning rate differs


def test_expert_similarity_matches_the_materialised_outputs(science):
    model, _ = build_tiny_llama()
    config = MoeLoraConfig(r=4, num_experts=5, top_k=2, target_modules=["q_proj"], init_weights=False)
    model = get_peft_model(model, config)
    layer = next(m for m in model.modules() if isinstance(m, MoeLoraLayer))
    x = torch.randn(30, layer.in_features)
    A, B = layer.moelora_A["default"].double(), layer.moelora_B["default"].double()
    outputs = torch.stack([x.double() @ A[e].T @ B[e].T for e in range(5)], dim=1)  # (tokens, E, out)
    unit = torch.nn.functional.normalize(outputs, dim=-1)
    cosine = unit @ unit.transpose(1, 2)
    expected = cosine[:, ~torch.eye(5, dtype=torch.bool)].mean().detach()
    assert science.expert_similarity(layer, x) == pytest.approx(float(expected), rel=1e-9)
    with torch.no_grad():  # identical experts: similarity 1
        layer.moelora_A["default"][:] = layer.moelora_A["default"][0]
        layer.moelora_B["default"][:] = layer.moelora_B["default"][0]
    assert science.expert_similarity(layer, x) == pytest.approx(1.0, rel=1e-9)


def test_routing_measures_cover_every_layer_on_real_tokens_only(science):
    model, tokenizer = build_tiny_llama()
    config = MoeLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_peft_model(model, config).eval()
    texts = ["the cat sat on the mat", "a mixture of experts routes every token to a few experts"]
    measures = science.routing_measures(model, tokenizer, texts)
    assert measures["tokens"] == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert len(measures["per_layer"]) == 2 * 4  # two targets in four layers
    for row in measures["per_layer"]:
        assert sum(row["load"]) == pytest.approx(1.0)
        assert 1.0 <= row["max_load_x_E"] <= 4.0
        assert 0.0 < row["entropy_over_lnE"] <= 1.0 + 1e-6
        assert -1.0 <= row["similarity"] <= 1.0
    assert measures["similarity"] == pytest.approx(np.mean([r["similarity"] for r in measures["per_layer"]]))


def test_verdict_needs_two_standard_errors(science):
    assert science.verdict([0.05, 0.06, 0.04]) == "agrees"
    assert science.verdict([-0.05, -0.06, -0.04]) == "disagrees"
    assert science.verdict([0.05, -0.04, 0.01]).startswith("not resolved")
    assert science.verdict([0.3]).startswith("one seed")


def test_question_standard_error_is_the_paired_error_of_the_seed_mean(science):
    def run(correct):
        return {"eval": {"t": {"correct": correct}}}

    a = [run([1, 0, 0, 1]), run([1, 1, 0, 0])]
    b = [run([1, 1, 0, 1]), run([1, 1, 1, 0])]
    per_question = np.array([0.0, 0.5, 0.5, 0.0])  # mean over the two pairs of b - a, per question
    expected = per_question.std(ddof=1) / 2
    assert science.question_standard_error(list(zip(a, b)), ["t"]) == pytest.approx(expected)
    # Two tasks: the error of the mean over tasks.
    both = [
        ({"eval": {**x["eval"], "u": x["eval"]["t"]}}, {"eval": {**y["eval"], "u": y["eval"]["t"]}})
        for x, y in zip(a, b)
    ]
    assert science.question_standard_error(both, ["t", "u"]) == pytest.approx(expected / 2**0.5)
    # A seed-consistent gain inside the question noise is not resolved; far beyond it, it agrees.
    assert science.verdict([0.02, 0.02, 0.02], question_se=0.03).startswith("not resolved")
    assert science.verdict([0.2, 0.2, 0.2], question_se=0.03) == "agrees"


def _fake_result(science, spec, accuracies: dict, similarity=None, loss=(2.0, 1.5)):
    result = {
        "spec": asdict(spec),
        "environment": {"date": "2026-11-25T00:00:00+00:00", "torch": "x"},
        "train_seconds": 60.0,
        "trainable_params": 1_000_000,
        "loss_curve": [[5, loss[0]], [10, loss[1]]],
        "eval": {task: {"accuracy": acc, "n": 100, "correct": []} for task, acc in accuracies.items()},
    }
    if similarity is not None:
        result["routing"] = {"similarity": similarity, "max_load_x_E": 1.5, "entropy_over_lnE": 0.9}
    return result


def test_report_tables_pair_by_seed_and_plots_are_pngs(science, tmp_path):
    runs = science.plan(["moelora", "mole"], seeds=[0, 1, 2], max_steps=5, eval_size=10)
    task = science.MOELORA_TASK
    for spec in runs:
        if spec.name == "lora_r64":
            result = _fake_result(science, spec, {task: 0.40 + 0.01 * spec.seed})
        elif spec.name == "moelora":
            result = _fake_result(science, spec, {task: 0.42 + 0.01 * spec.seed}, similarity=0.2)
        elif spec.name == "moelora_contrastive":
            result = _fake_result(science, spec, {task: 0.43 + 0.02 * spec.seed}, similarity=0.1)
        elif spec.kind == "base":
            result = _fake_result(science, spec, {t: 0.3 for t in spec.eval_tasks})
        else:  # MoLE study: every adapter on every task
            acc = {"mole": 0.6, "linear_merge": 0.5}.get(spec.name, 0.55)
            result = _fake_result(science, spec, {t: acc for t in spec.eval_tasks})
            if spec.mask_experts:
                result["masked"] = {
                    name: {t: {"accuracy": 0.5 if name == f"lora_{t}-seed0" else 0.6} for t in spec.eval_tasks}
                    for name in spec.inputs
                }
        path = science.result_path(tmp_path, spec)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(result))

    text = science.report(tmp_path).read_text()
    assert "| LoRA r=64 | 1.00 M | 41.0 ± 1.0 | 0,1,2 |" in text
    assert "| MoELoRA + contrastive | 1.00 M | 45.0 ± 2.0 | 0,1,2 | 0.100 ± 0.000 |" in text
    assert "| base model (no adapter) | – | 30.0 (1 seed) |" in text
    # Paired differences: contrastive - LoRA = +3, +4, +5 points; contrastive - MoELoRA = +1, +2, +3.
    assert "MoELoRA + contrastive − LoRA r=64: +4.0 ± 1.0 points" in text
    assert "| MoELoRA beats LoRA at equal trainable parameters | +4.2 (math, MoELoRA paper) | +4.0 ± 1.0 points (n=3; question s.e. 0.0) " \
        "| agrees |" in text  # fmt: skip
    assert (
        "| The contrastive loss makes expert outputs more distinct (lower similarity) | its purpose | +0.100" in text
    )
    assert (
        "| MoLE (lr 0.001) beats the arithmetic merge (mean of the 3 tasks) | yes (MoLE paper) | +10.0 ± 0.0 points (n=3; question s.e. 0.0)"
        in text
    )
    assert "| MoLE gating, lr 0.001 (seeds 0,1,2) | 60.0 ± 0.0 | 60.0 ± 0.0 | 60.0 ± 0.0 | 60.0 ± 0.0 |" in text
    for task in science.MOLE_TASKS:
        assert f"| MoLE (lr 0.001): masking lora_{task} costs accuracy on its own task (seed 0) |" in text
        assert f"+10.0 points ({task}; question s.e. 0.0) | yes |" in text
    for png in ("moelora_accuracy.png", "moelora_loss.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
