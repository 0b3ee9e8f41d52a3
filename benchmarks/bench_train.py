"""Whole training steps of MOELORA (MoELoRA, MoLA, MoLE) against peft LoRA r=8 and r=64, as ratios from one run.

For every model (`--models`) each config gets its own deep copy of the base model, wrapped with `get_peft_model`
(`target_modules="all-linear"`, which leaves out `lm_head`), and an AdamW optimizer over its trainable parameters.
A training step is exactly what a plain training loop does:

    out = model(input_ids=ids, labels=ids)     # for MOELORA, out.loss already includes out.aux_loss
    out.loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

on a fixed batch of random token ids. The configs run interleaved (one step each per round, in a rotating order), so
that drift of a shared machine hits all of them alike; a ratio is the median of the per-round ratios.

Memory. On CPU there is no reliable per-step peak (the allocator keeps freed memory and RSS is noisy), so what is
reported is what differs between the configs: the bytes saved for the backward pass in one forward (unique storages
passed to autograd's `saved_tensors_hooks`, without parameters and buffers) plus the adapter weights (trainable and,
for MoLE, frozen), the gradients and the AdamW state. The frozen base weights are the same for all configs and are
left out. On CUDA the peak of `torch.cuda.max_memory_allocated` over one step is reported as well (this config's own
weights, optimizer state and the step's transient memory; the other configs' model copies are subtracted).

Also measured: greedy generation with KV cache (batch 1) in tokens/s against LoRA r=8, and, with bitsandbytes, a
4-bit NF4 base (QLoRA) with LoRA against MOELORA.

Configs: LoRA r=8, LoRA r=64, MOELORA E=8 r=8 top-2 (load balancing 0.01), the same + contrastive loss (0.01), the
same with `router_sharing=True` (opt-in: q/k/v and gate/up share a router; no target, reported), MoLA
(2-4-6-8 experts over four groups of layers, top-2), MoLE (3 frozen experts with soft routing, learned temperature,
gating-balance loss; the experts are random here, standing in for trained LoRAs: the cost is the same).
Models: `smollm2-135m`, the embedded SmolLM2-135M-Instruct (d=576, 30 layers; skipped if it is not available), and
`llama-d1024`, a randomly initialised Llama with d=1024 (GQA, 4 layers by default) built locally; `llama-1b`, one of
Llama-3.2-1B's shape (d=2048, 16 layers, GQA; a 32k vocabulary), for a GPU.

Usage (2 CPU cores; PASSIVE stops idle OpenMP threads from spinning between the many small ops of a step):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train.py                    # roughly 15-25 min on 2 idle cores
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train.py --quick            # ~1 min, llama-d1024, batch 2x64
    python benchmarks/bench_train.py --models llama-d1024 --skip-4bit --json bench_train.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train.py --skip-train --skip-4bit   # generation only, ~2 min
    python benchmarks/bench_train.py --device cuda --batch 8 --seq 1024         # on a GPU
    python benchmarks/bench_train.py --device cuda --models smollm2-135m llama-1b --skip-4bit   # the issue's GPU run
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train.py --quick --torch-compile --skip-4bit   # + compiled steps
    python benchmarks/bench_train.py --models llama-d1024 --skip-train --skip-4bit --compiled-generation
                                                     # + generation with a static cache and a compiled forward
    python benchmarks/bench_train.py --models smollm2-135m --packed --batch 8 --seq 86 --skip-generation --skip-4bit
                                                     # the main job's padding-free batches: 8 sequences in one row

Targets (the performance issue; eager steps): MOELORA E=8, MoLA and MoLE at <= 1.15x LoRA r=8 and <= 1.05x LoRA r=64
step time and <= 1.05x LoRA r=64 step memory ("mem MiB"; on CUDA also the peak), the contrastive loss <= 1.15x the
step without it, cached generation >= 0.90x LoRA r=8 tokens/s. `--torch-compile` adds a table of compiled steps
(ratios only).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as transformers_logging

import moe_peft_plugin  # noqa: F401  (registers MOELORA)
from moe_peft_plugin import MoeLoraConfig
from moe_peft_plugin.config import mola_group_sizes


# Targets of the performance issue (eager mode; the compiled table reports ratios only).
TIME_VS_LORA_R8 = 1.15
TIME_VS_LORA_R64 = 1.05
MEM_VS_LORA_R64 = 1.05  # the step's memory that differs between configs ("mem MiB"; on CUDA also the peak)
CONTRASTIVE_VS_OFF = 1.15
GENERATION_VS_LORA_R8 = 0.90  # tokens/s, higher is better

R8, R64, MOE = "LoRA r=8", "LoRA r=64", "MOELORA E=8 r=8 top-2"
SHARED = "MOELORA E=8 shared routers"  # router_sharing=True: q/k/v and gate/up share one router
MIB = 2**20


@dataclass
class Case:
    name: str
    kind: str  # "lora" or "moe"
    kwargs: dict
    targets: tuple = ()  # which targets apply: "time" (step time), "mem" (step memory)
    contrastive_off: Optional[str] = None  # the same config without the contrastive loss


def mola_experts(num_layers: int) -> tuple[list[int], str]:
    """MoLA's inverted triangle 2-4-6-8 over four groups of consecutive layers, split by the library's rule."""
    if num_layers % 4 == 0:
        return [2, 4, 6, 8], "2-4-6-8"
    # The adapter expands the short list itself; the label records the group sizes it uses.
    sizes = mola_group_sizes(num_layers, 4)
    return [2, 4, 6, 8], f"2-4-6-8 ({'/'.join(map(str, sizes))})"


def train_cases(num_layers: int) -> list[Case]:
    mola, mola_label = mola_experts(num_layers)
    moe = dict(r=8, num_experts=8, top_k=2, aux_loss_coef=0.01)
    return [
        Case(R8, "lora", dict(r=8)),
        Case(R64, "lora", dict(r=64)),
        Case(MOE, "moe", moe, targets=("time", "mem")),
        Case("MOELORA E=8 +contrastive", "moe", dict(moe, contrastive_loss_coef=0.01), contrastive_off=MOE),
        Case(SHARED, "moe", dict(moe, router_sharing=True)),
        Case(f"MoLA {mola_label}", "moe", dict(moe, num_experts=mola), targets=("time", "mem")),
        Case(
            "MoLE soft E=3 frozen",
            "moe",
            # Dense softmax gating over frozen experts, learned temperature, gating-balance loss instead of the Switch
            # load-balancing loss. init_weights=False: non-zero experts, as trained LoRAs would be.
            dict(
                r=8,
                num_experts=3,
                router_type="soft",
                freeze_experts=True,
                learn_router_temperature=True,
                aux_loss_coef=0.0,
                gate_balance_loss_coef=0.1,
                init_weights=False,
            ),
            targets=("time", "mem"),
        ),
    ]


def peft_config(case: Case):
    common = dict(task_type="CAUSAL_LM", target_modules="all-linear", lora_alpha=case.kwargs["r"])
    if case.kind == "lora":
        return LoraConfig(**common, **case.kwargs)
    return MoeLoraConfig(**common, **case.kwargs)


def wrap(base: nn.Module, case: Case, copy_base: bool = True) -> nn.Module:
    """`get_peft_model` on a deep copy of `base` (it mutates the model it wraps)."""
    torch.manual_seed(0)
    model = copy.deepcopy(base) if copy_base else base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, peft_config(case))
    return model.train()


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


# Randomly initialised Llamas built locally: their shapes, and the default number of layers. All dims are multiples of
# 64, as bitsandbytes' CPU 4-bit kernels need. `llama-1b` has Llama-3.2-1B's shape (with a 32k vocabulary): the
# "1B-class" model of the GPU run; too slow for the default CPU runs.
RANDOM_LLAMAS = {
    "llama-d1024": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                        num_hidden_layers=4),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                     num_hidden_layers=16),
}  # fmt: skip


def random_llama_config(name: str, num_layers: Optional[int] = None) -> LlamaConfig:
    """The config of the random Llama `name` (`RANDOM_LLAMAS`), with `num_layers` layers if given."""
    shape = dict(RANDOM_LLAMAS[name])
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    return LlamaConfig(
        **shape,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_llama(name: str, num_layers: Optional[int], dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(random_llama_config(name, num_layers)).to(dtype)


def load_smollm2(dtype: torch.dtype) -> tuple[Optional[nn.Module], str]:
    """The embedded SmolLM2-135M-Instruct, or `(None, reason)` if it is not available on this machine."""
    try:
        from moe_peft_cli.data import ensure_default_model

        path = ensure_default_model()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as err:  # not cached and not convertible here (no network, no `gguf`, ...)
        return None, f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return model, str(path)


def describe(model: nn.Module) -> str:
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    return (
        f"d={config.hidden_size}, {config.num_hidden_layers} layers, vocab {config.vocab_size}, "
        f"{params / 1e6:.1f}M params"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runner:
    case: Case
    model: nn.Module
    optimizer: torch.optim.Optimizer
    base_bytes: int  # parameter bytes of the model before wrapping
    samples: list = field(default_factory=list)  # seconds per timed step
    compiled: Optional[nn.Module] = None  # `torch.compile(model)`: the steps run through it (`--torch-compile`)

    @property
    def name(self) -> str:
        return self.case.name + (COMPILED if self.compiled is not None else "")

    @property
    def step_model(self) -> nn.Module:
        return self.model if self.compiled is None else self.compiled


COMPILED = " [compiled]"


def make_runner(case: Case, base: nn.Module, copy_base: bool = True, torch_compile: bool = False) -> Runner:
    base_bytes = tensor_bytes(base.parameters())
    model = wrap(base, case, copy_base)
    params = [p for p in model.parameters() if p.requires_grad]
    runner = Runner(case, model, torch.optim.AdamW(params, lr=1e-4), base_bytes)
    if torch_compile:
        allow_a_compile_per_model()
        runner.compiled = torch.compile(model)
    return runner


def allow_a_compile_per_model() -> None:
    """Every config is its own model behind the same `forward` code: dynamo compiles once per model (and per shape),
    so its recompile limit (8) would silently leave the later configs eager. Raised, and made an error."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def training_batch(vocab: int, args, device: torch.device) -> dict:
    """The fixed batch of random token ids every step trains on: `(batch, seq)`, or with `--packed` the `batch`
    sequences of `seq` tokens packed into one row, each restarting its positions (the padding-free batches of TRL's
    `padding_free=True`, which `moe-peft train` uses: one short row, where the per-layer cost of small operations
    weighs more than in a wide batch)."""
    generator = torch.Generator().manual_seed(0)
    if not args.packed:
        ids = torch.randint(3, vocab, (args.batch, args.seq), generator=generator).to(device)
        return {"input_ids": ids, "labels": ids}
    ids = torch.randint(3, vocab, (1, args.batch * args.seq), generator=generator).to(device)
    positions = torch.arange(args.seq).repeat(args.batch)[None].to(device)
    return {"input_ids": ids, "labels": ids, "position_ids": positions}


def train_step(runner: Runner, inputs: dict) -> torch.Tensor:
    out = runner.step_model(**inputs)
    out.loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    return out.loss.detach()


def checked_step(runner: Runner, inputs: dict) -> list[str]:
    """A training step that also checks what the benchmark relies on; returns the problems found."""
    problems = []
    if runner.case.kwargs.get("freeze_experts"):
        trainable_experts = [
            n for n, p in runner.model.named_parameters() if p.requires_grad and ("moelora_A" in n or "moelora_B" in n)
        ]
        if trainable_experts:
            problems.append(
                f"{runner.name}: freeze_experts=True, but {len(trainable_experts)} expert tensors are trainable "
                f"(e.g. {trainable_experts[0]}); its numbers are those of trainable experts"
            )
    out = runner.step_model(**inputs)
    if not torch.isfinite(out.loss):
        problems.append(f"{runner.name}: loss is {out.loss.item()}")
    if runner.case.kind == "moe":
        aux = out.get("aux_loss")
        if aux is None:
            problems.append(f"{runner.name}: the model output has no aux_loss")
        elif not aux.requires_grad:
            problems.append(f"{runner.name}: aux_loss has no gradient")
    out.loss.backward()
    named = [(n, p) for n, p in runner.model.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if p.grad is None]
    # The router losses alone give the routers a gradient, even while the experts are still zero.
    dead_routers = [n for n, p in named if "moelora_router" in n and p.grad is not None and not p.grad.any()]
    for label, names in (("no gradient", missing), ("zero router gradient", dead_routers)):
        if names:
            problems.append(f"{runner.name}: {label} for {len(names)} trainable tensors, e.g. {names[0]}")
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    return problems


def time_rounds(runners: list[Runner], inputs: dict, steps: int, device: torch.device) -> None:
    """`steps` rounds of one step per config, in a rotating order; appends the step times to `runner.samples`."""
    gc.collect()
    gc.disable()
    try:
        for round_index in range(steps):
            shift = round_index % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                sync(device)
                start = time.perf_counter()
                train_step(runner, inputs)
                sync(device)
                runner.samples.append(time.perf_counter() - start)
    finally:
        gc.enable()


def saved_bytes(model: nn.Module, inputs: dict) -> int:
    """Bytes of the unique storages saved for backward by one training forward, without parameters and buffers."""
    excluded = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in excluded:
            seen.setdefault(ptr, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    del out
    return sum(seen.values())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(runner: Runner) -> dict:
    trainable = [p for p in runner.model.parameters() if p.requires_grad]
    adam = [t for state in runner.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_bytes": tensor_bytes(trainable),
        # Trainable and frozen (MoLE experts) adapter weights: everything that wrapping added.
        "adapter_bytes": tensor_bytes(runner.model.parameters()) - runner.base_bytes,
        "grad_bytes": tensor_bytes(trainable),
        "optimizer_bytes": tensor_bytes(adam),
        "adapter_dtypes": sorted({str(p.dtype).split(".")[-1] for p in trainable}),
    }


def cuda_peak_bytes(runner: Runner, inputs: dict, device: torch.device) -> int:
    """Peak allocated memory of one step of this config alone: its weights + optimizer state + the step's transient."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    train_step(runner, inputs)
    sync(device)
    transient = torch.cuda.max_memory_allocated(device) - before
    resident = tensor_bytes(list(runner.model.parameters()) + list(runner.model.buffers()))
    resident += tensor_bytes(t for s in runner.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return resident + transient


def host_syncs(runner: Runner, inputs: dict) -> list[str]:
    """Where one training step (forward, backward, AdamW) makes the host wait for the GPU: `file:line` of every
    synchronising call, as `torch.cuda.set_sync_debug_mode("warn")` reports them (e.g. `.item()`, `.tolist()`,
    `nonzero`, a data-dependent shape). Syncs stall the CPU that queues the GPU's kernels."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(runner, inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios: slow drift of a shared machine cancels, bursts of load are discarded."""
    return statistics.median(x / y for x, y in zip(a, b))


def iqr_percent(samples: list[float]) -> float:
    s = sorted(samples)
    return 100 * (s[(3 * len(s)) // 4] - s[len(s) // 4]) / statistics.median(s)


def fmt_ratio(value: float, limit: Optional[float], higher_is_better: bool = False) -> str:
    if limit is None:
        return f"{value:5.2f}x     "
    ok = value >= limit if higher_is_better else value <= limit
    return f"{value:5.2f}x {'PASS' if ok else 'FAIL'}"


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def measure(runners: list[Runner], inputs: dict, args, device: torch.device, label: str, problems: list[str]) -> dict:
    """Warmup (with checks), interleaved timed steps, then memory; returns the raw numbers per config."""
    progress(f"{label}: {args.warmup} warmup step(s) per config")
    for runner in runners:
        problems += [f"{label} {p}" for p in checked_step(runner, inputs)]
        for _ in range(args.warmup - 1):
            train_step(runner, inputs)
    progress(f"{label}: {args.steps} timed rounds of {len(runners)} configs")
    time_rounds(runners, inputs, args.steps, device)
    results = {}
    for runner in runners:
        entry = {"step_s": runner.samples}
        results[runner.name] = entry
        if runner.compiled is not None:  # memory: the eager table's (saved-tensor hooks see no compiled graph)
            continue
        entry.update(saved_bytes=saved_bytes(runner.model, inputs), **state_bytes(runner))
        entry["memory_bytes"] = (
            entry["saved_bytes"] + entry["adapter_bytes"] + entry["grad_bytes"] + entry["optimizer_bytes"]
        )
        if device.type == "cuda":
            entry["cuda_peak_bytes"] = cuda_peak_bytes(runner, inputs, device)
            entry["host_syncs"] = host_syncs(runner, inputs)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Training table
# ---------------------------------------------------------------------------------------------------------------------


def print_train_table(label: str, cases: list[Case], results: dict, device: torch.device) -> list[str]:
    failures = []
    samples = {name: entry["step_s"] for name, entry in results.items()}
    cuda = device.type == "cuda"
    header = (
        f"{'config':28s} {'trainable':>10s} {'step ms':>8s} {'iqr%':>5s} {'vs LoRA r8':>12s} {'vs LoRA r64':>12s} "
        f"{'saved MiB':>9s} {'act vs r64':>10s} {'mem MiB':>8s} {'mem vs r8':>9s} {'mem vs r64':>12s}"
        + (f" {'peak MiB':>8s} {'peak vs r64':>12s} {'syncs':>5s}" if cuda else "")
        + f" {'contrast/off':>13s}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        entry = results[case.name]
        t8, t64 = median_ratio(samples[case.name], samples[R8]), median_ratio(samples[case.name], samples[R64])
        a64 = entry["saved_bytes"] / results[R64]["saved_bytes"]
        m8 = entry["memory_bytes"] / results[R8]["memory_bytes"]
        m64 = entry["memory_bytes"] / results[R64]["memory_bytes"]
        time_on, mem_on = "time" in case.targets, "mem" in case.targets
        entry.update(time_vs_lora_r8=t8, time_vs_lora_r64=t64, act_vs_lora_r64=a64, mem_vs_lora_r8=m8)
        entry["mem_vs_lora_r64"] = m64
        if time_on and t8 > TIME_VS_LORA_R8:
            failures.append(f"{label} {case.name}: step time {t8:.2f}x LoRA r=8 > {TIME_VS_LORA_R8}")
        if time_on and t64 > TIME_VS_LORA_R64:
            failures.append(f"{label} {case.name}: step time {t64:.2f}x LoRA r=64 > {TIME_VS_LORA_R64}")
        if mem_on and m64 > MEM_VS_LORA_R64:
            failures.append(f"{label} {case.name}: step memory {m64:.2f}x LoRA r=64 > {MEM_VS_LORA_R64}")
        con = ""
        if case.contrastive_off is not None:
            tc = median_ratio(samples[case.name], samples[case.contrastive_off])
            entry["time_vs_contrastive_off"] = tc
            con = fmt_ratio(tc, CONTRASTIVE_VS_OFF)
            if tc > CONTRASTIVE_VS_OFF:
                failures.append(f"{label} {case.name}: {tc:.2f}x without contrastive > {CONTRASTIVE_VS_OFF}")
        peak = ""
        if cuda:
            p64 = entry["cuda_peak_bytes"] / results[R64]["cuda_peak_bytes"]
            entry["cuda_peak_vs_lora_r64"] = p64
            peak = f" {entry['cuda_peak_bytes'] / MIB:8.1f} {fmt_ratio(p64, MEM_VS_LORA_R64 if mem_on else None):>12s}"
            if mem_on and p64 > MEM_VS_LORA_R64:
                failures.append(f"{label} {case.name}: CUDA peak memory {p64:.2f}x LoRA r=64 > {MEM_VS_LORA_R64}")
            # Syncs of transformers or torch itself happen for LoRA too; those a MOELORA step adds are ours.
            added = sorted(set(entry["host_syncs"]) - set(results[R8]["host_syncs"]))
            entry["host_syncs_added"] = added
            peak += f" {len(entry['host_syncs']):5d}"
            if case.kind == "moe" and added:
                failures.append(f"{label} {case.name}: host-device syncs LoRA r=8 has not: {', '.join(added)}")
        print(
            f"{case.name:28s} {entry['trainable_params'] / 1e6:9.2f}M {1e3 * statistics.median(samples[case.name]):8.1f} "
            f"{iqr_percent(samples[case.name]):5.1f} {fmt_ratio(t8, TIME_VS_LORA_R8 if time_on else None):>12s} "
            f"{fmt_ratio(t64, TIME_VS_LORA_R64 if time_on else None):>12s} {entry['saved_bytes'] / MIB:9.1f} "
            f"{a64:9.2f}x {entry['memory_bytes'] / MIB:8.1f} "
            f"{m8:8.2f}x {fmt_ratio(m64, MEM_VS_LORA_R64 if mem_on else None):>12s}{peak} {con:>13s}"
        )
    return failures


MEMORY_LEGEND = (
    "(step ms: median fwd+bwd+AdamW step; iqr%: interquartile range / median; ratios: median of per-round ratios, "
    "configs interleaved;\n saved MiB: unique storages saved for backward in one forward, without parameters and "
    "buffers; mem MiB: saved + adapter weights + grads + AdamW state\n (frozen base weights left out: same for all); "
    "peak MiB (CUDA only): max_memory_allocated over one step, this config's weights + optimizer + transient;\n "
    "syncs (CUDA only): host-device synchronisations in one step, torch.cuda.set_sync_debug_mode('warn'); a MOELORA "
    "config fails if it syncs where LoRA r=8 does not)"
)


def bench_model(label: str, base: nn.Module, source: str, args, dtype, device, problems) -> tuple[dict, list[str]]:
    base = base.to(device)
    cases = train_cases(base.config.num_hidden_layers)
    vocab = base.config.vocab_size
    inputs = training_batch(vocab, args, device)

    if args.skip_train:  # only the models the generation table needs
        cases = [case for case in cases if case.name in (R8, R64, MOE)]
    progress(f"{label}: wrapping {len(cases)} configs")
    runners = [make_runner(case, base) for case in cases]
    if args.torch_compile and not args.skip_train:  # the compiled configs run interleaved with the eager ones
        runners += [make_runner(case, base, torch_compile=True) for case in cases]
    report = {"source": source, "description": describe(base), "batch": args.batch, "seq": args.seq}
    failures = []
    if not args.skip_train:
        report["train"], failures = train_table(
            label, base, source, cases, runners, inputs, args, dtype, device, problems
        )

    if not args.skip_generation:
        gen_models = {"base (no adapter)": base}
        gen_models.update({r.name: r.model for r in runners if r.name in (R8, R64, MOE, SHARED)})
        gen_report, gen_failures = bench_generation(label, gen_models, vocab, args, device, problems)
        report["generation"] = gen_report
        failures += gen_failures
        if args.compiled_generation:
            report["compiled_generation"], _ = bench_generation(label, gen_models, vocab, args, device, problems,
                                                                compiled=True)  # fmt: skip
    del runners
    gc.collect()
    return report, failures


def train_table(label, base, source, cases, runners, inputs, args, dtype, device, problems) -> tuple[dict, list[str]]:
    results = measure(runners, inputs, args, device, label, problems)
    adapter_dtypes = sorted({d for entry in results.values() for d in entry.get("adapter_dtypes", ())})
    batch = f"{args.batch}x{args.seq}" + (" packed in one row" if args.packed else "")
    print(
        f"\n== {label}: {source} ({describe(base)}, {str(dtype).split('.')[-1]}; adapters "
        f"{', '.join(adapter_dtypes)})  batch {batch}  {device.type}, threads={torch.get_num_threads()}"
        f"  median of {args.steps} (after {args.warmup} warmup) =="
    )
    failures = print_train_table(label, cases, results, device)
    print(MEMORY_LEGEND)
    if args.torch_compile:
        print_compiled_table(label, cases, results)
    return results, failures


def print_compiled_table(label: str, cases: list[Case], results: dict) -> None:
    """Step times of `torch.compile(model)` (default inductor backend), measured in the same rounds as the eager ones."""
    samples = {name: entry["step_s"] for name, entry in results.items()}
    print(f"\n-- {label}: torch.compile(model), the same steps interleaved with the eager configs above --")
    header = (
        f"{'config':28s} {'step ms':>8s} {'iqr%':>5s} {'vs LoRA r8':>10s} {'vs LoRA r64':>11s} {'vs eager':>9s} "
        f"{'contrast/off':>12s}"
    )
    print(header)
    print("-" * len(header))
    r8, r64 = samples[R8 + COMPILED], samples[R64 + COMPILED]
    for case in cases:
        name = case.name + COMPILED
        entry = results[name]
        entry.update(
            time_vs_lora_r8=median_ratio(samples[name], r8),
            time_vs_lora_r64=median_ratio(samples[name], r64),
            time_vs_eager=median_ratio(samples[name], samples[case.name]),
        )
        con = ""
        if case.contrastive_off is not None:
            entry["time_vs_contrastive_off"] = median_ratio(samples[name], samples[case.contrastive_off + COMPILED])
            con = f"{entry['time_vs_contrastive_off']:11.2f}x"
        print(
            f"{name:28s} {1e3 * statistics.median(samples[name]):8.1f} {iqr_percent(samples[name]):5.1f} "
            f"{entry['time_vs_lora_r8']:9.2f}x {entry['time_vs_lora_r64']:10.2f}x {entry['time_vs_eager']:8.2f}x {con:>12s}"
        )
    print("(ratios only: the issue's targets apply to the eager steps; the first steps, which compile, are warmup)")


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------


def compiled_generation_kwargs(device: torch.device) -> dict:
    """`generate` arguments for a static KV cache with the decoding forward compiled by transformers (its
    `compile_config`, which it applies to CUDA and a few other devices by itself and here to the CPU as well)."""
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = device.type == "cpu"
    allow_a_compile_per_model()
    return dict(cache_implementation="static", compile_config=config)


def bench_generation(
    label: str, models: dict, vocab: int, args, device, problems, compiled: bool = False
) -> tuple[dict, list[str]]:
    """Greedy generation with KV cache, batch 1, tokens/s of every model against LoRA r=8, interleaved rounds.

    `compiled`: a static cache and the decoding forward compiled (`compiled_generation_kwargs`); the first call of each
    model, which compiles, is not timed. No target applies to it (the issue's target is for eager decoding)."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (1, args.gen_prompt), generator=generator).to(device)
    mask = torch.ones_like(prompt)
    n = args.gen_tokens
    # min_new_tokens: every config generates exactly n tokens, whatever the (random) model predicts.
    kwargs = dict(do_sample=False, use_cache=True, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    if compiled:
        kwargs.update(compiled_generation_kwargs(device))
    for model in models.values():
        model.eval()
    samples = {name: [] for name in models}
    kind = "compiled generation" if compiled else "generation"
    progress(f"{label}: {kind}, {args.gen_rounds} rounds of {len(models)} models")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, model in models.items():
                started = time.perf_counter()
                # A static cache is sized for the whole generation: warm up (and compile) at the timed length.
                model.generate(
                    input_ids=prompt, attention_mask=mask, **{**kwargs, "max_new_tokens": n if compiled else 2}
                )
                if compiled:
                    progress(f"{label}: {name} compiled and generated once in {time.perf_counter() - started:.0f} s")
            names = list(models)
            for round_index in range(args.gen_rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    sync(device)
                    start = time.perf_counter()
                    out = models[name].generate(input_ids=prompt, attention_mask=mask, **kwargs)
                    sync(device)
                    samples[name].append(time.perf_counter() - start)
                    if out.shape[1] - prompt.shape[1] != n:
                        problems.append(f"{label} generation {name}: {out.shape[1] - prompt.shape[1]} tokens, not {n}")
    finally:
        for model in models.values():
            model.train()

    cache = "static KV cache, decoding forward compiled" if compiled else "KV cache"
    print(
        f"\n-- {label}: {kind}, greedy with {cache}, batch 1, prompt {args.gen_prompt} + {n} new tokens, "
        f"median of {args.gen_rounds} --"
    )
    header = f"{'model':28s} {'tokens/s':>9s} {'iqr%':>5s} {'vs LoRA r8':>12s}"
    print(header)
    print("-" * len(header))
    report, failures = {}, []
    for name, times in samples.items():
        ratio = median_ratio(samples[R8], times)  # tokens/s ratio
        target = GENERATION_VS_LORA_R8 if name == MOE and not compiled else None
        report[name] = {"seconds": times, "tokens_per_s": n / statistics.median(times), "vs_lora_r8": ratio}
        if target is not None and ratio < target:
            failures.append(f"{label} generation {name}: {ratio:.2f}x LoRA r=8 tokens/s < {target}")
        print(
            f"{name:28s} {n / statistics.median(times):9.1f} {iqr_percent(times):5.1f} "
            f"{fmt_ratio(ratio, target, higher_is_better=True):>12s}"
        )
    return report, failures


# ---------------------------------------------------------------------------------------------------------------------
# 4-bit (QLoRA)
# ---------------------------------------------------------------------------------------------------------------------


def bench_4bit(args, dtype, device, problems) -> Optional[dict]:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        print(f"\n-- 4-bit: skipped ({err}) --")
        return None
    label = "llama-d1024 NF4"
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    inputs = training_batch(32000, args, device)
    runners = []
    with tempfile.TemporaryDirectory(prefix="bench-train-nf4-") as folder:
        float_model = build_llama("llama-d1024", args.llama_layers, dtype)
        description = describe(float_model)
        cases = [c for c in train_cases(float_model.config.num_hidden_layers) if c.name in (R8, R64, MOE)]
        progress(f"{label}: quantizing {len(cases)} copies")
        float_model.save_pretrained(folder)
        del float_model
        for case in cases:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(
                    folder, quantization_config=quantization, dtype=dtype, device_map={"": device}
                )
                # The QLoRA recipe: norms, embeddings and lm_head in float32, inputs that require grad.
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            runners.append(make_runner(case, model, copy_base=False))
    results = measure(runners, inputs, args, device, label, problems)
    samples = {name: entry["step_s"] for name, entry in results.items()}
    print(
        f"\n-- {label}: QLoRA (NF4 base, compute {str(dtype).split('.')[-1]}, prepare_model_for_kbit_training; "
        f"{description})  batch {args.batch}x{args.seq}  median of {args.steps} --"
    )
    cuda = device.type == "cuda"
    header = (
        f"{'config':28s} {'trainable':>10s} {'step ms':>8s} {'iqr%':>5s} {'vs QLoRA r8':>11s} {'vs QLoRA r64':>12s} "
        f"{'saved MiB':>9s} {'mem MiB':>8s} {'mem vs r8':>9s} {'mem vs r64':>10s}"
        + (f" {'peak MiB':>8s} {'peak vs r8':>10s}" if cuda else "")
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        entry = results[case.name]
        entry["time_vs_lora_r8"] = median_ratio(samples[case.name], samples[R8])
        entry["time_vs_lora_r64"] = median_ratio(samples[case.name], samples[R64])
        entry["mem_vs_lora_r8"] = entry["memory_bytes"] / results[R8]["memory_bytes"]
        entry["mem_vs_lora_r64"] = entry["memory_bytes"] / results[R64]["memory_bytes"]
        peak = ""
        if cuda:
            entry["cuda_peak_vs_lora_r8"] = entry["cuda_peak_bytes"] / results[R8]["cuda_peak_bytes"]
            peak = f" {entry['cuda_peak_bytes'] / MIB:8.1f} {entry['cuda_peak_vs_lora_r8']:9.2f}x"
        print(
            f"{'NF4 + ' + case.name:28s} "
            f"{entry['trainable_params'] / 1e6:9.2f}M {1e3 * statistics.median(samples[case.name]):8.1f} "
            f"{iqr_percent(samples[case.name]):5.1f} {entry['time_vs_lora_r8']:10.2f}x {entry['time_vs_lora_r64']:11.2f}x "
            f"{entry['saved_bytes'] / MIB:9.1f} {entry['memory_bytes'] / MIB:8.1f} {entry['mem_vs_lora_r8']:8.2f}x "
            f"{entry['mem_vs_lora_r64']:9.2f}x{peak}"
        )
    print("(no target in the issue for 4-bit: ratios only; memory columns as above)")
    del runners
    gc.collect()
    return {"description": description, "train": results}


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def cpu_kernels() -> str:
    """The CPU's vector capability as torch dispatches on it, and whether it has bfloat16 kernels: without them (AVX2
    only) a bfloat16 base model runs ~8x slower than float32, so bf16 timings do not compare across CPUs."""
    from moe_peft_cli.models import native_bfloat16

    native = native_bfloat16("cpu")
    return f"{torch.backends.cpu.get_cpu_capability()}, bfloat16 kernels: {'yes' if native else 'no'}"


def environment(device: torch.device) -> dict:
    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "moe-peft-plugin"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            processor = next((line.split(":", 1)[1].strip() for line in handle if "model name" in line), processor)
    except OSError:
        pass
    return {
        "versions": versions,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu: {processor} ({cpu_kernels()})",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (~1 min): llama-d1024, batch 2x64")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("smollm2-135m", *RANDOM_LLAMAS),
        help="default: smollm2-135m and llama-d1024 (llama-1b: Llama-3.2-1B's shape, for a GPU)",
    )
    parser.add_argument(
        "--llama-layers",
        type=int,
        help="layers of the random Llamas, >= 4 (MoLA's four groups; default 4 for llama-d1024, 16 for llama-1b)",
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="base model dtype")
    parser.add_argument("--steps", type=int, help="timed rounds (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps per config, >= 1 (default 2; quick 1)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 4; quick 2)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 256; quick 64)")
    parser.add_argument(
        "--packed",
        action="store_true",
        help="pack the batch's sequences into one row with restarting position ids (padding-free, as moe-peft train)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--skip-train", action="store_true", help="no training steps: generation (and 4-bit) only")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--gen-rounds", type=int, help="generation rounds (default 3; quick 2)")
    parser.add_argument("--gen-prompt", type=int, help="prompt tokens (default 64; quick 16)")
    parser.add_argument("--gen-tokens", type=int, help="new tokens (default 64; quick 8)")
    parser.add_argument("--skip-4bit", action="store_true")
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="also time every config through torch.compile(model), interleaved with the eager steps (its own table)",
    )
    parser.add_argument(
        "--compiled-generation",
        action="store_true",
        help="also time generation with a static KV cache and the decoding forward compiled by transformers "
        "(`compile_config`, forced on CPU), every model alike (its own table, ratios only)",
    )
    parser.add_argument("--json", metavar="PATH", help="write all numbers and the environment to PATH")
    args = parser.parse_args(argv)

    quick = args.quick
    defaults = dict(
        models=["llama-d1024"] if quick else ["smollm2-135m", "llama-d1024"],
        steps=3 if quick else 10,
        warmup=1 if quick else 2,
        batch=2 if quick else 4,
        seq=64 if quick else 256,
        gen_rounds=2 if quick else 3,
        gen_prompt=16 if quick else 64,
        gen_tokens=8 if quick else 64,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.llama_layers is not None and args.llama_layers < 4:
        parser.error(f"--llama-layers must be >= 4 (MoLA 2-4-6-8 needs a layer per group), got {args.llama_layers}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    env = environment(device)
    wait_policy = env["omp_wait_policy"]
    print(
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, peft "
        f"{env['versions']['peft']}; {env['device']}; {env['threads']} threads, OMP_WAIT_POLICY={wait_policy}"
        + (
            ""
            if wait_policy or device.type == "cuda"
            else " (hint: set OMP_WAIT_POLICY=PASSIVE for steadier timings on few cores)"
        )
    )
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    report = {"environment": env, "args": vars(args), "models": {}}
    failures, problems = [], []
    for name in args.models:
        if name == "smollm2-135m":
            base, source = load_smollm2(dtype)
            if base is None:
                print(f"\n== smollm2-135m: skipped, the embedded model is not available here ({source}) ==")
                report["models"][name] = {"skipped": source}
                continue
        else:
            base, source = build_llama(name, args.llama_layers, dtype), "random-init Llama"
        model_report, model_failures = bench_model(name, base, source, args, dtype, device, problems)
        report["models"][name] = model_report
        failures += model_failures
        del base
        gc.collect()
    if not args.skip_4bit:
        report["4bit"] = bench_4bit(args, dtype, device, problems)

    load_after = os.getloadavg()[0]
    report["environment"]["load_average_1min"] = [load_before, load_after]
    if device.type == "cpu" and max(load_before, load_after) > 0.5 * os.cpu_count() + 1.5:
        # This process alone contributes about one unit; more means other work competes for the cores.
        print(
            f"\nWARNING: 1-min load average {load_before:.1f} before / {load_after:.1f} after on {os.cpu_count()} cores: "
            "other processes compete for the CPU, timings are noisy (see iqr%); rerun on an idle machine."
        )
    print(
        f"\ntargets: step time <= {TIME_VS_LORA_R8}x LoRA r=8 and <= {TIME_VS_LORA_R64}x LoRA r=64 (MOELORA E=8, MoLA, "
        f"MoLE), step memory <= {MEM_VS_LORA_R64}x LoRA r=64, contrastive <= {CONTRASTIVE_VS_OFF}x off, "
        f"generation >= {GENERATION_VS_LORA_R8}x LoRA r=8 tokens/s"
    )
    print("FAIL:\n  " + "\n  ".join(failures) if failures else "all targets PASS")
    if problems:
        print("PROBLEMS (the benchmark's own checks):\n  " + "\n  ".join(problems))
    report.update(failures=failures, problems=problems, total_s=time.perf_counter() - start)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
