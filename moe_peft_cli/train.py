"""`moe-peft train`: the main job. Fine-tune with MOELORA, save, reload in a fresh process, evaluate, plot.

Training itself is the SFT script (`trainer_callbacks.sft_script`: TRL's `SFTTrainer` with the MOELORA router losses).
Its arguments are parsed by the script's own TRL parser, extended with the main-job options below, in one pass:
the embedded defaults (model, data, hyperparameters) < the YAML file of `--config` < the command line. Then the
embedded model and data are prepared (only what the user did not replace), the script trains, and this module
evaluates base vs fine-tuned on the held-out questions in a fresh process and writes the plots.

Nothing heavy is imported before `run`: `moe-peft train --help` starts without torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from .data import BENCHMARKS, COMMONSENSE_TASKS, log
from .errors import UserError
from .models import RUN_FILE, default_dtype


# The embedded default: the 8 commonsense tasks at once, ~15 minutes of training and ~9 of evaluation on 2 CPU cores
# (SmolLM2-135M-Instruct, bf16). A single --benchmark trains longer on its one task, as before.
DEFAULT_MAX_STEPS = 100
SINGLE_TASK_MAX_STEPS = 250
MIXTURE_EVAL_PER_TASK = 100  # held-out questions per task that the main job scores (of up to 400 held out)
SINGLE_TASK_EVAL_SIZE = 200
SPECIALISATION_PROBE_PER_TASK = 8  # validation questions per task routed every `SPECIALISATION_EVERY` steps
SPECIALISATION_EVERY = 30
EMBEDDED_DEFAULTS: dict[str, object] = {
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_target_modules": ["all-linear"],
    "num_experts": [8],
    "top_k": [2],
    "aux_loss_coef": 0.01,
    "contrastive_loss_coef": 0.01,
    # The routers at 10x the learning rate: at 1x they stay near uniform on the 8-task mixture (router entropy 0.99
    # ln 8); at 10x they learn task-dependent routing (0.94 ln 8, specialisation 1.4x) at the same accuracy (one seed
    # so far: docs/science/multitask/RESULTS.md).
    "moelora_router_lr_ratio": 10.0,
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

# Filled in after parsing (the embedded model and data are prepared only when they are used); shown by --help-trainer.
EMBEDDED_MODEL_HELP = "SmolLM2-135M-Instruct (embedded)"
EMBEDDED_DATA_HELP = "the --benchmark's training questions (embedded)"

LOSS_CURVE = "loss_curve.png"


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """The main-job options (on `moe-peft train --help`'s light parser and on the full training parser)."""
    group = parser.add_argument_group(
        "the main job (everything else goes to the SFT script: see `--help-trainer`)",
    )
    group.add_argument(
        "--benchmark",
        nargs="+",
        default=None,
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help="Embedded benchmark(s) to train and evaluate on: one for a single-task run, several for a multi-task "
        f"run. Default: the 8 commonsense tasks ({', '.join(COMMONSENSE_TASKS)}) at once. Each task's questions "
        f"are split into training, validation and held-out questions that training never sees. Choices: "
        f"{', '.join(sorted(BENCHMARKS))}.",
    )
    group.add_argument(
        "--eval_size",
        type=int,
        default=None,
        help=f"Held-out questions to score: per task in a multi-task run (default {MIXTURE_EVAL_PER_TASK}, of up to "
        f"400 held out), or the size of the held-out set of a single-task run (default {SINGLE_TASK_EVAL_SIZE}).",
    )
    group.add_argument("--split_seed", type=int, default=0, help="Seed of the train/eval split.")
    group.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="moelora",
        help="moelora (8 experts, top-2, load balance + contrastive), mola (2,4,6,8 experts per layer group), "
        "mole (needs --expert_adapters LORA_DIR ...), qlora (4-bit base, needs bitsandbytes).",
    )
    group.add_argument("--skip_eval", action="store_true", help="Train and save only; no evaluation.")
    group.add_argument(
        "--eval_benchmark",
        default=None,
        help="With your own --dataset_name: evaluate on this embedded benchmark's held-out set (unset: no evaluation).",
    )
    group.add_argument("--eval_batch_size", type=int, default=16, help="Batch size of the evaluation.")
    group.add_argument(
        "--help-trainer",
        "--help_trainer",
        action="store_true",
        help="Show every argument of the SFT script (TRL + MOELORA) with the defaults of `moe-peft train`, and exit.",
    )


MAIN_JOB_OPTIONS = ("benchmark", "eval_size", "split_seed", "recipe", "skip_eval", "eval_benchmark", "eval_batch_size",
                    "help_trainer")  # fmt: skip


def make_parser():
    """The SFT script's parser (TRL's arguments, the MOELORA fields, YAML `--config`) plus the main-job options."""
    from trainer_callbacks import sft_script

    parser = sft_script.make_parser(prog="moe-peft train")
    add_arguments(parser)
    return parser


def check_gpu_options(given: Mapping[str, Any]) -> None:
    """Refuse options that need a GPU on a machine without one, with what to use instead."""
    import torch

    if torch.cuda.is_available():
        return
    if given.get("fp16"):
        raise UserError(
            "--fp16 (mixed precision with loss scaling) needs a CUDA GPU, and this machine has none. On CPU use "
            "--bf16 or leave it out (the embedded default already trains a bfloat16 model)."
        )
    attn = given.get("attn_implementation")
    if attn and str(attn).startswith("flash_attention"):
        raise UserError(
            f"--attn_implementation {attn} needs a CUDA GPU with flash-attn; on CPU use sdpa (the default) or eager."
        )
    if given.get("use_liger_kernel"):
        raise UserError("--use_liger_kernel needs a CUDA GPU (Triton kernels); leave it out on CPU.")


def benchmarks(options) -> list[str]:
    """The embedded benchmarks of the run: `--benchmark`, or the 8 commonsense tasks."""
    chosen = list(options.benchmark or COMMONSENSE_TASKS)
    if len(set(chosen)) != len(chosen):
        raise UserError(f"--benchmark names a task twice: {' '.join(chosen)}.")
    return chosen


def train_defaults(options, given: Mapping[str, Any]) -> dict[str, object]:
    """The parser defaults of `moe-peft train`: the embedded ones, then the recipe's. They apply to what `given` (the
    command line and its YAML file) leaves out; the model and data are filled in after parsing."""
    import torch

    defaults = dict(EMBEDDED_DEFAULTS)
    own_data = bool(given.get("dataset_name") or given.get("datasets"))
    tasks = benchmarks(options)
    if len(tasks) == 1:
        defaults["max_steps"] = SINGLE_TASK_MAX_STEPS
    if not own_data and "max_length" not in given and "padding_free" not in given:
        # The embedded questions are short but uneven (BoolQ's passages are 3x the others): padding-free batches
        # cost what their tokens cost (2.4x faster than padded batches of the mixture here), and with `use_cache=False`
        # transformers masks every packed question from the others (sdpa and eager alike; the loss is unchanged).
        defaults.update(padding_free=True, max_length=None)
    # The base model in bfloat16 where the device runs it natively (what makes CPU training fast on an AVX-512 CPU),
    # else float32: on a CPU with AVX2 only, bfloat16 matmuls are emulated, 8x slower than float32.
    defaults["dtype"] = default_dtype("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        # TRL turns bf16 autocast on by default, which needs `--use_cpu` on CPU; the model itself is loaded in
        # `--dtype` (above).
        defaults["bf16"] = False
    defaults.update(RECIPES[options.recipe])
    if options.recipe == "mole" and not given.get("expert_adapters"):
        raise UserError("--recipe mole fuses trained LoRAs: give them with --expert_adapters LORA_DIR [LORA_DIR ...].")
    if options.recipe == "mole" or given.get("expert_adapters"):
        for name in ("lora_r", "lora_alpha", "lora_target_modules", "num_experts"):
            defaults.pop(name, None)  # MoLE takes them from the LoRAs it fuses
    if options.recipe == "qlora" or given.get("load_in_4bit") or given.get("load_in_8bit"):
        if importlib.util.find_spec("bitsandbytes") is None:
            from .errors import MISSING_BITSANDBYTES

            raise UserError(MISSING_BITSANDBYTES)
        from .quiet import release_bitsandbytes_kernels_warning

        release_bitsandbytes_kernels_warning()
    if "output_dir" not in given:
        data_name = tasks[0] if len(tasks) == 1 else ("commonsense" if tasks == list(COMMONSENSE_TASKS) else "mixture")
        name = f"{data_name if not own_data else 'custom'}-{options.recipe}"
        defaults["output_dir"] = os.path.join("moe-peft-output", name)
    return defaults


def prepare_model_and_data(options, given: Mapping[str, Any], script_args, model_args) -> dict:
    """Fill in the embedded model and training data where the user gave none, prepare the held-out questions, and
    return the run's metadata."""
    from .data import default_model_dir, ensure_default_model, prepare_benchmark, prepare_mixture

    info: dict = {"recipe": options.recipe}
    if not given.get("model_name_or_path"):
        model_args.model_name_or_path = str(ensure_default_model())
        info["model"] = "SmolLM2-135M-Instruct (embedded)"
    else:
        info["model"] = model_args.model_name_or_path
        if Path(info["model"]) == default_model_dir():
            ensure_default_model()

    own_data = bool(given.get("dataset_name") or given.get("datasets"))
    tasks = benchmarks(options)
    if not own_data and len(tasks) > 1:
        if options.eval_benchmark:
            raise UserError("--eval_benchmark is for your own --dataset_name; a multi-task run evaluates its tasks.")
        mixture = prepare_mixture(tasks, seed=options.split_seed)
        script_args.dataset_name = str(mixture.sft_dir)
        info["train_data"] = {"mixture": True, **mixture.meta}
        if not options.skip_eval:
            info["eval"] = {"mixture": True, "tasks": tasks, "eval_size": options.eval_size or MIXTURE_EVAL_PER_TASK,
                            "split_seed": options.split_seed}  # fmt: skip
        return info
    eval_size = options.eval_size or SINGLE_TASK_EVAL_SIZE
    eval_benchmark = options.eval_benchmark if own_data else (options.eval_benchmark or tasks[0])
    if not own_data:
        prepared = prepare_benchmark(tasks[0], eval_size, options.split_seed)
        script_args.dataset_name = str(prepared.sft_dir)
        info["train_data"] = {"benchmark": tasks[0], **prepared.meta}
    else:
        info["train_data"] = {"dataset_name": script_args.dataset_name}
    if eval_benchmark and not options.skip_eval:
        if eval_benchmark not in BENCHMARKS:
            raise UserError(f"Unknown --eval_benchmark {eval_benchmark!r}; choose from {', '.join(BENCHMARKS)}.")
        prepared_eval = prepare_benchmark(eval_benchmark, eval_size, options.split_seed)
        info["eval"] = {
            "benchmark": eval_benchmark,
            "file": str(prepared_eval.mc_eval),
            "eval_size": eval_size,
            "split_seed": options.split_seed,
        }
        if own_data:
            info["eval"]["note"] = "the training data is your own: make sure it does not contain these questions"
    return info


def specialisation_callbacks(info: Mapping) -> list:
    """For a multi-task run: a callback that measures the task specialisation of the routers during training, on a
    few validation questions of each task (never the held-out ones)."""
    from trainer_callbacks import TaskSpecialisationCallback

    from .multitask import mixture_items, mixture_seed, routing_texts

    if not info["train_data"].get("mixture"):
        return []
    tasks = info["train_data"]["tasks"]
    items = mixture_items(tasks, SPECIALISATION_PROBE_PER_TASK, "validation", seed=mixture_seed(info))
    return [TaskSpecialisationCallback(routing_texts(items), every_n_steps=SPECIALISATION_EVERY)]


def sft_command(defaults: Mapping[str, object], given: Mapping[str, Any], filled: Mapping[str, object]) -> list[str]:
    """An SFT-script command line equivalent to the run (logged and recorded): every argument that the user, the
    embedded defaults or the filled-in model and data set, each once."""
    command: list[str] = []
    for name, value in {**defaults, **filled, **given}.items():
        if name in MAIN_JOB_OPTIONS or (value is None and name not in defaults):
            continue
        if value is None:  # a default the main job chose (e.g. no max_length for padding-free batches)
            command += [f"--{name}", "None"]
            continue
        if isinstance(value, dict):
            command += [f"--{name}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            command += [f"--{name}", *[str(v) for v in value]]
        else:
            command += [f"--{name}", str(value)]
    return command


# ---------------------------------------------------------------------------------------------------------------------
# After training
# ---------------------------------------------------------------------------------------------------------------------


def save_loss_curve(
    log_history: Sequence[dict], path: str, title: str = "Training loss", num_experts: Optional[int] = None
) -> Optional[str]:
    """Plot the training loss (and the router aux loss, when logged) per step to a PNG; below it, when logged, the
    routing over training: the mean router entropy (with ln E, uniform routing, when `num_experts` is given) and the
    task specialisation (mean and max over layers, and its chance level)."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not points:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        from .errors import missing_package

        raise missing_package("matplotlib", "demo", "Writing the loss curve PNG") from err
    routing = [h for h in log_history if "router/specialisation" in h or "router/entropy" in h]
    figure = Figure(figsize=(7, 6.5 if routing else 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(2, 1, 1) if routing else figure.add_subplot()
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
    if routing:
        _draw_routing_over_training(figure.add_subplot(2, 1, 2, sharex=axes), log_history, num_experts)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _draw_routing_over_training(axes, log_history: Sequence[dict], num_experts: Optional[int]) -> None:
    """Mean router entropy (left axis, nats; ln E is uniform routing) and task specialisation (right axis) per step."""
    import math

    entropy = [(h["step"], h["router/entropy"]) for h in log_history if "router/entropy" in h]
    handles = []
    if entropy:
        handles += axes.plot(*zip(*entropy), color="tab:gray", label="mean router entropy, nats (left)")
        if num_experts:
            handles.append(axes.axhline(math.log(num_experts), color="tab:gray", linestyle=":",
                                        label=f"ln {num_experts}: uniform routing (left)"))  # fmt: skip
    axes.set_ylabel("router entropy (nats)")
    twin = axes.twinx()
    for key, style, label in (
        ("router/specialisation", "-o", "task specialisation, mean over layers"),
        ("router/specialisation_max", "-s", "task specialisation, most specialised layer"),
        ("router/specialisation_chance", "--", "chance level (shuffled tasks)"),
    ):
        values = [(h["step"], h[key]) for h in log_history if key in h]
        if values:
            handles += twin.plot(*zip(*values), style, markersize=3, label=label + " (right)")
    twin.set_ylabel("specialisation")
    axes.set_xlabel("optimizer step")
    axes.set_title("Routing over training (validation questions for the specialisation)", fontsize=9)
    axes.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper right", fontsize=7)
    axes.grid(alpha=0.3)


def run_eval_subprocess(output_dir: str, info: dict, batch_size: int) -> int:
    """Evaluate the saved adapter against its base model in a fresh process (it must reload from disk)."""
    command = [sys.executable, "-m", "moe_peft_cli", "eval", output_dir, "--batch_size", str(batch_size)]
    log("evaluating base vs fine-tuned in a fresh process: " + " ".join(shlex.quote(c) for c in command[1:]))
    return subprocess.call(command)


def run(argv: Sequence[str], train_fn: Optional[Callable] = None) -> int:
    """The main job for the arguments after `moe-peft train`.

    `train_fn(script_args, training_args, model_args, dataset_args, moe_args, callbacks) -> trainer` replaces the SFT
    script's `main` (tests).
    """
    from trainer_callbacks import sft_script  # torch, transformers and trl from here on

    parser = make_parser()
    given = sft_script.explicit_arguments(parser, argv)  # unknown or abbreviated arguments: one line, at once
    options = SimpleNamespace(**{name: given.get(name, parser.get_default(name)) for name in MAIN_JOB_OPTIONS})
    check_gpu_options(given)
    defaults = train_defaults(options, given)
    parser.set_defaults(**defaults)
    if options.help_trainer:
        parser.set_defaults(model_name_or_path=EMBEDDED_MODEL_HELP, dataset_name=EMBEDDED_DATA_HELP)
        parser.print_help()
        return 0
    # Every argument is checked here, before any model or data is prepared.
    script_args, training_args, model_args, dataset_args, moe_args, _ = sft_script.parse_args(argv, parser)
    info = prepare_model_and_data(options, given, script_args, model_args)
    filled = {"model_name_or_path": model_args.model_name_or_path, "dataset_name": script_args.dataset_name}
    command = sft_command(defaults, given, filled)
    log("training: " + " ".join(shlex.quote(a) for a in command))
    callbacks = specialisation_callbacks(info)
    started = time.time()
    trainer = (train_fn or sft_script.main)(
        script_args, training_args, model_args, dataset_args, moe_args, callbacks=callbacks
    )
    train_seconds = time.time() - started
    output_dir = trainer.args.output_dir
    if not getattr(trainer, "is_world_process_zero", lambda: True)():
        return 0
    history = list(trainer.state.log_history)
    info.update(
        {
            "argv": command,
            "output_dir": os.path.abspath(output_dir),
            "global_step": trainer.state.global_step,
            "train_seconds": round(train_seconds, 1),
            "log_history": history,
        }
    )
    with open(os.path.join(output_dir, RUN_FILE), "w") as handle:
        json.dump(info, handle, indent=1)
    experts = getattr(moe_args, "num_experts", None)
    curve = save_loss_curve(
        history,
        os.path.join(output_dir, LOSS_CURVE),
        title=f"MOELORA fine-tuning ({info['model']})",
        num_experts=max(experts) if isinstance(experts, (list, tuple)) and experts else None,
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
        f"  {'adapter:':<24} {os.path.abspath(output_dir)}  (load: import moe_peft_plugin; PeftModel.from_pretrained)",
    ]
    if curve:
        lines.append(f"  {'loss and routing curves:':<24} {os.path.abspath(curve)}")
    from .multitask import EXPERT_LOAD_FIGURE, SPECIALISATION_FIGURE, SPECIALISATION_FILE

    for label, name in (
        ("expert load in training", os.path.basename(heatmap)),
        ("routing by task", SPECIALISATION_FIGURE),
        ("held-out expert load", EXPERT_LOAD_FIGURE),
        ("specialisation", SPECIALISATION_FILE),
        ("eval results", "eval_results.json"),
    ):
        if os.path.isfile(os.path.join(output_dir, name)):
            lines.append(f"  {label + ':':<24} {os.path.abspath(os.path.join(output_dir, name))}")
    lines.append(
        f"next: moe-peft inspect {output_dir}   |   moe-peft export {output_dir} --merge --output_dir merged-lora"
    )
    print("\n".join(lines), flush=True)
    return status
