# Copyright 2026 The moe-peft-plugin authors. Licensed under the Apache License, Version 2.0.
"""
The training script behind `examples/sft_moelora.py` and `moe-peft train` (importable from an installed package).

Supervised fine-tuning with a MOELORA adapter (MoELoRA, MoLA, MoLE): the `trl sft` command line, for mixtures of LoRA
experts. `trl sft` cannot load a peft plugin and builds only a `LoraConfig`, so this script is its counterpart: TRL's
`ScriptArguments`, `ModelConfig` and dataset mixtures, [`MoeLoraSFTConfig`] (every `SFTConfig` argument plus the router
options) and the MOELORA arguments below. TRL's `--lora_r`, `--lora_alpha`, `--lora_dropout`,
`--lora_target_modules`, `--lora_modules_to_save`, `--use_rslora` and `--lora_task_type` map onto the MOELORA config;
a MOELORA adapter is always trained (`--use_peft` is implied).

```bash
# One process (a YAML recipe; command-line arguments override it)
python examples/sft_moelora.py --config configs/recipes/moelora.yaml \
    --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara --output_dir Qwen2-0.5B-MoELoRA

# MoLA: 2, 4, 6 and 8 experts per group of consecutive layers
python examples/sft_moelora.py --config configs/recipes/mola.yaml --num_experts 2 4 6 8 ...

# DeepSpeed ZeRO-3, with any launcher
accelerate launch --config_file configs/accelerate/zero3.yaml examples/sft_moelora.py --config configs/recipes/moelora.yaml
torchrun --nproc_per_node 8 examples/sft_moelora.py --deepspeed configs/deepspeed/zero3.json ...
deepspeed --num_gpus 8 examples/sft_moelora.py --deepspeed configs/deepspeed/zero3.json ...

# DDP (on CPU add --use_cpu true), FSDP2 (GPUs only)
torchrun --nproc_per_node 8 examples/sft_moelora.py --config configs/recipes/moelora.yaml ...
accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/sft_moelora.py --gradient_checkpointing false ...
```

`--dataset_name` takes what TRL's script takes: a hub dataset id, or a local folder (e.g. of `train.jsonl` and
`test.jsonl`). Without CUDA, DeepSpeed runs over gloo (the script sets that up itself). See docs/distributed.md.

To load the trained adapter elsewhere, `import moe_peft_plugin` first: it registers MOELORA with peft.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from trl import TrlParser

import moe_peft_plugin  # noqa: F401  (registers MOELORA with peft; import it before loading any MOELORA adapter)
from moe_peft_plugin import MoeLoraConfig
from trainer_callbacks import (
    MoeLoraSFTConfig,
    MoeLoraSFTTrainer,
    configured_state,
    deepspeed_requested,
    setup_deepspeed_without_cuda,
)
from trainer_callbacks.config import COEFFICIENT_FIELDS
from trainer_callbacks.distributed import finish_distributed


@dataclass
class MoeLoraArguments:
    """
    The MOELORA fields of the adapter config. `None` keeps the default of [`~moe_peft_plugin.MoeLoraConfig`]. The
    router-loss coefficients here are saved with the adapter; `MoeLoraSFTConfig.moelora_*_coef` override them for
    training.
    """

    num_experts: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Experts per layer. Several values for MoLA (`--num_experts 2 4 6 8`): one per layer, or one per "
            "group of consecutive layers. Default 8 (MoLE: one per expert adapter)."
        },
    )
    top_k: Optional[list[int]] = field(
        default=None, metadata={"help": "Experts per token (top-k routing); one value, or one per layer group."}
    )
    router_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "'topk' (sparse) or 'soft' (dense). Default: 'soft' with expert_adapters, else 'topk'.",
            "choices": ["topk", "soft"],
        },
    )
    aux_loss_coef: Optional[float] = field(default=None, metadata={"help": "Load-balancing loss weight."})
    router_z_loss_coef: Optional[float] = field(default=None, metadata={"help": "Router z-loss weight."})
    contrastive_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "Expert contrastive loss weight (MoELoRA)."}
    )
    contrastive_temperature: Optional[float] = field(
        default=None, metadata={"help": "Temperature of the contrastive loss."}
    )
    gate_balance_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "Gating balance loss weight (MoLE, soft routers)."}
    )
    router_temperature: Optional[float] = field(default=None, metadata={"help": "Router softmax temperature."})
    learn_router_temperature: Optional[bool] = field(
        default=None, metadata={"help": "Learn the router temperature (default: with expert_adapters)."}
    )
    router_jitter_noise: Optional[float] = field(
        default=None, metadata={"help": "Multiplicative jitter on the router input during training."}
    )
    router_noise_std: Optional[float] = field(
        default=None, metadata={"help": "Gaussian noise on the router logits for the top-k selection in training."}
    )
    expert_adapters: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "MoLE: folders of trained LoRA adapters of the same base model; they become frozen experts."
        },
    )
    freeze_experts: Optional[bool] = field(
        default=None, metadata={"help": "Train only the routers (default: with expert_adapters)."}
    )
    router_sharing: Optional[bool] = field(
        default=None,
        metadata={
            "help": "q/k/v and gate/up share one router each (MixLoRA-style; departs from MoELoRA/MoLA). Other "
            "groups: `MoeLoraConfig(router_sharing=[[...], ...])` in Python."
        },
    )


def get_moelora_config(model_args, moe_args: MoeLoraArguments) -> MoeLoraConfig:
    """The `MoeLoraConfig` of TRL's LoRA arguments (`model_args`) and the MOELORA arguments."""
    if model_args.use_dora:
        raise ValueError("`--use_dora` has no MOELORA equivalent; remove it.")
    if model_args.lora_target_parameters:
        raise ValueError("`--lora_target_parameters` is not supported by MOELORA; use `--lora_target_modules`.")
    kwargs = {
        "task_type": model_args.lora_task_type,
        "lora_dropout": model_args.lora_dropout,
        "modules_to_save": model_args.lora_modules_to_save,
        "use_rslora": model_args.use_rslora,
    }
    if moe_args.expert_adapters and model_args.lora_target_modules:
        raise ValueError(
            "`--lora_target_modules` cannot be used with `--expert_adapters`: the LoRAs define the targets."
        )
    if not moe_args.expert_adapters:
        # MoLE takes the rank, scaling and targets from the LoRAs it fuses.
        kwargs.update(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, target_modules=model_args.lora_target_modules
        )
    for name, value in vars(moe_args).items():
        if value is None:
            continue
        if name in ("num_experts", "top_k") and isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        kwargs[name] = value
    return MoeLoraConfig(**kwargs)


def get_quantization_config(model_args, training_args):
    """TRL's bitsandbytes config; under ZeRO-3 the 4-bit storage dtype must be the model dtype (ZeRO shards it)."""
    from trl import get_quantization_config as trl_get_quantization_config

    if model_args.load_in_4bit and _zero_stage(training_args) == 3:
        dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
        if model_args.bnb_4bit_quant_storage is None:
            model_args.bnb_4bit_quant_storage = dtype
        elif model_args.bnb_4bit_quant_storage != dtype:
            raise ValueError(
                f"QLoRA with ZeRO-3 needs `--bnb_4bit_quant_storage` equal to `--dtype` ({dtype}), got "
                f"{model_args.bnb_4bit_quant_storage!r}: ZeRO-3 shards the packed 4-bit weights as that dtype."
            )
    return trl_get_quantization_config(model_args)


def _zero_stage(training_args) -> Optional[int]:
    plugin = getattr(training_args, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


def main(script_args, training_args, model_args, dataset_args, moe_args, callbacks=None) -> MoeLoraSFTTrainer:
    """Train, save the adapter to `output_dir`, and return the trainer. `callbacks` are added to the trainer."""
    from datasets import load_dataset
    from trl import get_dataset

    if training_args.use_cpu and (training_args.deepspeed or getattr(training_args, "deepspeed_plugin", None)):
        raise ValueError("`--use_cpu` turns DeepSpeed off silently; leave it out (DeepSpeed runs on CPU over gloo).")

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:
        raise ValueError("Either `--datasets` (a dataset mixture) or `--dataset_name` must be provided.")
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"The dataset has no split {script_args.dataset_train_split!r} (splits: {list(dataset)}); set "
            "`--dataset_train_split`."
        )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"Evaluation is on but the dataset has no split {script_args.dataset_test_split!r} (splits: "
                f"{list(dataset)}); set `--dataset_test_split` or `--eval_strategy no`."
            )
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = MoeLoraSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args, training_args),
        peft_config=get_moelora_config(model_args, moe_args),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    stage = _zero_stage(training_args)
    engine = type(trainer.model_wrapped).__name__ + (f" (ZeRO-{stage})" if stage is not None else "")
    trainer.accelerator.print(
        f"Training completed: engine {engine}, {trainer.accelerator.num_processes} process(es), "
        f"{trainer.state.global_step} steps."
    )
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"MOELORA adapter saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    finish_distributed(trainer)  # waits for every process, then ends the process group (gloo aborts at exit otherwise)
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# The command line: parser defaults < the YAML file of `--config` < the command line, all through TRL's parser
# ---------------------------------------------------------------------------------------------------------------------

_UNSET = object()


class MoeLoraParser(TrlParser):
    """TRL's parser (YAML `--config` + command line) with exact argument names only and one-line errors."""

    def error(self, message: str):
        # argparse prints the usage first, which lists every one of the ~300 arguments: say what is wrong instead.
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(prog: Optional[str] = None) -> MoeLoraParser:
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    parser = MoeLoraParser(
        (ScriptArguments, MoeLoraSFTConfig, ModelConfig, DatasetMixtureConfig, MoeLoraArguments),
        prog=prog,
        allow_abbrev=False,
    )
    for action in parser._actions:
        if action.dest in COEFFICIENT_FIELDS:
            action.help = argparse.SUPPRESS  # one flag per setting: `--aux_loss_coef` etc. (see `parse_args`)
    return parser


def explicit_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """
    The values that a command line and the YAML file of its `--config` set, as `parser` reads them (the command line
    over the YAML file), without any default: `{"learning_rate": 0.001, ...}`.

    Unknown and abbreviated arguments and unknown YAML keys are refused at once, with one line that names the closest
    known argument (`parser.error`).
    """
    argv = _config_as_two_arguments(argv)
    config: dict[str, Any] = {}
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 == len(argv):
            parser.error("--config needs the path of a YAML file.")
        config_path = argv[index + 1]
        argv = argv[:index] + argv[index + 2 :]
        config = _read_config(parser, config_path)
    # Every destination already exists on the namespace, so argparse sets no default: what is left was given.
    namespace = argparse.Namespace(**{action.dest: _UNSET for action in parser._actions})
    namespace, unknown = parser.parse_known_args(argv, namespace)
    if unknown:
        parser.error(_unknown_argument_message(parser, unknown[0]))
    dests = {action.dest for action in parser._actions}
    for key in config:
        if key not in dests:
            parser.error(f"--config {config_path}: unknown key {key!r}{_suggestion(parser, '--' + key, key=True)}")
    return {**config, **{name: value for name, value in vars(namespace).items() if value is not _UNSET}}


def parse_args(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None):
    """
    Parse a command line with `parser` (default: [`make_parser`]): its defaults < the YAML file of `--config` < the
    command line, as TRL's `TrlParser` does. Returns the dataclasses (`script_args, training_args, model_args,
    dataset_args, moe_args`, plus a namespace of any arguments added to `parser` beyond them).

    Mistakes in the arguments end the program with one line before anything is built: unknown or abbreviated
    arguments, and the trainer's `--moelora_*_coef` overrides (this script builds the adapter: set `--aux_loss_coef`
    etc., which are saved with it). Where DeepSpeed is requested and there is no CUDA, DeepSpeed is set up over gloo
    first: building the training arguments sets up the distributed state.
    """
    argv = _config_as_two_arguments(sys.argv[1:] if argv is None else argv)
    parser = make_parser() if parser is None else parser
    given = explicit_arguments(parser, argv)
    for name, key in COEFFICIENT_FIELDS.items():
        if name in given:
            parser.error(
                f"--{name} is MoeLoraSFTTrainer's override for an adapter that already exists; this script builds the "
                f"adapter, so set --{key} (saved with the adapter)."
            )
    if deepspeed_requested(given) and setup_deepspeed_without_cuda():
        # The last occurrence wins; it keeps the `accelerator_config` that was given (command line, else YAML).
        argv = [*argv, "--accelerator_config", json.dumps(configured_state(given.get("accelerator_config")))]
    return parser.parse_args_and_config(argv)


def _config_as_two_arguments(argv: Sequence[str]) -> list[str]:
    # TrlParser reads `--config PATH` only; `--config=PATH` would otherwise be an unknown argument.
    out: list[str] = []
    for arg in argv:
        out += ["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg]
    return out


def _read_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        parser.error(f"--config {path}: no such file.")
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        parser.error(f"--config {path} must hold a YAML mapping of argument names to values.")
    config.pop("env", None)  # environment variables, set by TrlParser when it parses
    return config


def _unknown_argument_message(parser: argparse.ArgumentParser, argument: str) -> str:
    if not argument.startswith("-"):
        return f"unrecognized argument {argument!r} (arguments are `--name value`)"
    name = argument.split("=", 1)[0]
    return f"unrecognized argument {name}{_suggestion(parser, name)}"


def _suggestion(parser: argparse.ArgumentParser, name: str, key: bool = False) -> str:
    """` (did you mean --learning_rate?)` for the closest known argument, or ''."""
    canonical = {option: action.option_strings[0] for action in parser._actions for option in action.option_strings}
    canonical = {option: first for option, first in canonical.items() if option.startswith("--")}
    prefixed = sorted({canonical[option] for option in canonical if option.startswith(name)})
    if prefixed and not key:
        names = " or ".join(prefixed[:3]) + (" or ..." if len(prefixed) > 3 else "")
        return f" (abbreviations are not accepted: did you mean {names}?)"
    close = difflib.get_close_matches(name, list(canonical), n=1)
    if not close:
        return ""
    return f" (did you mean {canonical[close[0]][2:]!r}?)" if key else f" (did you mean {canonical[close[0]]}?)"
