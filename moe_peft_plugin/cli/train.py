"""`moe-peft train`: the main job. Fine-tune with MOELORA, save, reload in a fresh process, evaluate, plot.

Training itself is the SFT script (`examples/sft_moelora.py`: TRL's `SFTTrainer` with the MOELORA router losses); this
module adds the embedded defaults around it (model, data, hyperparameters: each one only when the user did not set
it), then evaluates base vs fine-tuned on the held-out questions in a fresh process and writes the plots.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

from .data import BENCHMARKS, DEFAULT_BENCHMARK, log
from .errors import UserError
from .models import RUN_FILE


# The embedded default: ~15 minutes of training on 2 CPU cores (SmolLM2-135M-Instruct, bf16).
DEFAULT_MAX_STEPS = 250
EMBEDDED_DEFAULTS: dict[str, object] = {
    "dtype": "bfloat16",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_target_modules": ["all-linear"],
    "num_experts": [8],
    "top_k": [2],
    "aux_loss_coef": 0.01,
    "contrastive_loss_coef": 0.01,
    "max_steps": DEFAULT_MAX_STEPS,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.0,
    "max_length": 256,
    "gradient_checkpointing": False,
    "logging_steps": 5,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "seed": 0,
}

# Built-in recipes (`--recipe`): argument defaults on top of the embedded ones; explicit arguments still win.
RECIPES: dict[str, dict[str, object]] = {
    "moelora": {},
    "mola": {"num_experts": [2, 4, 6, 8], "top_k": [2]},
    "mole": {"router_type": "soft", "gate_balance_loss_coef": 0.1, "contrastive_loss_coef": 0.0},
    "qlora": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True},
}

LOSS_CURVE = "loss_curve.png"


# ---------------------------------------------------------------------------------------------------------------------
# The SFT script
# ---------------------------------------------------------------------------------------------------------------------


def load_sft_script():
    """The SFT script module (`make_parser`, `parse_args`, `main`).

    An installed package provides it as `trainer_callbacks.sft_script`; a source checkout also has it as
    `examples/sft_moelora.py`, which is loaded from its path.
    """
    try:
        return importlib.import_module("trainer_callbacks.sft_script")
    except ImportError as err:
        if err.name not in ("trainer_callbacks.sft_script", "trainer_callbacks"):
            raise
    path = Path(__file__).resolve().parents[2] / "examples" / "sft_moelora.py"
    if not path.is_file():
        raise UserError(
            "The training script is not available: `moe-peft train` needs `trainer_callbacks` (`pip install "
            "'moe-peft-plugin[trl]'`) or a source checkout with examples/sft_moelora.py."
        )
    spec = importlib.util.spec_from_file_location("moe_peft_sft_moelora", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    group = parser.add_argument_group(
        "the main job (everything else goes to the SFT script: see `--help-trainer`)",
    )
    group.add_argument(
        "--benchmark",
        default=DEFAULT_BENCHMARK,
        choices=sorted(BENCHMARKS),
        help=f"Embedded benchmark to train and evaluate on (default {DEFAULT_BENCHMARK}). Its questions are split "
        "into a training set and a held-out evaluation set that training never sees.",
    )
    group.add_argument("--eval_size", type=int, default=200, help="Held-out questions (default 200).")
    group.add_argument("--split_seed", type=int, default=0, help="Seed of the train/eval split (default 0).")
    group.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="moelora",
        help="moelora (default: 8 experts, top-2, load balance + contrastive), mola (2,4,6,8 experts per layer group), "
        "mole (needs --expert_adapters LORA_DIR ...), qlora (4-bit base, needs bitsandbytes).",
    )
    group.add_argument("--skip_eval", action="store_true", help="Train and save only; no evaluation.")
    group.add_argument(
        "--eval_benchmark",
        default=None,
        help="With your own --dataset_name: evaluate on this embedded benchmark's held-out set (default: skip).",
    )
    group.add_argument("--eval_batch_size", type=int, default=16, help="Batch size of the evaluation (default 16).")
    group.add_argument(
        "--help-trainer", action="store_true", help="Show every argument of the SFT script (TRL + MOELORA) and exit."
    )


def _given_flags(argv: Sequence[str]) -> set[str]:
    """The `--name`s on a command line and in the YAML of its `--config`."""
    names = set()
    argv = list(argv)
    for arg in argv:
        if arg.startswith("--"):
            names.add(arg[2:].split("=", 1)[0].replace("-", "_"))
    config = None
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg == "--config" and index + 1 < len(argv):
            config = argv[index + 1]
    if config:
        import yaml

        if not os.path.isfile(config):
            raise UserError(f"--config {config}: no such file.")
        with open(config, encoding="utf-8") as handle:
            names.update((yaml.safe_load(handle) or {}).keys())
    return names


def _as_argv(name: str, value: object) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [f"--{name}", *[str(v) for v in value]]
    return [f"--{name}", str(value)]


def _value_after(argv: Sequence[str], name: str) -> Optional[str]:
    argv = list(argv)
    for index, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def _bool_flag(argv: Sequence[str], name: str) -> bool:
    """Whether a boolean option is switched on (`--name`, `--name true`, `--name=1`)."""
    argv = list(argv)
    for index, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes")
        if arg == f"--{name}":
            value = argv[index + 1] if index + 1 < len(argv) else None
            return value is None or value.startswith("--") or value.lower() in ("true", "1", "yes")
    return False


def check_gpu_options(argv: Sequence[str]) -> None:
    """Refuse options that need a GPU on a machine without one, with what to use instead."""
    import torch

    if torch.cuda.is_available():
        return
    if _bool_flag(argv, "fp16"):
        raise UserError(
            "--fp16 (mixed precision with loss scaling) needs a CUDA GPU, and this machine has none. On CPU use "
            "--bf16 or leave it out (the embedded default already trains a bfloat16 model)."
        )
    attn = _value_after(argv, "attn_implementation")
    if attn and attn.startswith("flash_attention"):
        raise UserError(
            f"--attn_implementation {attn} needs a CUDA GPU with flash-attn; on CPU use sdpa (the default) or eager."
        )
    if _bool_flag(argv, "use_liger_kernel"):
        raise UserError("--use_liger_kernel needs a CUDA GPU (Triton kernels); leave it out on CPU.")


def build_argv(options, rest: Sequence[str]) -> tuple[list[str], dict]:
    """The SFT script's command line: the user's arguments plus every default they did not set, and run metadata."""
    from .data import default_model_dir, ensure_default_model, prepare_benchmark

    check_gpu_options(rest)
    given = _given_flags(rest)
    argv: list[str] = []  # the defaults; the user's arguments come last, so that they win however they are spelt
    info: dict = {"recipe": options.recipe}
    defaults = dict(EMBEDDED_DEFAULTS)
    import torch

    if not torch.cuda.is_available():
        # TRL turns bf16 autocast on by default, which needs `--use_cpu` on CPU; the model itself is loaded in
        # bfloat16 (`--dtype`), which is what makes CPU training fast.
        defaults["bf16"] = False
    defaults.update(RECIPES[options.recipe])
    if options.recipe == "mole" and "expert_adapters" not in given:
        raise UserError("--recipe mole fuses trained LoRAs: give them with --expert_adapters LORA_DIR [LORA_DIR ...].")
    if options.recipe in ("mole",) or "expert_adapters" in given:
        for name in ("lora_r", "lora_alpha", "lora_target_modules", "num_experts"):
            defaults.pop(name, None)  # MoLE takes them from the LoRAs it fuses
    if options.recipe == "qlora" or "load_in_4bit" in given or "load_in_8bit" in given:
        if importlib.util.find_spec("bitsandbytes") is None:
            from .errors import MISSING_BITSANDBYTES

            raise UserError(MISSING_BITSANDBYTES)

    if "model_name_or_path" not in given:
        argv += ["--model_name_or_path", str(ensure_default_model())]
        info["model"] = "SmolLM2-135M-Instruct (embedded)"
    else:
        info["model"] = _value_after(rest, "model_name_or_path")
        if info["model"] and Path(info["model"]) == default_model_dir():
            ensure_default_model()

    own_data = "dataset_name" in given or "datasets" in given
    eval_benchmark = options.eval_benchmark if own_data else (options.eval_benchmark or options.benchmark)
    if not own_data:
        prepared = prepare_benchmark(options.benchmark, options.eval_size, options.split_seed)
        argv += ["--dataset_name", str(prepared.sft_dir)]
        info["train_data"] = {"benchmark": options.benchmark, **prepared.meta}
    else:
        info["train_data"] = {"dataset_name": _value_after(rest, "dataset_name")}
    if eval_benchmark and not options.skip_eval:
        if eval_benchmark not in BENCHMARKS:
            raise UserError(f"Unknown --eval_benchmark {eval_benchmark!r}; choose from {', '.join(BENCHMARKS)}.")
        prepared_eval = prepare_benchmark(eval_benchmark, options.eval_size, options.split_seed)
        info["eval"] = {
            "benchmark": eval_benchmark,
            "file": str(prepared_eval.mc_eval),
            "eval_size": options.eval_size,
            "split_seed": options.split_seed,
        }
        if own_data:
            info["eval"]["note"] = "the training data is your own: make sure it does not contain these questions"

    if "output_dir" not in given:
        name = f"{options.benchmark if not own_data else 'custom'}-{options.recipe}"
        argv += ["--output_dir", os.path.join("moe-peft-output", name)]
    for name, value in defaults.items():
        if name not in given:
            argv += _as_argv(name, value)
    return argv + list(rest), info


# ---------------------------------------------------------------------------------------------------------------------
# After training
# ---------------------------------------------------------------------------------------------------------------------


def save_loss_curve(log_history: Sequence[dict], path: str, title: str = "Training loss") -> Optional[str]:
    """Plot the training loss (and the router aux loss, when logged) per step to a PNG."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not points:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        from .errors import missing_package

        raise missing_package("matplotlib", "demo", "Writing the loss curve PNG") from err
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps, losses = zip(*points)
    axes.plot(steps, losses, marker="o", markersize=2, label="training loss (LM + router losses)")
    eval_points = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if eval_points:
        axes.plot(*zip(*eval_points), marker="s", label="held-out loss")
    aux = [(h["step"], h["router/aux_loss"]) for h in log_history if "router/aux_loss" in h]
    handles = axes.get_lines()
    if aux:
        twin = axes.twinx()
        handles += twin.plot(*zip(*aux), color="tab:orange", alpha=0.6, linewidth=1, label="router aux loss (right)")
        twin.set_ylabel("router aux loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=10)
    axes.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper right", fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def run_eval_subprocess(output_dir: str, info: dict, batch_size: int) -> int:
    """Evaluate the saved adapter against its base model in a fresh process (it must reload from disk)."""
    command = [sys.executable, "-m", "moe_peft_plugin.cli", "eval", output_dir, "--batch_size", str(batch_size)]
    log("evaluating base vs fine-tuned in a fresh process: " + " ".join(shlex.quote(c) for c in command[1:]))
    return subprocess.call(command)


def run(options, rest: Sequence[str], train_fn: Optional[Callable] = None) -> int:
    """The main job. `train_fn(argv, callbacks) -> trainer` replaces the SFT script (tests)."""
    if options.help_trainer:
        load_sft_script().make_parser(prog="moe-peft train").print_help()
        return 0
    argv, info = build_argv(options, rest)
    log("training: " + " ".join(shlex.quote(a) for a in argv))
    started = time.time()
    if train_fn is None:
        script = load_sft_script()
        parsed = script.parse_args(argv)
        trainer = script.main(*parsed)
    else:
        trainer = train_fn(argv)
    train_seconds = time.time() - started
    output_dir = trainer.args.output_dir
    if not getattr(trainer, "is_world_process_zero", lambda: True)():
        return 0
    history = list(trainer.state.log_history)
    info.update(
        {
            "argv": argv,
            "output_dir": os.path.abspath(output_dir),
            "global_step": trainer.state.global_step,
            "train_seconds": round(train_seconds, 1),
            "log_history": history,
        }
    )
    with open(os.path.join(output_dir, RUN_FILE), "w") as handle:
        json.dump(info, handle, indent=1)
    curve = save_loss_curve(
        history, os.path.join(output_dir, LOSS_CURVE), title=f"MOELORA fine-tuning ({info['model']})"
    )
    heatmap = os.path.join(output_dir, "router_load_heatmap.png")
    del trainer
    import gc

    gc.collect()

    status = 0
    if "eval" in info and not options.skip_eval:
        status = run_eval_subprocess(output_dir, info, options.eval_batch_size)
    lines = [
        "",
        f"done in {train_seconds / 60:.1f} min of training ({info['global_step']} steps).",
        f"  adapter:         {os.path.abspath(output_dir)}  (load: import moe_peft_plugin; PeftModel.from_pretrained)",
    ]
    if curve:
        lines.append(f"  loss curve:      {os.path.abspath(curve)}")
    if os.path.isfile(heatmap):
        lines.append(f"  routing heatmap: {os.path.abspath(heatmap)}")
    if os.path.isfile(os.path.join(output_dir, "eval_results.json")):
        lines.append(f"  eval results:    {os.path.abspath(os.path.join(output_dir, 'eval_results.json'))}")
    lines.append(
        f"next: moe-peft inspect {output_dir}   |   moe-peft export {output_dir} --merge --output_dir merged-lora"
    )
    print("\n".join(lines), flush=True)
    return status
