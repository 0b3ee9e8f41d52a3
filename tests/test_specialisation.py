"""Task x expert load and the specialisation number: hand-computed cases, the accumulator, and a tiny model end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import get_peft_model

from moe_peft_plugin import (
    MoeLoraConfig,
    RoutingStats,
    TaskRouting,
    TaskRoutingAccumulator,
    shuffled_specialisation,
    task_routing,
)

from .helpers import build_tiny_llama


def test_independent_routing_gives_zero():
    # Both tasks spread their decisions alike (sample by sample they differ, per task they do not).
    load = np.array([[0.5, 0.25, 0.25], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25], [0.1, 0.3, 0.6]])
    result = task_routing(load, ["a", "a", "b", "b"], [3, 5, 3, 5])
    np.testing.assert_allclose(result.load[0], result.load[1])
    np.testing.assert_allclose(result.load.sum(1), 1.0)
    assert result.mutual_information == pytest.approx(0.0, abs=1e-12)
    assert result.specialisation == pytest.approx(0.0, abs=1e-12)
    assert result.task_entropy == pytest.approx(math.log(2))


def test_task_determines_expert_gives_one():
    # Top-1: task a always expert 0, task b always expert 1 (of 3).
    load = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    result = task_routing(load, ["b", "b", "a"], [2, 7, 4])
    assert result.tasks == ["a", "b"]  # sorted labels
    np.testing.assert_allclose(result.load, [[0, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(result.task_share, [4 / 13, 9 / 13])
    assert result.mutual_information == pytest.approx(result.task_entropy)
    assert result.specialisation == pytest.approx(1.0)
    # Four tasks on two experts (top-1), two tasks per expert: the task determines the expert; I = H(X) = log 2.
    load = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    result = task_routing(load, [0, 1, 2, 3])
    assert result.mutual_information == pytest.approx(math.log(2))
    assert result.specialisation == pytest.approx(1.0)
    assert result.mutual_information / result.task_entropy == pytest.approx(0.5)  # what I / H(T) would say


def test_known_two_by_two():
    # Token-weighted joint p(t, x) = [[4, 1], [1, 4]] / 10.
    load = np.array([[1, 0], [0, 1], [0, 1], [1, 0]])
    result = task_routing(load, ["a", "a", "b", "b"], [4, 1, 4, 1])
    np.testing.assert_allclose(result.load, [[0.8, 0.2], [0.2, 0.8]])
    np.testing.assert_allclose(result.expert_load, [0.5, 0.5])
    # I = sum p log(p / (p_t p_x)) = 2 * 0.4 * log(0.4 / 0.25) + 2 * 0.1 * log(0.1 / 0.25)
    expected = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert result.mutual_information == pytest.approx(expected)  # 0.19274 nats
    assert result.specialisation == pytest.approx(expected / math.log(2))  # 0.2781
    # Without the token weights every sample counts once: p = [[1, 1], [1, 1]] / 4, independent.
    assert task_routing(load, ["a", "a", "b", "b"]).specialisation == pytest.approx(0.0, abs=1e-12)


def test_top_k_ceiling():
    # Top-2 of 4 experts, 4 tasks: tasks 0, 1 always use experts {0, 1}, tasks 2, 3 always {2, 3}. Each decision's
    # expert is never determined by the task (H(X | T) = log 2 at best), but the expert *set* is: that is the most
    # a top-2 router can do, so it scores 1 (I = log(E / k) = log 2), while I / H(T) would say 0.5.
    pair_a, pair_b = [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]
    result = task_routing(np.array([pair_a, pair_a, pair_b, pair_b]), [0, 1, 2, 3], experts_per_token=2)
    assert result.mutual_information == pytest.approx(math.log(2))
    assert result.max_mutual_information == pytest.approx(math.log(2))
    assert result.specialisation == pytest.approx(1.0)
    # Two tasks on disjoint pairs: the expert gives the task, I = H(T).
    result = task_routing(np.array([pair_a, pair_b]), ["x", "y"], experts_per_token=2)
    assert result.specialisation == pytest.approx(1.0)
    # A collapsed router (everyone on experts {0, 1}) is not specialised, whatever the noise.
    noisy = np.array([[0.5, 0.5, 0, 0], [0.49, 0.5, 0.01, 0]])
    result = task_routing(noisy, ["x", "y"], experts_per_token=2)
    assert 0 < result.specialisation < 0.01


def test_token_weights_masks_and_edge_cases():
    rng = np.random.default_rng(0)
    load = rng.dirichlet(np.ones(4), size=6)
    labels = ["a", "b", "a", "c", "b", "c"]
    counts = np.array([3, 1, 2, 5, 4, 2])
    by_counts = task_routing(load, labels, counts)
    # An attention mask gives the same weights as its row sums; a sample of weight 2 equals two copies of weight 1.
    mask = (np.arange(5)[None, :] < counts[:, None]).astype(np.int64)
    by_mask = task_routing(torch.tensor(load), labels, torch.tensor(mask))
    doubled = task_routing(np.concatenate([load, load[:1]]), labels + ["a"], np.concatenate([counts, [3]]))
    single_sample_weights = task_routing(load, labels, np.where(np.arange(6) == 0, 6, counts))
    np.testing.assert_allclose(by_mask.load, by_counts.load)
    np.testing.assert_allclose(doubled.load, single_sample_weights.load)
    assert doubled.mutual_information == pytest.approx(single_sample_weights.mutual_information)
    np.testing.assert_array_equal(by_counts.num_samples, [2, 2, 2])
    # A task without samples keeps its row (NaN) and takes no share.
    with_empty = task_routing(load, labels, counts, tasks=["c", "b", "a", "d"])
    assert with_empty.tasks == ["c", "b", "a", "d"] and np.isnan(with_empty.load[3]).all()
    np.testing.assert_allclose(with_empty.load[:3], by_counts.load[::-1])
    assert with_empty.specialisation == pytest.approx(by_counts.specialisation)
    # One task: nothing to specialise on.
    assert math.isnan(task_routing(load, ["a"] * 6).specialisation)
    with pytest.raises(ValueError, match="task labels for"):
        task_routing(load, labels[:5])
    with pytest.raises(ValueError, match="token_counts"):
        task_routing(load, labels, counts[:5])
    with pytest.raises(ValueError, match="not among the tasks"):
        task_routing(load, labels, tasks=["a", "b"])
    joint = TaskRouting.from_joint([[4, 1], [1, 4]], ["a", "b"])
    assert joint.specialisation == pytest.approx((0.8 * math.log(1.6) + 0.2 * math.log(0.4)) / math.log(2))


def test_shuffled_specialisation_is_the_chance_level():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 50)
    counts = rng.integers(5, 40, size=200)
    random_load = rng.dirichlet(np.ones(8), size=200)  # routing unrelated to the task
    measured = task_routing(random_load, labels, counts, experts_per_token=2).specialisation
    chance = shuffled_specialisation(random_load, labels, counts, experts_per_token=2, num_permutations=30)
    assert 0 < chance < 0.1 and measured < 3 * chance  # finite samples: above 0, about the chance level
    # Routing that depends on the task stands far above its chance level.
    specialised = 0.5 * random_load + 0.5 * np.eye(8)[labels * 2]
    measured = task_routing(specialised, labels, counts, experts_per_token=2).specialisation
    chance = shuffled_specialisation(specialised, labels, counts, experts_per_token=2, num_permutations=30)
    assert measured > 0.3 and measured > 10 * chance


def _stats(sample_load: np.ndarray, experts_per_token: int = 1) -> RoutingStats:
    sample_load = torch.tensor(sample_load, dtype=torch.float32)
    load = sample_load.mean(0)
    return RoutingStats(
        expert_load=load,
        mean_gate=load,
        entropy=torch.tensor(0.0),
        num_tokens=torch.tensor(float(len(sample_load))),
        experts_per_token=experts_per_token,
        router_type="topk",
        sample_load=sample_load,
    )


def test_accumulator_equals_direct_computation():
    rng = np.random.default_rng(2)
    accumulator = TaskRoutingAccumulator(keep_samples=True)
    loads = {"layers.0.q": [], "layers.0.q[other]": [], "layers.1.q": []}
    labels, counts = [], []
    for batch_labels in (["piqa", "boolq", "piqa"], ["boolq", "arc"], ["arc", "arc", "piqa", "boolq"]):  # "arc" late
        batch_counts = rng.integers(0, 9, size=len(batch_labels))  # a sample may be all padding
        batch = {name: rng.dirichlet(np.ones(4 if "1" in name else 3), size=len(batch_labels)) for name in loads}
        stats = {
            "layers.0.q": {"default": _stats(batch["layers.0.q"]), "other": _stats(batch["layers.0.q[other]"], 2)},
            "layers.1.q": {"default": _stats(batch["layers.1.q"])},
        }
        accumulator.add(stats, batch_labels, torch.tensor(batch_counts))
        for name in loads:
            loads[name].append(batch[name])
        labels += batch_labels
        counts.append(batch_counts)
    results = accumulator.results()
    assert list(results) == list(loads) and accumulator.tasks == ["piqa", "boolq", "arc"]
    assert accumulator.num_samples == 9
    for name, result in results.items():
        direct = task_routing(
            np.concatenate(loads[name]), labels, np.concatenate(counts), experts_per_token=2 if "other" in name else 1
        )
        assert result.tasks == direct.tasks == ["arc", "boolq", "piqa"]
        np.testing.assert_allclose(result.load, direct.load, atol=1e-6)
        np.testing.assert_array_equal(result.num_samples, [3, 3, 3])
        assert result.specialisation == pytest.approx(direct.specialisation, abs=1e-6)
        assert result.experts_per_token == direct.experts_per_token
    chance = accumulator.chance_specialisation(num_permutations=5)
    assert set(chance) == set(loads) and all(0 <= value <= 1 for value in chance.values())
    # One adapter only, fixed task order, errors.
    only = TaskRoutingAccumulator(tasks=["piqa", "boolq"], adapter_name="other")
    only.add(stats, ["piqa", "boolq", "piqa", "boolq"], [1, 2, 3, 4])
    assert list(only.results()) == ["layers.0.q[other]"]
    assert only.results()["layers.0.q[other]"].tasks == ["piqa", "boolq"]
    with pytest.raises(ValueError, match="not among `tasks`"):
        only.add(stats, ["piqa", "boolq", "piqa", "arc"], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="routed 4 samples but 3"):
        accumulator.add(stats, ["piqa", "boolq", "piqa"], [1, 2, 3])
    without = {"layers.0.q": {"default": RoutingStats(**{**vars(_stats(batch["layers.0.q"])), "sample_load": None})}}
    with pytest.raises(ValueError, match="record_sample_routing"):
        accumulator.add({**stats, **without}, ["new"] * 4, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="no MOELORA layer of the adapter 'nope'"):
        TaskRoutingAccumulator(adapter_name="nope").add(stats, ["piqa"] * 4, [1, 2, 3, 4])
    # A failed `add` changed nothing.
    assert accumulator.num_samples == 9 and accumulator.tasks == ["piqa", "boolq", "arc"]
    np.testing.assert_allclose(accumulator.results()["layers.1.q"].load, results["layers.1.q"].load)
    with pytest.raises(ValueError, match="keep_samples"):
        only.chance_specialisation()
    only.reset()
    assert only.num_samples == 0 and only.results() == {} and only.tasks == ["piqa", "boolq"]


def test_tiny_model_end_to_end():
    base, tokenizer = build_tiny_llama(seed=0)
    torch.manual_seed(0)
    config = MoeLoraConfig(r=4, num_experts=4, top_k=2, target_modules="all-linear", init_weights=False)
    model = get_peft_model(base, config).eval()
    model.base_model.record_sample_routing(True)
    # Two "tasks" with different texts, mixed in padded batches of different lengths.
    texts = {
        "animals": [
            "the cat sat on the mat",
            "the quick brown fox jumps over the lazy dog",
            "the dog looked at the cat",
        ],
        "experts": ["a mixture of experts routes every token", "experts learn distinct features", "low rank adapters"],
    }
    batches = [
        [("animals", 0), ("experts", 0), ("experts", 1)],
        [("experts", 2), ("animals", 1)],
        [("animals", 2), ("experts", 0), ("animals", 0), ("animals", 1)],
    ]
    accumulator = TaskRoutingAccumulator()
    per_layer: dict[str, list[RoutingStats]] = {}
    labels, counts = [], []
    with torch.no_grad():
        for batch in batches:
            enc = tokenizer([texts[task][i] for task, i in batch], return_tensors="pt", padding=True)
            model(**enc)
            stats = model.base_model.get_routing_stats()
            accumulator.add(stats, [task for task, _ in batch], enc["attention_mask"])
            for name, by_adapter in stats.items():
                per_layer.setdefault(name, []).append(by_adapter["default"])
            labels += [task for task, _ in batch]
            counts.append(enc["attention_mask"].sum(-1))
    results = accumulator.results()
    assert len(results) == 4 * 7 and list(results) == list(per_layer)  # 4 decoder layers x 7 linear layers
    for name, result in results.items():
        combined = RoutingStats.combine(per_layer[name])
        direct = task_routing(combined.sample_load, labels, torch.cat(counts), experts_per_token=2)
        assert result.tasks == ["animals", "experts"] and result.load.shape == (2, 4)
        np.testing.assert_allclose(result.load, direct.load, atol=1e-6)
        np.testing.assert_allclose(result.load.sum(1), 1.0, atol=1e-6)
        assert result.mutual_information == pytest.approx(direct.mutual_information, abs=1e-7)
        assert 0 <= result.specialisation <= 1 + 1e-9
        # The token-weighted mean over the tasks is the layer's own expert load (padding excluded).
        np.testing.assert_allclose(result.expert_load, combined.expert_load.numpy(), atol=1e-6)
        np.testing.assert_array_equal(result.num_samples, [5, 4])


def test_collect_task_routing_routes_each_task_without_router_losses_and_restores_the_model():
    from moe_peft_plugin import MoeLoraLayer
    from moe_peft_plugin.evaluation import collect_task_routing

    model, tokenizer = build_tiny_llama()
    config = MoeLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "down_proj"], init_weights=False,
                           contrastive_loss_coef=0.05)  # fmt: skip
    model = get_peft_model(model, config)
    model.train()
    texts = {"cats": ["the cat sat on the mat", "a cat"], "dogs": ["the dog ran", "dogs bark", "a dog and a cat"]}
    layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)]
    before = [dict(layer.routing_options) for layer in layers]
    seen = []
    original = layers[0].forward
    layers[0].forward = lambda *a, **k: (seen.append(layers[0].routing_options["default"].contrastive_loss_coef),
                                         original(*a, **k))[1]  # fmt: skip
    accumulator = collect_task_routing(model, tokenizer, texts, batch_size=2)
    assert seen and set(seen) == {0.0}  # no router loss while routing
    assert [dict(layer.routing_options) for layer in layers] == before and model.training
    assert not model.base_model._routing_state.record_sample_routing
    assert accumulator.tasks == ["cats", "dogs"] and accumulator.num_samples == 5
    # The same loads as routing each text by hand (routing does not depend on the losses).
    del layers[0].forward
    model.eval()
    model.base_model.record_sample_routing(True)
    by_hand = TaskRoutingAccumulator(tasks=["cats", "dogs"])
    for task, task_texts in texts.items():
        for text in task_texts:
            batch = tokenizer([text], return_tensors="pt")
            with torch.no_grad():
                model(**batch)
            by_hand.add(model.base_model.get_routing_stats(), [task], batch["attention_mask"])
    expected, got = by_hand.results(), accumulator.results()
    assert expected.keys() == got.keys() and len(got) == 2 * 4
    for name in got:
        np.testing.assert_allclose(got[name].load, expected[name].load, rtol=1e-6, atol=1e-9)
    with pytest.raises(TypeError, match="MOELORA adapter"):
        collect_task_routing(model.get_base_model(), tokenizer, texts)
