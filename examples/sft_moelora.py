# Copyright 2026 The moe-peft-plugin authors. Licensed under the Apache License, Version 2.0.
"""
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

The code lives in `trainer_callbacks.sft_script` (also used by `moe-peft train`); this file is the runnable entry.
"""

from trainer_callbacks.sft_script import (  # noqa: F401  (the script's API, for `python -c` and tests)
    MoeLoraArguments,
    get_moelora_config,
    get_quantization_config,
    main,
    make_parser,
    parse_args,
)


if __name__ == "__main__":
    main(*parse_args())
