"""DeepSpeed without CUDA (the setup that makes `--deepspeed` work on CPU machines, over gloo), and a clean exit."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Optional

import torch


def deepspeed_requested(argv: Sequence[str]) -> bool:
    """Whether a command line (or the YAML file of its `--config`) or `accelerate launch` asks for DeepSpeed.

    This must be known before the training arguments are parsed: building them sets up the distributed state.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return True
    argv = list(argv)
    for index, arg in enumerate(argv):
        if arg.startswith("--deepspeed="):
            return bool(arg.split("=", 1)[1])
        if arg == "--deepspeed":
            return index + 1 < len(argv) and not argv[index + 1].startswith("--")
    config = _config_file(argv)
    if config is not None:
        import yaml

        with open(config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        return bool(values.get("deepspeed"))
    return False


def _config_file(argv: list[str]) -> Optional[str]:
    """The YAML file of `--config PATH` (the only form `TrlParser` reads)."""
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        return argv[argv.index("--config") + 1]
    return None


def setup_deepspeed_without_cuda() -> bool:
    """Make DeepSpeed run on a machine without CUDA; a no-op (returns False) where CUDA is available.

    DeepSpeed picks its CPU accelerator by itself, but the Trainer's distributed state would not use gloo. Call this
    before the `TrainingArguments` are built, and build them with `accelerator_config={"use_configured_state": True}`
    (for a command line: [`with_configured_state`]). Without it DeepSpeed fails with "train_batch_size is not equal
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


def with_configured_state(argv: Sequence[str]) -> list[str]:
    """`argv` with `--accelerator_config` asking the Trainer to keep the distributed state set up beforehand.

    The flag must be in the arguments when they are built (`TrainingArguments` sets up the distributed state in
    `__post_init__`, and resets an existing one without it). An `accelerator_config` given on the command line or in
    the YAML `--config` is kept and extended.
    """
    argv = list(argv)
    accelerator_config: dict = {}
    config = _config_file(argv)
    if config is not None:
        import yaml

        with open(config, encoding="utf-8") as handle:
            accelerator_config.update(_as_dict((yaml.safe_load(handle) or {}).get("accelerator_config")))
    for index, arg in enumerate(argv):
        if arg.startswith("--accelerator_config="):
            accelerator_config.update(_as_dict(arg.split("=", 1)[1]))
            del argv[index]
            break
        if arg == "--accelerator_config" and index + 1 < len(argv):
            accelerator_config.update(_as_dict(argv[index + 1]))
            del argv[index : index + 2]
            break
    accelerator_config["use_configured_state"] = True
    return argv + ["--accelerator_config", json.dumps(accelerator_config)]


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
