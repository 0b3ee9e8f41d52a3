"""Mixed-adapter batches: `adapter_names=[...]` (one per sample, "__base__" for none) in `forward` and `generate`."""

import pytest
import torch
from peft import get_peft_model

from moe_peft_plugin import MoeLoraConfig

from .helpers import build_tiny_llama


# Adapters with different expert counts, routers and targets: top-k on every linear layer, MoLA on a few, soft routing.
ADAPTERS = {
    "default": {"num_experts": 4, "top_k": 2, "target_modules": "all-linear"},
    "mola": {"num_experts": [2, 4], "top_k": [1, 2], "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "soft": {
        "num_experts": 3,
        "router_type": "soft",
        "learn_router_temperature": True,
        "target_modules": ["q_proj", "o_proj", "up_proj"],
    },
}
TEXTS = [
    "the cat sat on the mat",
    "experts learn distinct features when a loss pushes them apart",
    "question: what is the capital of france? answer:",
    "a mixture of experts routes every token",
    "the quick brown fox",
]
NAMES = ["soft", "__base__", "default", "mola", "soft"]


def _model():
    base, tokenizer = build_tiny_llama(seed=0)
    tokenizer.padding_side = "left"
    torch.manual_seed(1)
    model = None
    for name, kwargs in ADAPTERS.items():
        config = MoeLoraConfig(task_type="CAUSAL_LM", init_weights=False, **kwargs)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    # Routers of fresh adapters are near-uniform; make them decisive so that a wrong adapter shows.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "moelora_router" in param_name:
                param.normal_(std=0.5)
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return model.eval(), tokenizer, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def _alone(model, name, run):
    """`run()` with only adapter `name` active ("__base__": adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return run()
    model.set_adapter(name)
    try:
        return run()
    finally:
        model.set_adapter("default")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_each_sample_equals_running_it_alone_with_its_adapter(grad):
    model, _, inputs = _model()
    with torch.set_grad_enabled(grad):
        mixed = model(**inputs, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            expected = _alone(model, name, lambda row=row: model(**row).logits)
            torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-5, atol=1e-5, msg=f"sample {i} ({name})")
    # Each sample really depends on its adapter: the active adapter alone gives other outputs for the others.
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[0], mixed[0], atol=1e-3)


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam-search"])
def test_generate_with_mixed_adapters_equals_generating_each_sample_alone(num_beams):
    model, tokenizer, inputs = _model()
    options = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        mixed = model.generate(**inputs, adapter_names=NAMES, **options)
        for i, name in enumerate(NAMES):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            expected = _alone(model, name, lambda row=row: model.generate(**row, **options))[0].tolist()
            # In the batch, a sample that reached EOS before the others is padded up to the longest one.
            got = mixed[i].tolist()
            assert got[: len(expected)] == expected, f"sample {i} ({name})"
            assert set(got[len(expected) :]) <= {tokenizer.pad_token_id}, f"sample {i} ({name})"


def test_mixed_batches_compute_no_router_losses_or_statistics():
    model, _, inputs = _model()
    with torch.no_grad():
        model(**inputs)
        assert model.get_routing_stats()  # a normal forward reports its routing
        outputs = model(**inputs, labels=inputs["input_ids"], adapter_names=NAMES)
    assert outputs.aux_loss is None and model.get_routing_stats() == {}
    assert outputs.loss is not None and torch.isfinite(outputs.loss)


def test_bad_adapter_names_are_refused():
    model, _, inputs = _model()
    with pytest.raises(ValueError, match="unknown adapter.*'typo'"):
        model(**inputs, adapter_names=["default", "typo", "default", "default", "default"])
    with pytest.raises(ValueError, match="`adapter_names` has 2 entries.*5 samples"):
        model(**inputs, adapter_names=["default", "soft"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**inputs, adapter_names=NAMES)
