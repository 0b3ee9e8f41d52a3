"""DDP and FSDP on CPU (2 processes, gloo), the accelerate FSDP configs, and saving an adapter from a wrapped model.

The 2-process runs start tests/distributed_worker.py under torchrun; rank 0 saves what it measured and the tests below
check it. Each run is shared by the tests that read it (module-scoped fixtures).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from moe_peft_plugin import MoeLoraConfig

from .helpers import CORPUS, build_tiny_llama


ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
FSDP_CONFIGS = {"fsdp1": 1, "fsdp2": 2}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    return {**env, "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    argv = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(WORKER), *args]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)
    if result.returncode != 0:
        errors = sorted({line for line in result.stderr.splitlines() if line.startswith("[rank") and "Error" in line})
        pytest.fail(
            f"torchrun exited with {result.returncode}:\n" + "\n".join(errors) + "\n--- stdout ---\n"
            f"{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}",
            pytrace=False,
        )
    return result


def _router_keys(tensors: dict) -> list[str]:
    return [key for key in tensors if "moelora_router" in key]


# --------------------------------------------------------------------------------------------------------------------
# DDP: the plain transformers Trainer and MoeLoraSFTTrainer (torchrun, `use_cpu=True`, gloo)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    _torchrun("ddp", str(out))
    return torch.load(out / "result.pt")


@pytest.mark.slow
def test_ddp_plain_trainer_trains_the_routers_and_the_adapter_reloads(ddp_run):
    plain = ddp_run["plain"]
    assert plain["wrapper"] == "DistributedDataParallel" and plain["num_processes"] == 2
    # Every adapter tensor got a gradient and changed: experts and routers.
    initial, final, grads = plain["initial"], plain["final"], plain["grads"]
    assert len(_router_keys(final)) == 28 and grads.keys() == final.keys()
    assert all(grads[key].abs().sum() > 0 for key in _router_keys(grads))
    unchanged = [key for key in final if torch.equal(initial[key], final[key])]
    assert not unchanged, unchanged
    assert len([log for log in plain["log_history"] if "loss" in log]) == 3
    # Trainer.save_model wrote the adapter; a fresh base model with it reproduces the trained model.
    assert (plain["logits"] - ddp_run["reloaded_logits"]).abs().max() == 0


@pytest.mark.slow
def test_ddp_router_losses_count_once_per_process_with_the_plain_trainer(ddp_run):
    """The relation README.md documents ("Distributed training"): with the plain `Trainer` under DDP the router losses
    count N times (N processes, `average_tokens_across_devices`, on by default); `MoeLoraSFTTrainer` counts them once.

    Both ranks train on identical rows, so a correct DDP gradient is the one-process gradient of one rank's batch.
    """
    plain, sft, single = ddp_run["plain"], ddp_run["sft"], ddp_run["single"]
    assert plain["average_tokens_across_devices"] and sft["wrapper"] == "DistributedDataParallel"
    n = plain["num_processes"]
    routers = _router_keys(single["plain_batch"])
    # The router losses are a real part of the router gradient here (experts are not zero-initialised).
    assert max(single["plain_batch_aux"][key].abs().max() for key in routers) > 1e-3
    for key, expected in single["plain_batch"].items():
        # plain Trainer: LM loss right, router losses x N
        wrong = expected + (n - 1) * single["plain_batch_aux"][key]
        torch.testing.assert_close(plain["grads"][key], wrong, rtol=1e-4, atol=1e-6, msg=key)
    for key, expected in single["plain_batch"].items():
        # plain Trainer with `average_tokens_across_devices=False`: router losses once
        torch.testing.assert_close(plain["grads_without_token_averaging"][key], expected, rtol=1e-4, atol=1e-6)
    for key, expected in single["sft_batch"].items():
        torch.testing.assert_close(sft["grads"][key], expected, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("accumulation", [2, 3])
def test_plain_trainer_gradient_accumulation_counts_router_losses_per_micro_batch(accumulation, tmp_path):
    """The other half of the documented relation, in one process: with the plain `Trainer` and gradient accumulation
    over k micro-batches the router losses count k times (the Trainer leaves a loss normalised by the step's token
    count undivided, and `outputs.aux_loss` is a per-micro-batch mean). `MoeLoraSFTTrainer` divides them by k, and
    `MoeLoraTrainerMixin` on this `Trainer` removes the extra copies (tests/test_trainer.py)."""
    import copy

    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    model = _model(aux_loss_coef=0.05, router_z_loss_coef=0.01, contrastive_loss_coef=0.05)
    pristine = copy.deepcopy(model)
    _, tokenizer = build_tiny_llama(seed=0)
    ids = tokenizer(CORPUS[1])["input_ids"]
    rows = {"input_ids": [ids] * 4, "attention_mask": [[1] * len(ids)] * 4, "labels": [ids] * 4}

    class Capture(TrainerCallback):
        grads = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    capture = Capture()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=1, max_steps=1, max_grad_norm=0.0,
        gradient_accumulation_steps=accumulation, report_to=[], disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    Trainer(
        model=model, args=args, train_dataset=Dataset.from_dict(rows), data_collator=default_data_collator,
        callbacks=[capture],
    ).train()  # fmt: skip

    batch = {key: torch.tensor(value[:1]) for key, value in rows.items()}
    reference = pristine.train()
    expected, aux = {}, {}
    for grads, attr in ((expected, "loss"), (aux, "aux_loss")):
        reference.zero_grad(set_to_none=True)
        getattr(reference(**batch), attr).backward()
        grads.update({n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None})
    assert max(aux[key].abs().max() for key in _router_keys(aux)) > 1e-3
    for key in expected:
        wrong = expected[key] + (accumulation - 1) * aux[key]
        torch.testing.assert_close(capture.grads[key], wrong, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
def test_ddp_sft_script(tiny_model_dir, jsonl_dataset, tmp_path):
    """examples/sft_moelora.py under torchrun with `--use_cpu true`: DDP over gloo, SFTConfig's defaults otherwise
    (gradient checkpointing on)."""
    snapshot = tmp_path / "snapshot.pt"
    result = _torchrun(
        "sft", str(snapshot),
        "--model_name_or_path", tiny_model_dir, "--dataset_name", jsonl_dataset, "--output_dir", str(tmp_path / "out"),
        "--use_cpu", "true", "--num_experts", "4", "--top_k", "2", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_dropout", "0.0", "--lora_target_modules", "all-linear", "--contrastive_loss_coef", "0.01",
        "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--bf16", "false", "--report_to", "none", "--disable_tqdm", "true",
        "--router_load_heatmap", "false",
    )  # fmt: skip
    assert "engine DistributedDataParallel, 2 process(es), 3 steps" in result.stdout
    state = torch.load(snapshot)
    assert state["process_group_destroyed"]  # the script ends the process group itself
    initial, final, grads = state["initial"], state["final"], state["grads"]
    assert len(_router_keys(final)) == 28
    assert all(grads[key].abs().sum() > 0 for key in _router_keys(grads))
    unchanged = [key for key in final if torch.equal(initial[key], final[key])]
    assert not unchanged, unchanged
    assert (state["logits"] - state["reloaded_logits"]).abs().max() == 0


# --------------------------------------------------------------------------------------------------------------------
# FSDP2 (`fully_shard`) and nested FSDP1 on CPU
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp2_trains_the_routers_and_saves_a_full_adapter(tmp_path):
    _torchrun("fsdp", str(tmp_path))
    result = torch.load(tmp_path / "result.pt")
    # Every adapter tensor is a DTensor sharded over the 2 ranks.
    assert result["num_adapter_params"] == 84 and result["all_dtensor"]
    assert result["local_numel"] * 2 == result["full_numel"]
    # The router losses reach the routers; the gradients are those of data parallelism over the two ranks' rows.
    grads, reference = result["grads"], result["reference_grads"]
    assert result["aux_loss"] > 0 and all(grads[key].abs().sum() > 0 for key in _router_keys(grads))
    assert grads.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(grads[key], reference[key], rtol=1e-5, atol=1e-7, msg=key)
    # The full state dict saved on rank 0 holds the unsharded trained tensors, and reloads to the same model.
    saved, gathered = result["saved"], result["gathered"]
    assert len(saved) == len(gathered) == 84
    for key, tensor in gathered.items():
        assert not torch.equal(tensor, result["initial"][key]), key  # trained
        torch.testing.assert_close(saved[key.replace(".default", "")], tensor, rtol=0, atol=0, msg=key)
    assert (result["logits"] - result["reloaded_logits"]).abs().max() == 0
    # Nested FSDP1 (each decoder layer its own unit): `save_pretrained` saves every adapter tensor (peft alone saves
    # none there: its module names carry `_fsdp_wrapped_module.`).
    fsdp1 = result["fsdp1"]
    assert fsdp1["wrapper"] == "FullyShardedDataParallel" and fsdp1["error"] is None
    assert fsdp1["saved"].keys() == fsdp1["expected"].keys()
    for key, tensor in fsdp1["expected"].items():
        torch.testing.assert_close(fsdp1["saved"][key], tensor, rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------------------------------------------------
# Saving from a model whose module names carry wrapper segments (FSDP1, activation checkpointing): one process
# --------------------------------------------------------------------------------------------------------------------


class _FSDP1Names(nn.Module):
    """Named like a nested FSDP1 unit: the wrapped module is the child `_fsdp_wrapped_module`. (Its state dict keys
    keep the segment; the tests pass the state dict taken before wrapping, as FSDP1's state dict hooks produce it.)"""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._fsdp_wrapped_module = module

    def forward(self, *args, **kwargs):
        return self._fsdp_wrapped_module(*args, **kwargs)


def _model(**kwargs):
    base, _ = build_tiny_llama(seed=0)
    torch.manual_seed(0)
    config = MoeLoraConfig(r=4, num_experts=4, top_k=2, target_modules="all-linear", init_weights=False, **kwargs)
    return get_peft_model(base, config)


def _wrap_layers(model, wrapper, layers=None) -> None:
    decoder_layers = model.base_model.model.model.layers
    for index in range(len(decoder_layers)) if layers is None else layers:
        decoder_layers[index] = wrapper(decoder_layers[index])


def _checkpoint_wrapper(module):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return checkpoint_wrapper(module, preserve_rng_state=False)  # what accelerate's FSDP activation checkpointing does


@pytest.mark.parametrize("wrapper", [_FSDP1Names, _checkpoint_wrapper], ids=["fsdp1-names", "checkpoint-wrapper"])
def test_adapter_is_saved_from_a_model_with_wrapped_layers(wrapper, tmp_path):
    model = _model()
    expected = get_peft_model_state_dict(model)
    state_dict = model.state_dict()
    _wrap_layers(model, wrapper)
    assert any("_wrapped_module." in name for name, _ in model.named_modules())
    if wrapper is _checkpoint_wrapper:  # its state dict hook removes the segment from the keys itself
        assert model.state_dict().keys() == state_dict.keys()
        state_dict = None
    saved = get_peft_model_state_dict(model, state_dict=state_dict)
    assert saved.keys() == expected.keys() and len(saved) == 84
    model.save_pretrained(tmp_path, state_dict=state_dict)
    reloaded = load_file(tmp_path / "adapter_model.safetensors")
    for key, tensor in expected.items():
        torch.testing.assert_close(reloaded[key], tensor, rtol=0, atol=0, msg=key)


def test_saving_refuses_a_state_dict_without_the_adapter(tmp_path):
    model = _model()
    state_dict = model.state_dict()
    # Keys that are not the model's parameter names (here: an extra prefix): nothing would be selected.
    renamed = {f"module.{key}": value for key, value in state_dict.items()}
    with pytest.raises(ValueError, match=r"28 MOELORA layer\(s\).*no tensor at all.*full_state_dict=True"):
        get_peft_model_state_dict(model, state_dict=renamed)
    with pytest.raises(ValueError, match="no tensor at all"):
        model.save_pretrained(tmp_path / "renamed", state_dict=renamed)
    assert not (tmp_path / "renamed" / "adapter_model.safetensors").exists()
    # Some layers missing: the adapter would load with those experts and routers at their initial values.
    partial = {key: value for key, value in state_dict.items() if ".layers.0." not in key}
    with pytest.raises(ValueError, match="no tensors for 7 of them"):
        get_peft_model_state_dict(model, state_dict=partial)
    # An empty state dict is what the non-main ranks get from a rank-0-only full state dict: nothing to refuse.
    assert get_peft_model_state_dict(model, state_dict={}) == {}


# --------------------------------------------------------------------------------------------------------------------
# The accelerate FSDP configs (GPU only: parsed and validated here as `accelerate launch` would)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FSDP_CONFIGS))
def test_accelerate_fsdp_config_is_valid(name, monkeypatch):
    import accelerate.utils.dataclasses as accelerate_dataclasses
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == DistributedType.FSDP and not config.use_cpu
    # The comment on top is the launch command, from the repository root.
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml examples/sft_moelora.py" in (
        path.read_text()
    )
    assert "--gradient_checkpointing false" in path.read_text()  # FSDP's activation checkpointing replaces it

    # The environment `accelerate launch` gives the processes, and the plugin the Trainer builds from it.
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "train.py"])
    _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == str(FSDP_CONFIGS[name])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # FSDP1's `sync_module_states` looks up the current GPU when the plugin is built (accelerate <= 1.15 through this
    # name, which 1.16 no longer has).
    monkeypatch.setattr(accelerate_dataclasses, "is_cuda_available", lambda: True, raising=False)
    # accelerate >= 1.16 asks for the accelerator backend instead.
    monkeypatch.setattr(
        accelerate_dataclasses, "get_torch_accelerator_backend", lambda: ("cuda", torch.cuda), raising=False
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == FSDP_CONFIGS[name]
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.activation_checkpointing and plugin.cpu_ram_efficient_loading
    if plugin.fsdp_version == 1:
        assert plugin.use_orig_params and plugin.sync_module_states

    # The wrap policy makes each decoder layer of a MOELORA model a unit, and nothing inside it.
    model = _model()
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [name for name, module in model.named_modules() if policy(module)]
    assert units == [f"base_model.model.model.layers.{i}" for i in range(4)], units
    assert all(isinstance(model.get_submodule(unit), LlamaDecoderLayer) for unit in units)


def test_distributed_launch_is_documented():
    readme = (ROOT / "README.md").read_text()
    guide = (ROOT / "docs" / "distributed.md").read_text()
    assert "configs/accelerate/fsdp2.yaml" in readme and "docs/distributed.md" in readme
    assert "GPU" in readme and "average_tokens_across_devices" in readme and "MoeLoraSFTTrainer" in readme
    for name in FSDP_CONFIGS:
        assert f"accelerate launch --config_file configs/accelerate/{name}.yaml examples/sft_moelora.py" in guide
    assert "GPU only" in guide and "--use_cpu true" in guide
