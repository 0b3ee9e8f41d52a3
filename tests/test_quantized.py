"""MOELORA on bitsandbytes 4-bit (NF4) and 8-bit bases on CPU (bnb's CPU kernels need dims that are multiples of 64)."""

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from moe_peft_plugin import MoeLoraConfig

from .helpers import batch, build_tiny_llama


pytest.importorskip("bitsandbytes")

QUANT = {
    "nf4": lambda: BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    ),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}
CONFIG = {
    "num_experts": 4,
    "top_k": 2,
    "target_modules": "all-linear",
    "contrastive_loss_coef": 0.1,
    "init_weights": False,
}


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide-llama")
    model, tokenizer = build_tiny_llama(hidden_size=128, num_layers=2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("quant", sorted(QUANT))
def test_quantized_base(quant, wide_model_dir, tmp_path):
    _, tokenizer = build_tiny_llama()
    inputs = batch(tokenizer)
    qmodel = AutoModelForCausalLM.from_pretrained(wide_model_dir, quantization_config=QUANT[quant]())
    qmodel = prepare_model_for_kbit_training(qmodel, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_peft_model(qmodel, MoeLoraConfig(task_type="CAUSAL_LM", **CONFIG))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected_backend = {"nf4": "bnb 4bit", "int8": "bnb 8bit"}[quant]
    assert expected_backend in repr(layer) and repr(layer).startswith("moelora.")

    model.eval()
    # Save and reload reproduces the outputs. On bitsandbytes' CPU backend `load_adapter` itself shifts the base
    # model's outputs slightly, and a second load of the checkpoint is not bit-identical (both seen with plain peft
    # LoRA too), so the reloaded adapter is compared with the original one on the same base after the load.
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="reloaded")
    expected = model(**inputs).logits
    model.set_adapter("reloaded")
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    model.set_adapter("default")
    model.delete_adapter("reloaded")
    fresh = AutoModelForCausalLM.from_pretrained(wide_model_dir, quantization_config=QUANT[quant]())
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    saved = {k: v for k, v in model.state_dict().items() if ".moelora_" in k and k.endswith(".default")}
    assert saved and all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.items())

    # The adapter adds exactly what it adds on a float base with the same (dequantized) weights.
    model.eval()
    x = torch.randn(3, 128)
    with model.disable_adapter():
        base_out = layer(x)
    delta = layer(x) - base_out
    float_layer = torch.nn.Linear(128, 128, bias=False)
    torch.manual_seed(0)
    float_model = get_peft_model(
        torch.nn.Sequential(float_layer), MoeLoraConfig(**{**CONFIG, "target_modules": ["0"]})
    )
    float_lin = float_model.base_model.model[0]
    with torch.no_grad():
        for name in ("moelora_A", "moelora_B", "moelora_router"):
            getattr(float_lin, name)["default"].copy_(getattr(layer, name)["default"])
    float_delta = float_model(x) - float_layer(x)
    torch.testing.assert_close(delta, float_delta, rtol=1e-4, atol=1e-5)

    # Training changes the adapter, the quantized weights stay frozen.
    model.train()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("moelora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


def test_bf16_adapter_on_nf4_routes_in_fp32(wide_model_dir):
    """TRL casts trainable parameters to bf16 under QLoRA: router logits and losses must still be float32."""
    _, tokenizer = build_tiny_llama()
    inputs = batch(tokenizer)
    qmodel = AutoModelForCausalLM.from_pretrained(
        wide_model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        dtype=torch.bfloat16,
    )
    model = get_peft_model(qmodel, MoeLoraConfig(task_type="CAUSAL_LM", **CONFIG), autocast_adapter_dtype=False)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.aux_loss.dtype == torch.float32
    stats = next(iter(model.get_routing_stats().values()))["default"]
    assert stats.expert_load.dtype == torch.float32 and stats.entropy.dtype == torch.float32
    out.loss.backward()
    router = model.base_model.model.model.layers[0].self_attn.q_proj.moelora_router["default"]
    assert router.grad.dtype == torch.bfloat16 and router.grad.abs().sum() > 0
