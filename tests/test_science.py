"""The parts of `benchmarks/science.py` that decide its numbers: the run plan, the measures and the report."""

from __future__ import annotations

import importlib.util
import json
import math
import re
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


def test_specialisation_by_layer_routes_validation_questions_of_every_task_through_every_layer(science, monkeypatch):
    model, tokenizer = build_tiny_llama()
    config = MoeLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_peft_model(model, config).eval()
    asked = []
    texts = {"cats": ["the cat sat on the mat", "a cat and a mat"], "experts": ["mixture of experts", "experts route"]}

    def mc_texts(task, split, count):
        asked.append((task, split, count))
        return texts[task]

    monkeypatch.setattr(science, "mc_texts", mc_texts)
    measured = science.specialisation_by_layer(model, tokenizer, ["cats", "experts"])
    assert asked == [(task, "validation", science.SPECIALISATION_PROBE_PER_TASK) for task in ("cats", "experts")]
    assert measured["questions_per_task"] == science.SPECIALISATION_PROBE_PER_TASK
    layers = {name for name, m in model.base_model.model.named_modules() if isinstance(m, MoeLoraLayer)}
    assert set(measured["layers"]) == layers
    for row in measured["layers"].values():
        assert 0.0 <= row["specialisation"] <= 1.0 and 0.0 <= row["chance"] <= 1.0


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


def test_seeds_to_resolve_a_one_point_difference(science):
    # Spread 1 point (std) over seeds, no question error: 2 * 0.01 / sqrt(n) < 0.01 needs n > 4.
    assert science.seeds_to_resolve([0.0, 0.01, 0.02]) == "4"
    assert science.seeds_to_resolve([0.0, 0.02, 0.04]) == "16"
    # The question error takes its share first: 2 * sqrt(1e-4 / n + 0.003**2) < 0.01 needs n > 6.25.
    assert science.seeds_to_resolve([0.0, 0.01, 0.02], question_se=0.003) == "7"
    assert science.seeds_to_resolve([0.0, 0.01, 0.02], question_se=0.005) == "more questions, not seeds"
    assert science.seeds_to_resolve([0.01, 0.01]) == "2"
    assert science.seeds_to_resolve([0.3]) == "–"


def test_uniform_entropy_is_the_mean_of_ln_e_over_layers(science):
    assert science.uniform_entropy({"adapter": {"num_experts": 8}}) == pytest.approx(math.log(8))
    # MoLA 2-4-6-8 over groups of 8, 7, 7 and 8 layers: well below ln 8 (its entropy was shown against ln 8 before).
    expected = (8 * math.log(2) + 7 * math.log(4) + 7 * math.log(6) + 8 * math.log(8)) / 30
    assert science.mola_group_sizes() == [8, 7, 7, 8]
    assert science.uniform_entropy({"adapter": {"num_experts": science.mola_list((2, 4, 6, 8))}}) == pytest.approx(
        expected
    )


def test_loss_by_quarter_averages_each_quarter_of_training_over_runs(science):
    first = {"loss_curve": [[s, 10.0 - s] for s in range(1, 9)]}  # steps 1..8: quarters (0,2], (2,4], (4,6], (6,8]
    second = {"loss_curve": [[s, 12.0 - s] for s in range(1, 9)]}
    assert science.loss_by_quarter([first]) == pytest.approx([8.5, 6.5, 4.5, 2.5])
    assert science.loss_by_quarter([first, second]) == pytest.approx([9.5, 7.5, 5.5, 3.5])
    assert science.loss_by_quarter([{"loss_curve": [[1, 2.0], [2, 1.0]]}]) is None  # too short to tell


def test_flattening_sentence_compares_the_last_quarter_with_the_first_three(science):
    quarters = {"a": [3.0, 2.8, 2.7, 2.65], "b": [3.1, 2.9, 2.8, 2.70], "c": None}
    sentence = science.flattening_sentence(quarters, {"a": "Method A"})
    # Falls from the third to the last quarter: a 0.05, b 0.10; over the first three: a 0.30, b 0.30.
    assert "fell by 0.050 to 0.100 (the least: Method A), against 0.300 to 0.300" in sentence
    assert "have not stopped falling" in sentence
    flat = science.flattening_sentence({"a": [3.0, 2.8, 2.7, 2.695]}, {})
    assert "fell by 0.005 to 0.005" in flat and "every curve has flattened" in flat
    assert science.flattening_sentence({"c": None}, {}) is None


def _routed_run(name, seed, specialisation, macro):
    return {
        "spec": {"name": name, "seed": seed},
        "eval": {"task": {"accuracy": macro}},
        "routing_over_training": [{"step": 100, "router/specialisation": specialisation}],
    }


def test_specialisation_and_accuracy_correlates_within_methods_only(science):
    # Method b specialises more and scores higher than method a (a method difference), but within each method the
    # seed that specialises more scores lower: the pooled within-method correlation is -1, not positive.
    groups = {
        "a": [_routed_run("a", s, 0.020 + 0.001 * s, 0.45 - 0.01 * s) for s in range(4)],
        "b": [_routed_run("b", s, 0.040 + 0.001 * s, 0.55 - 0.01 * s) for s in range(4)],
    }
    sentence = science.specialisation_and_accuracy(groups, permutations=20_000)
    assert "r = -1.00 (8 runs of 2 methods" in sentence
    p_value = float(re.search(r"permutation p = ([\d.]+)", sentence).group(1))
    # Only the orderings that reverse both methods' seeds reach |r| = 1: 2 of 4! x 4! = 576 (p = 1/288), by chance.
    assert p_value == pytest.approx(2 / 576, abs=0.0015)
    assert "lower accuracy where the routers specialise more" in sentence
    # Unrelated within methods: no claim.
    noisy = {"a": [_routed_run("a", s, 0.02 + 0.001 * s, 0.45 + 0.01 * (s in (0, 3))) for s in range(4)]}
    assert "r = +0.00" in science.specialisation_and_accuracy(noisy, permutations=200)
    assert "not resolved" in science.specialisation_and_accuracy(noisy, permutations=200)
    assert science.specialisation_and_accuracy({"a": groups["a"][:1]}) is None  # one run per method: nothing to pool


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


def _write(science, out_dir, spec, result):
    path = science.result_path(out_dir, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))


def test_multitask_study_tunes_on_validation_then_runs_seeds_on_held_out_questions(science, tmp_path):
    """The final runs appear only once a method's whole grid has finished, at its best validation rate; the variants
    take the rate of the method they vary; seed 0 of a tuned method reuses the grid's adapter."""
    from moe_peft_cli.data import COMMONSENSE_TASKS
    from moe_peft_cli.train import DEFAULT_MAX_STEPS

    runs = science.plan(["multitask"], seeds=[0, 1, 2], max_steps=1, eval_size=1, out_dir=tmp_path)
    grid = [r for r in runs if r.study == "multitask_lr"]
    assert not [r for r in runs if r.study == "multitask"]  # nothing chosen yet: no held-out scoring at all
    assert {(r.name, r.seed) for r in grid} == {
        (science.grid_run_name(m, lr), 0) for m in ("mt_lora_r64", "mt_moelora") for lr in science.MULTITASK_LEARNING_RATES
    }  # fmt: skip
    for run in runs:
        assert (
            run.mixture
            and run.train_tasks in ([], list(COMMONSENSE_TASKS))
            and run.eval_tasks == list(COMMONSENSE_TASKS)
        )
        assert run.eval_split == ("validation" if run.study == "multitask_lr" else "eval")  # never choose on held-out
        assert run.kind == "base" or run.max_steps == DEFAULT_MAX_STEPS  # the main job's length
    # LoRA's grid finishes with 1e-3 best; MoELoRA's grid is one run short.
    best = {1e-4: 0.40, 3e-4: 0.45, 1e-3: 0.47}
    for run in grid:
        if run.name.startswith("mt_lora_r64") or run.learning_rate != 1e-3:
            accuracy = best[run.learning_rate] if run.name.startswith("mt_lora_r64") else 0.5 - run.learning_rate * 100
            _write(science, tmp_path, run, _fake_result(science, run, {t: accuracy for t in COMMONSENSE_TASKS}))
    runs = science.plan(["multitask"], seeds=[0, 1, 2], max_steps=1, eval_size=1, out_dir=tmp_path)
    assert [r.kind for r in runs if r.study == "multitask"][3] == "base"  # after the tuned method's seeds
    final = [r for r in runs if r.study == "multitask" and r.kind != "base"]
    assert {r.name for r in final} == {"mt_lora_r64", "mt_lora_r8"}
    assert {r.learning_rate for r in final} == {1e-3}
    reuse = [r for r in final if r.adapter_from]
    assert [(r.name, r.seed, r.adapter_from, r.inputs) for r in reuse] == [
        ("mt_lora_r64", 0, "mt_lora_r64_lr0.001-seed0", ["mt_lora_r64_lr0.001-seed0"])
    ]
    assert all(r.eval_size == 400 and r.eval_split == "eval" for r in final)
    # MoELoRA's grid completes: 1e-4 is its best; its variants follow it, and the main comparison runs first.
    last = next(r for r in grid if r.name == science.grid_run_name("mt_moelora", 1e-3))
    _write(science, tmp_path, last, _fake_result(science, last, {t: 0.1 for t in COMMONSENSE_TASKS}))
    runs = science.plan(["multitask"], seeds=[0, 1, 2], max_steps=1, eval_size=1, out_dir=tmp_path)
    final = [r for r in runs if r.study == "multitask" and r.kind != "base"]
    order = [(r.name, r.seed) for r in final]
    assert order[:6] == [(n, s) for s in (0, 1, 2) for n in ("mt_lora_r64", "mt_moelora")]
    variants = len(science.multitask_methods()) - 2
    assert [s for _, s in order[6:]] == [s for s in (0, 1, 2) for _ in range(variants)]  # seed by seed
    rates = {r.name: r.learning_rate for r in final}
    assert rates["mt_moelora"] == rates["mt_moelora_no_contrastive"] == rates["mt_mola_2468"] == 1e-4
    assert rates["mt_lora_r8"] == rates["mt_lora_r64"] == 1e-3
    assert len(order) == len(set(order)) == 3 * len(science.multitask_methods())
    mola = {r.name: r.adapter["num_experts"] for r in final if r.name.startswith("mt_mola")}
    # MoLA's claims are at equal experts (a symmetric middle-heavy allocation can only come close)
    assert sum(mola["mt_mola_2468"]) == sum(mola["mt_mola_5555"]) == sum(mola["mt_mola_8642"]) == 150
    assert sum(mola["mt_mola_3773"]) == 146 and mola["mt_mola_3773"][15] == 7 and mola["mt_mola_3773"][0] == 3
    seen = set()
    for run in runs:
        assert all(i in seen for i in run.inputs), f"{run.run_dir} runs before its inputs"
        seen.add(run.run_dir)


def test_long_study_runs_the_main_comparison_longer_at_the_chosen_rates_and_reports_it(science, tmp_path):
    from moe_peft_cli.data import COMMONSENSE_TASKS

    tasks = list(COMMONSENSE_TASKS)
    assert science.plan(["multitask_long"], seeds=[0, 1], max_steps=1, eval_size=1, out_dir=tmp_path) == []  # no rates
    for run in science.plan(["multitask"], seeds=[0, 1], max_steps=1, eval_size=1, out_dir=tmp_path):
        if run.study == "multitask_lr":  # LoRA r=64 best at 3e-4, MoELoRA at 1e-3
            best = 3e-4 if run.name.startswith("mt_lora_r64") else 1e-3
            _write(science, tmp_path, run, _fake_result(science, run, {t: 0.5 if run.learning_rate == best else 0.4
                                                                       for t in tasks}))  # fmt: skip
    runs = science.plan(["multitask_long"], seeds=[0, 1], max_steps=1, eval_size=1, out_dir=tmp_path)
    assert [(r.name, r.seed, r.learning_rate) for r in runs] == [
        (science.long_run_name(name), seed, rate) for seed in (0, 1) for name, rate in (("mt_lora_r64", 3e-4),
                                                                                          ("mt_moelora", 1e-3))
    ]  # fmt: skip
    assert all(r.study == "multitask_long" and r.max_steps == science.LONG_STEPS == 300 for r in runs)
    assert all(r.mixture and r.eval_split == "eval" and r.eval_size == 400 and not r.adapter_from for r in runs)
    assert runs[1].router_lr_ratio == 10.0 and runs[1].probe_every == science.MULTITASK_PROBE_EVERY
    assert runs[1].adapter == science.multitask_methods()["mt_moelora"].adapter

    def correct(rate, n=50):
        return [1] * int(rate * n) + [0] * (n - int(rate * n))

    # 100-step runs at 0.50 (LoRA) and 0.52 (MoELoRA); 300-step runs 4 points higher each.
    finals = science.plan(["multitask"], seeds=[0, 1], max_steps=1, eval_size=1, out_dir=tmp_path)
    for run in [r for r in finals if r.study == "multitask" and r.name in ("mt_lora_r64", "mt_moelora")] + runs:
        rate = (0.52 if "moelora" in run.name else 0.50) + (0.04 if run.study == "multitask_long" else 0.0)
        result = _fake_result(science, run, {t: rate for t in tasks})
        result["loss_curve"] = [[step, 3.0 - 0.001 * step] for step in range(5, run.max_steps + 5, 5)]
        for task in tasks:
            result["eval"][task].update(n=50, correct=correct(rate))
        if "moelora" in run.name:  # layers 0 and 1; q more specialised than v; seed 1 twice seed 0
            scale = 1 + run.seed
            result["specialisation_by_layer"] = {"questions_per_task": 32, "layers": {
                f"model.layers.{layer}.self_attn.{module}": {"specialisation": scale * value, "chance": 0.01}
                for layer, module, value in ((0, "q_proj", 0.02), (0, "v_proj", 0.01), (1, "q_proj", 0.06),
                                             (1, "v_proj", 0.03))}}  # fmt: skip
        _write(science, tmp_path, run, result)
    text = science.report(tmp_path).read_text()
    by_layer = text.split("## Task specialisation per layer, after training", 1)[1]
    # Means over seeds (x1.5): q 0.06, v 0.03, all 0.045; layer 1 (0.0675) above layer 0 (0.0225).
    assert "| method | seeds | q_proj | v_proj | all layers | chance | most specialised decoder layer |" in by_layer
    assert "| MoELoRA 8×r8 top-2 (+contrastive) | 0,1 | 0.060 | 0.030 | 0.045 | 0.010 | 1 (0.068) |" in by_layer
    assert "| MoELoRA 8×r8 top-2 (+contrastive), 300 steps | 0,1 | 0.060 |" in by_layer
    assert (tmp_path / "specialisation_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    section = text.split("## Longer training: the main comparison at 300 steps", 1)[1]
    assert "| LoRA r=64, 300 steps | 0.0003 | 0,1 | 54.0 ± 0.0 |" in section
    assert "| MoELoRA 8×r8 top-2 (+contrastive), 300 steps | 0.001 | 0,1 | 56.0 ± 0.0 |" in section
    assert "| MoE-LoRA beats LoRA at equal trainable parameters, 300 steps |" in section
    assert "| 300 steps beat 100 for LoRA r=64 | – | +4.0 ± 0.0 (n=2;" in section
    # Loss 3 - 0.001 * step over 300 steps: it falls 0.075 per quarter, not flat.
    assert "fell by 0.075 to 0.075" in section and "have not stopped falling" in section
    assert (tmp_path / "multitask_long_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_grid_runs_moelora_adapter_loads_for_its_held_out_scoring(tmp_path):
    """`load_trained` in a fresh process, as `science.py one` runs it: nothing else has registered MOELORA there."""
    import subprocess

    model, _ = build_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    config = MoeLoraConfig(num_experts=2, top_k=1, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(tmp_path / "work" / "grid-seed0" / "adapter")
    script = f"""
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("science_benchmark", {str(SCRIPT)!r})
science = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = science
spec.loader.exec_module(science)
import moe_peft_cli.models
from transformers import AutoModelForCausalLM
assert "moe_peft_plugin" not in sys.modules
moe_peft_cli.models.load_base = lambda *args: (AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}), None)
run = science.RunSpec("final", "multitask", "moelora", 0, [], [], adapter_from="grid-seed0")
model, _ = science.load_trained(run, Path({str(tmp_path / "work")!r}))
print(model.peft_config["default"].peft_type)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("MOELORA")


def test_runner_plans_again_after_each_run_so_newly_planned_runs_keep_their_priority(science, tmp_path, monkeypatch):
    """A final run planned from a grid run's result goes before a variant that was planned earlier but ranks lower."""
    import argparse

    def spec(name):
        return science.RunSpec(name, "multitask", "lora", 0, [], [])

    grid, final, variant = spec("grid"), spec("final"), spec("variant")

    def plan(*args):
        grid_done = science.result_path(tmp_path, grid).is_file()
        return [grid, final, variant] if grid_done else [grid, variant]

    launched = []

    def launch(run, args, threads):
        launched.append(run.name)
        _write(science, tmp_path, run, {})
        return run, 0, 0.0

    monkeypatch.setattr(science, "plan", plan)
    monkeypatch.setattr(science, "launch", launch)
    monkeypatch.setattr(science, "report", lambda out_dir: None)
    args = argparse.Namespace(studies=["multitask"], seeds=[0], max_steps=1, eval_size=1, jobs=1, out_dir=tmp_path)
    assert science.run_all(args) == 0
    assert launched == ["grid", "final", "variant"]


def test_multitask_report_gives_the_grid_the_held_out_table_and_paired_verdicts(science, tmp_path):
    from moe_peft_cli.data import COMMONSENSE_TASKS

    tasks = list(COMMONSENSE_TASKS)

    def correct(rate, n=50):
        return [1] * int(rate * n) + [0] * (n - int(rate * n))

    grid_scores = {("mt_lora_r64", 3e-4): 0.5, ("mt_moelora", 3e-4): 0.5}
    runs = science.plan(["multitask"], seeds=[0, 1, 2], max_steps=1, eval_size=1, out_dir=tmp_path)
    for run in runs:
        if run.study == "multitask_lr":
            method = run.name.rsplit("_lr", 1)[0]
            accuracy = grid_scores.get((method, run.learning_rate), 0.4)
            _write(science, tmp_path, run, _fake_result(science, run, {t: accuracy for t in tasks}))
    runs = science.plan(["multitask"], seeds=[0, 1, 2], max_steps=1, eval_size=1, out_dir=tmp_path)
    for run in runs:
        if run.study != "multitask" or run.name not in ("mt_base", "mt_lora_r64", "mt_moelora"):
            continue
        rate = {"mt_base": 0.3, "mt_lora_r64": 0.5, "mt_moelora": 0.6}[run.name] + (0.02 * run.seed if run.seed else 0)
        result = _fake_result(science, run, {t: rate for t in tasks})
        result["loss_curve"] = [[step, 3.0 - 0.01 * step] for step in range(5, 105, 5)]
        for task in tasks:
            result["eval"][task].update(n=50, correct=correct(rate))
        if run.name == "mt_moelora":
            result["routing_over_training"] = [
                {"step": s, "router/entropy": 2.0, "router/specialisation": 0.03, "router/specialisation_max": 0.1,
                 "router/specialisation_chance": 0.01, "router/dead_experts": 10.0 + run.seed} for s in (0, 50, 100)
            ]  # fmt: skip
            result["routing"] = {"per_layer": [{"num_experts": 8}] * 3}
        _write(science, tmp_path, run, result)
    text = science.report(tmp_path).read_text()
    assert "| method | lr 0.0001 | lr 0.0003 | lr 0.001 |" in text
    assert "| LoRA r=64 | 40.0 | **50.0** | 40.0 |" in text
    assert "| MoELoRA 8×r8 top-2 (+contrastive) | 40.0 | **50.0** | 40.0 |" in text
    assert "Held-out accuracy % (400 questions over the 8 tasks" in text
    assert "| LoRA r=64 | 0.0003 | 0,1,2 | 52.0 ± 2.0 |" in text
    assert "| base model (no adapter) | – | 0 | 30.0 (1 seed) |" in text
    # MoELoRA - LoRA r=64: +10 points at every seed; entropy 2.0 / ln 8; specialisation from the last probe.
    assert "| MoE-LoRA beats LoRA at equal trainable parameters (8 tasks at once) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| MoE-LoRA beats LoRA"))
    assert "+10.0 ± 0.0 (n=3;" in row and "| agrees |" in row
    assert row.endswith("| more questions, not seeds |")  # 50 questions per task: question s.e. > 0.5 point
    assert "| verdict | seeds for 2 s.e. < 1 point |" in text
    # Loss 3 - 0.01 * step at steps 5, 10, ..., 100: quarter means at steps 15, 40, 65 and 90.
    assert "Has training flattened?" in text and "LoRA r=64 2.85 / 2.60 / 2.35 / 2.10;" in text
    # mean ± 2 s.e.: with no spread over seeds, the question-sampling error alone.
    interval = re.search(r"question s\.e\. ([\d.]+)\) \| \[([-+][\d.]+), ([-+][\d.]+)\] \|", row)
    question_se, low, high = map(float, interval.groups())
    assert (low, high) == pytest.approx((10 - 2 * question_se, 10 + 2 * question_se), abs=0.11)
    assert "0.962 ± 0.000 | 11 ± 1 of 24 | 0.030 ± 0.000 / 0.100 ± 0.000 (0.010 ± 0.000)" in text
    assert "From the third to the last quarter the loss fell by 0.250 to 0.250" in text
    assert "Does specialising more go with accuracy?" not in text  # 3 routed runs: too few to pool (4 at least)
    for name in ("multitask_loss.png", "multitask_lr_loss.png", "multitask_routing_over_training.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name


def test_a_one_seed_variant_pairs_only_with_its_own_seed_but_the_base_with_every_seed(science):
    def run(name, kind, seed):
        return {"spec": {"name": name, "kind": kind, "seed": seed}}

    groups = {
        "mt_moelora": [run("mt_moelora", "moelora", seed) for seed in (0, 1, 2)],
        "mt_moelora_no_contrastive": [run("mt_moelora_no_contrastive", "moelora", 0)],
        "mt_base": [run("mt_base", "base", 0)],
    }
    pairs = science._pairs(groups, "mt_moelora_no_contrastive", "mt_moelora")
    assert [(a["spec"]["seed"], b["spec"]["seed"]) for a, b in pairs] == [(0, 0)]
    assert len(science._pairs(groups, "mt_base", "mt_moelora")) == 3
