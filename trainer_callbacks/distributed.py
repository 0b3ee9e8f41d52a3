"""DeepSpeed without CUDA (the setup that makes `--deepspeed` work on CPU machines, over gloo), and a clean exit."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Union

import torch


def deepspeed_requested(arguments: Mapping[str, Any]) -> bool:
    """Whether the parsed arguments (e.g. `sft_script.explicit_arguments`: the command line and the YAML file of its
    `--config`) or `accelerate launch` ask for DeepSpeed.

    This must be known before the training arguments are built: building them sets up the distributed state.
    """
    if not isinstance(arguments, Mapping):
        raise TypeError(
            "deepspeed_requested takes the parsed arguments (`sft_script.explicit_arguments(parser, argv)`), not argv."
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return True
    return bool(arguments.get("deepspeed"))


def setup_deepspeed_without_cuda() -> bool:
    """Make DeepSpeed run on a machine without CUDA; a no-op (returns False) where CUDA is available.

    DeepSpeed picks its CPU accelerator by itself, but the Trainer's distributed state would not use gloo. Call this
    before the `TrainingArguments` are built, and build them with `accelerator_config={"use_configured_state": True}`
    (for a command line: [`configured_state`]). Without it DeepSpeed fails with "train_batch_size is not equal
    to micro_batch_per_gpu * gradient_acc_step * world_size". Do not set `use_cpu=True`: it turns DeepSpeed off.
    """
    if torch.cuda.is_available():
        return False
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    # A single process started without a launcher still needs the rendezvous variables of a 1-process group.
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    PartialState(backend="gloo")
    return True


def configured_state(accelerator_config: Union[dict, str, None] = None) -> dict:
    """`accelerator_config` (a dict, a JSON string or a JSON file, as `--accelerator_config` takes it) with
    `use_configured_state=True`: the Trainer then keeps the distributed state set up beforehand.

    It must be in the arguments when they are built (`TrainingArguments` sets up the distributed state in
    `__post_init__`, and resets an existing one without it).
    """
    config = _as_dict(accelerator_config)
    config["use_configured_state"] = True
    return config


def _as_dict(value) -> dict:
    """An `accelerator_config` value (a dict, a JSON string or a JSON file) as a dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        with open(value, encoding="utf-8") as handle:
            return json.load(handle)
    return json.loads(value)


def finish_distributed(trainer=None) -> None:
    """End a distributed run cleanly: wait for every process, then destroy the process group (a no-op without one).

    Call it once, at the very end, after everything that communicates between processes (training, evaluation,
    `save_model`, `push_to_hub`). With a `trainer` (transformers >= 5.18), `trainer.end()` also finishes the
    experiment trackers. Without the barrier and the destruction, gloo processes sometimes abort at exit with
    "terminate called without an active exception" (SIGABRT) after a successful run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if trainer is not None and hasattr(trainer, "end"):
        trainer.end()  # finishes the trackers and destroys the process group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
