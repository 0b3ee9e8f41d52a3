"""Two-process DeepSpeed runs of examples/sft_moelora.py on CPU (gloo): ZeRO-2, ZeRO-3, QLoRA + ZeRO-3.

Each run goes through the example script's own `parse_args` and `main` under a real launcher (torchrun, the
`deepspeed` launcher, `accelerate launch` with configs/accelerate/zero3.yaml). A callback added by the driver below
gathers the adapter at the start and the end of training and computes logits with the trained model in the training
processes; a fresh process then reloads the saved adapter and must reproduce them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
INPUT_IDS = [[2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 3]]

DRIVER = """
import os, sys
import torch
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

sys.path.insert(0, os.path.join(os.environ["REPO_ROOT"], "examples"))
import sft_moelora


def adapter_state(model):
    params = [(name.replace(".default", ""), p) for name, p in model.named_parameters() if "moelora_" in name]
    if is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {name: p.detach().cpu().clone() for name, p in params}
    return {name: p.detach().cpu().clone() for name, p in params}


class Snapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = adapter_state(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        final = adapter_state(model)
        layer = model.get_base_model().model.layers[0]
        checkpointing = getattr(layer, "_gradient_checkpointing_func", None) if layer.gradient_checkpointing else None
        model.eval()
        ids = torch.tensor(INPUT_IDS)
        with torch.no_grad():  # every rank takes part: under ZeRO-3 the forward gathers the shards
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
            with model.disable_adapter():
                base_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        model.train()
        if state.is_world_process_zero:
            torch.save(
                {
                    "initial": self.initial,
                    "final": final,
                    "logits": logits,
                    "base_logits": base_logits,
                    "num_4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
                    "use_reentrant": None if checkpointing is None else checkpointing.keywords["use_reentrant"],
                },
                os.environ["SNAPSHOT"],
            )


sft_moelora.main(*sft_moelora.parse_args(sys.argv[1:]), callbacks=[Snapshot()])
""".replace("INPUT_IDS", repr(INPUT_IDS))

RELOAD = """
import json, sys
import torch
import moe_peft_plugin  # registers MOELORA
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

base_dir, adapter_dir, qlora = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
kwargs = {}
if qlora:  # the quantization the script applied (TRL's arguments: nf4, compute and storage dtype float32)
    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kwargs)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
if qlora:
    # TRL trains the adapter of a quantized model in bfloat16 (and saves it so); peft loads it as float32. Compute in
    # bfloat16 again to reproduce the trained model exactly (float32 differs by bf16 rounding, ~5% of the update).
    for name, param in model.named_parameters():
        if "moelora_" in name:
            param.data = param.data.to(torch.bfloat16)
ids = torch.tensor(INPUT_IDS)
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    with model.disable_adapter():
        base_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
torch.save({"logits": logits, "base_logits": base_logits}, adapter_dir + "/reloaded_logits.pt")
print(json.dumps({"type": type(model.base_model).__name__}))
""".replace("INPUT_IDS", repr(INPUT_IDS))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    return {**env, "REPO_ROOT": str(ROOT), **extra}


def _launcher(kind: str, port: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if kind == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port)]
    if kind == "deepspeed":
        return [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)]
    if kind == "accelerate":
        return [
            str(bin_dir / "accelerate"), "launch", "--config_file", "configs/accelerate/zero3.yaml",
            "--num_processes", "2", "--main_process_port", str(port),
        ]  # fmt: skip
    raise ValueError(kind)


RUNS = {
    # name: (launcher, extra script arguments, ZeRO stage)
    "zero2-torchrun": (
        "torchrun",
        ["--deepspeed", "configs/deepspeed/zero2.json", "--gradient_accumulation_steps", "2"],
        2,
    ),
    # Reentrant checkpointing, the mode TRL means to force for PEFT + ZeRO-3 (with transformers 5.23 its forcing does
    # not take effect: it writes the deprecated `gradient_checkpointing_kwargs` after they were resolved). With
    # `router_sharing`: k/v and up reuse the routing of q and gate, whose routers ZeRO-3 gathers only around them.
    "zero3-deepspeed-router-sharing": (
        "deepspeed",
        ["--deepspeed", "configs/deepspeed/zero3.json", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}']
        + ["--router_sharing", "true"],
        3,
    ),
    "qlora-zero3-accelerate": ("accelerate", ["--load_in_4bit", "true"], 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_process_deepspeed_run(name, tiny_model_dir, jsonl_dataset, tmp_path):
    launcher, extra, stage = RUNS[name]
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    snapshot = tmp_path / "snapshot.pt"
    argv = [
        *_launcher(launcher, _free_port()), str(driver),
        "--model_name_or_path", tiny_model_dir, "--dataset_name", jsonl_dataset, "--output_dir", str(out),
        "--num_experts", "4", "--top_k", "2", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
        "--lora_target_modules", "all-linear", "--contrastive_loss_coef", "0.01", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "3",
        "--bf16", "false", "--report_to", "none", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    result = subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, env=_env(SNAPSHOT=str(snapshot)), timeout=420
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    assert f"engine DeepSpeedEngine (ZeRO-{stage}), 2 process(es), 3 steps" in result.stdout

    state = torch.load(snapshot)
    qlora = "--load_in_4bit" in extra
    assert (state["num_4bit_layers"] == 28) if qlora else (state["num_4bit_layers"] == 0)
    # Gradient checkpointing is on (SFTConfig's default), reentrant where asked for.
    assert state["use_reentrant"] == ("use_reentrant" in " ".join(extra))
    # Every adapter tensor trained: the experts (A, B) and the routers.
    initial, final = state["initial"], state["final"]
    assert {key.rsplit(".", 1)[-1] for key in final} == {"moelora_A", "moelora_B", "moelora_router"}
    # 7 adapted projections in each of 4 layers; with `router_sharing` 4 routers per layer (q/k/v, o, gate/up, down).
    assert sum("moelora_router" in key for key in final) == (16 if "--router_sharing" in extra else 28)
    unchanged = [key for key in final if torch.equal(initial[key], final[key])]
    assert not unchanged, unchanged
    # The saved adapter holds the full (gathered) tensors, equal to the trained model's.
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == final.keys()
    for key, tensor in final.items():
        assert saved[key].shape == tensor.shape and tensor.numel() > 0, key
        torch.testing.assert_close(saved[key], tensor.to(saved[key].dtype), rtol=0, atol=0, msg=key)
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert all(log["router/aux_loss"] > 0 and log["router/contrastive"] > 0 for log in history if "loss" in log)

    # A fresh process reloads the adapter and reproduces the outputs of the trained model.
    reload = subprocess.run(
        [sys.executable, "-c", RELOAD, tiny_model_dir, str(out), "1" if qlora else "0"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert reload.returncode == 0, reload.stderr[-4000:]
    assert json.loads(reload.stdout.strip().splitlines()[-1]) == {"type": "MoeLoraModel"}
    reloaded = torch.load(out / "reloaded_logits.pt")
    assert (state["logits"] - state["base_logits"]).abs().max() > 1e-2  # the adapter changes the outputs
    torch.testing.assert_close(reloaded["base_logits"], state["base_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reloaded["logits"], state["logits"], rtol=1e-5, atol=1e-5)
