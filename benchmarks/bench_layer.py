"""Speed and saved activations of one MOELORA layer against peft LoRA, on CPU.

One `nn.Linear(d, d)` inside a tiny module is adapted with `get_peft_model` (LoRA and MOELORA alike) and a training
step (forward + backward) is timed through the *tuner* forward (`peft_model.base_model(x)`), which is where MOELORA's
router losses are collected: the plain `PeftModel.forward` (no `task_type`) calls the base model directly and skips
them. The tiny module returns a dict, so the tuner adds `aux_loss` to it, and the backward uses both the layer output
(with a fixed random output gradient, as from a downstream layer) and `aux_loss`, exactly like a training loss that
includes `outputs.aux_loss`.

Saved activations are the bytes of the unique storages that autograd keeps for the backward pass during one forward
(`torch.autograd.graph.saved_tensors_hooks`), without the layer input `x` (kept alive by the previous layer anyway;
shown separately) and the parameters.

Before benchmarking, the fast path is checked in float64 against a plain per-expert loop (output, aux loss and the
gradients of A, B, router and temperature).

Usage (2 CPU cores; PASSIVE stops idle OpenMP threads from spinning between the many small ops of a step):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_layer.py             # ~2-3 min
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_layer.py --quick     # ~30 s
    python benchmarks/bench_layer.py --dtype bfloat16 --profile          # + torch.profiler top ops of MOELORA E=8
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import moe_peft_plugin  # noqa: F401  (registers MOELORA)
from moe_peft_plugin import MoeLoraConfig


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from tests.reference import reference_contrastive  # noqa: E402  (the plain loop the unit tests check against)


# Targets of the performance issue (issue 9) for the step time. Its memory target is the whole training step's
# (`bench_train.py`): a layer may keep a few bytes per token (the router logits) where that buys time, so the saved
# activations here are reported, not judged.
TIME_VS_LORA_R8 = 1.15
TIME_VS_LORA_R64 = 1.05
CONTRASTIVE_VS_OFF = 1.15


class OneLinear(nn.Module):
    """The smallest model with one adaptable linear; returns a dict so that the MOELORA tuner can add `aux_loss`."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.lin(x)}


@dataclass
class Case:
    name: str
    kind: str  # "lora" or "moe"
    kwargs: dict
    rank_total: int  # E*r (LoRA: r)
    same_as: Optional[str] = None  # reuse the measurement of another (identical) case
    targets: tuple = ()  # which targets apply: "time", "contrastive"


CASES = [
    Case("LoRA r=8", "lora", dict(r=8), 8),
    Case("LoRA r=64", "lora", dict(r=64), 64),
    Case("MOELORA E=8 r=8 top-2", "moe", dict(r=8, num_experts=8, top_k=2), 64, targets=("time",)),
    Case(
        "MOELORA E=8 +contrastive",
        "moe",
        dict(r=8, num_experts=8, top_k=2, contrastive_loss_coef=0.01),
        64,
        targets=("contrastive",),
    ),
    Case("MoLA layer E=2 top-2 r=8", "moe", dict(r=8, num_experts=2, top_k=2), 16, targets=("time",)),
    Case("MoLA layer E=4 top-2 r=8", "moe", dict(r=8, num_experts=4, top_k=2), 32, targets=("time",)),
    Case(
        "MoLA layer E=8 top-2 r=8",
        "moe",
        dict(r=8, num_experts=8, top_k=2),
        64,
        same_as="MOELORA E=8 r=8 top-2",
        targets=("time",),
    ),
    Case(
        "MoLE soft E=3 r=8 frozen",
        "moe",
        # MoLE: dense softmax gating over frozen experts, learned temperature, gating-balance loss instead of the
        # Switch load-balancing loss.
        dict(
            r=8,
            num_experts=3,
            router_type="soft",
            freeze_experts=True,
            learn_router_temperature=True,
            aux_loss_coef=0.0,
            gate_balance_loss_coef=0.01,
        ),
        24,
        targets=("time",),
    ),
]


def build(case: Case, d: int, dtype: torch.dtype, weight: nn.Parameter, bias: nn.Parameter) -> nn.Module:
    """The tuner (`LoraModel` / `MoeLoraModel`) around `OneLinear(d)` sharing the frozen base `weight` and `bias`."""
    model = OneLinear(d).to(dtype)
    model.lin.weight, model.lin.bias = weight, bias
    if case.kind == "lora":
        # init_lora_weights=False: random B, so that nothing is trivially zero (same for MOELORA below).
        config = LoraConfig(
            lora_alpha=case.kwargs["r"], target_modules=["lin"], init_lora_weights=False, **case.kwargs
        )
    else:
        config = MoeLoraConfig(lora_alpha=case.kwargs["r"], target_modules=["lin"], init_weights=False, **case.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    tuner = peft_model.base_model
    tuner.train()
    return tuner


def trainable(tuner: nn.Module) -> list[nn.Parameter]:
    return [p for p in tuner.parameters() if p.requires_grad]


def train_step(tuner: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> dict:
    """Forward through the tuner and backward of `<y, grad_y> + aux_loss`; returns the outputs."""
    out = tuner(x)
    roots, grads = [out["logits"]], [grad_y]
    if out.get("aux_loss") is not None and out["aux_loss"].requires_grad:
        roots.append(out["aux_loss"])
        grads.append(torch.ones_like(out["aux_loss"]))
    torch.autograd.backward(roots, grads)
    return out


def zero_grads(tuner: nn.Module, x: torch.Tensor) -> None:
    for p in tuner.parameters():
        p.grad = None
    x.grad = None


# ---------------------------------------------------------------------------------------------------------------------
# Correctness: fast path vs a plain per-expert loop, float64.
# ---------------------------------------------------------------------------------------------------------------------


def reference_loss(layer, x: torch.Tensor, options) -> tuple[torch.Tensor, torch.Tensor]:
    """`(y, aux_loss)` computed the plain way (per-expert loop) from the parameters of a MOELORA `layer`."""
    A, B = layer.moelora_A["default"], layer.moelora_B["default"]  # (E, r, in), (E, out, r)
    router = layer.moelora_router["default"]  # (E, in)
    num_experts, top_k, scaling = A.shape[0], layer.top_k["default"], layer.scaling["default"]
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ router.T
    if "default" in layer.moelora_log_temperature:
        logits = logits / layer.moelora_log_temperature["default"].exp()
    else:
        logits = logits / options.router_temperature
    probs = logits.softmax(-1)
    if options.router_type == "soft" or top_k >= num_experts:
        gates = probs
        top = probs.argmax(-1, keepdim=True) if options.router_type == "soft" else None
    else:
        top = logits.topk(top_k, dim=-1).indices
        weights = probs.gather(-1, top)
        weights = weights / weights.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top, weights)
    if top is None:
        selected = torch.ones_like(probs, dtype=torch.bool)
    else:
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top, True)

    update = torch.zeros(tokens.shape[0], B.shape[1], dtype=x.dtype)
    for e in range(num_experts):  # plain per-expert loop
        update = update + gates[:, e : e + 1] * scaling * (tokens @ A[e].T @ B[e].T)
    y = layer.base_layer(tokens) + update

    aux = torch.zeros((), dtype=x.dtype)
    if options.aux_loss_coef:
        load = selected.double().mean(0)
        load = load / load.sum()
        aux = aux + options.aux_loss_coef * num_experts * (load * probs.mean(0)).sum()
    if options.gate_balance_loss_coef:
        aux = aux - options.gate_balance_loss_coef * torch.log(gates.mean(0)).sum()
    if options.contrastive_loss_coef:
        contrastive = reference_contrastive(tokens, A, B, selected, options.contrastive_temperature)
        aux = aux + options.contrastive_loss_coef * contrastive
    y = y.reshape(*x.shape[:-1], -1)
    return y, aux


def check_correctness() -> None:
    torch.manual_seed(0)
    d_in = 48
    checks = [
        ("E=8 top-2 +aux +contrastive", dict(r=4, num_experts=8, top_k=2, contrastive_loss_coef=0.05)),
        ("E=2 top-2 (dense)", dict(r=4, num_experts=2, top_k=2)),
        (
            "MoLE soft E=3 frozen",
            dict(
                r=4,
                num_experts=3,
                router_type="soft",
                freeze_experts=True,
                learn_router_temperature=True,
                aux_loss_coef=0.0,
                gate_balance_loss_coef=0.05,
            ),
        ),
    ]
    for label, kwargs in checks:
        weight = nn.Parameter(torch.randn(d_in, d_in, dtype=torch.float64) / d_in**0.5, requires_grad=False)
        bias = nn.Parameter(torch.randn(d_in, dtype=torch.float64), requires_grad=False)
        tuner = build(Case(label, "moe", kwargs, 0), d_in, torch.float64, weight, bias)
        layer = tuner.model.lin
        with torch.no_grad():  # larger router weights, so that routing is far from uniform
            layer.moelora_router["default"].normal_(std=0.5)
        params = dict(tuner.named_parameters())
        assert all(p.dtype == torch.float64 for p in params.values()), "adapter not in float64"
        x = torch.randn(2, 40, d_in, dtype=torch.float64, requires_grad=True)
        grad_y = torch.randn(2, 40, d_in, dtype=torch.float64)

        out = train_step(tuner, x, grad_y)
        fast_grads = {n: p.grad for n, p in params.items() if p.requires_grad}
        fast_x_grad = x.grad

        y_ref, aux_ref = reference_loss(layer, x, layer.routing_options["default"])
        loss_ref = (y_ref * grad_y).sum() + aux_ref
        names = list(fast_grads)
        ref_grads = torch.autograd.grad(loss_ref, [params[n] for n in names] + [x])

        def close(a, b):
            # Float64 everywhere would allow ~1e-12, but some router quantities are float32 by design (the
            # `aux_loss` value, a learned temperature `log_temperature.float().exp()`); any real bug is >= 1e-3.
            return torch.allclose(a, b, rtol=1e-6, atol=1e-8 * float(b.detach().abs().max()))

        problems = []
        if not close(out["logits"], y_ref):
            problems.append(f"output max err {(out['logits'] - y_ref).abs().max():.3g}")
        if not close(out["aux_loss"].to(torch.float64), aux_ref):
            problems.append(f"aux_loss {out['aux_loss'].item():.10g} vs {aux_ref.item():.10g}")
        for n, g in zip(names, ref_grads):
            if fast_grads[n] is None or not close(fast_grads[n], g):
                err = "missing" if fast_grads[n] is None else f"max err {(fast_grads[n] - g).abs().max():.3g}"
                problems.append(f"grad {n.split('.')[-2]}: {err}")
        if not close(fast_x_grad, ref_grads[-1]):
            problems.append(f"grad x: max err {(fast_x_grad - ref_grads[-1]).abs().max():.3g}")
        if kwargs.get("freeze_experts"):
            frozen = [n for n, p in params.items() if ("moelora_A" in n or "moelora_B" in n) and p.requires_grad]
            if frozen:
                problems.append(f"experts not frozen: {frozen}")
        if problems:
            raise AssertionError(f"MOELORA fast path != reference ({label}): " + "; ".join(problems))
        print(f"  ok  {label}: output, aux_loss, grads of {', '.join(n.split('.')[-2] for n in names)}, x")


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Saved:
    other: int = 0  # bytes saved for backward, without x and parameters
    input: int = 0  # bytes of x's storage if x itself is saved
    params: int = 0
    items: list = field(default_factory=list)  # (bytes, shape, dtype) of the "other" storages


def measure_saved(tuner: nn.Module, x: torch.Tensor) -> Saved:
    x_ptr = x.untyped_storage().data_ptr()
    param_ptrs = {p.untyped_storage().data_ptr() for p in tuner.parameters()}
    seen: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes() > 0:
            seen[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tuner(x)
    saved = Saved()
    for ptr, (nbytes, shape, dtype) in seen.items():
        if ptr == x_ptr:
            saved.input += nbytes
        elif ptr in param_ptrs:
            saved.params += nbytes
        else:
            saved.other += nbytes
            saved.items.append((nbytes, shape, dtype))
    saved.items.sort(key=lambda item: -item[0])
    del out
    return saved


def time_cases(tuners: dict, x: torch.Tensor, grad_y: torch.Tensor, warmup: int, reps: int) -> dict:
    """Median fwd+bwd seconds per case; cases are interleaved so that machine drift hits all of them alike."""
    for tuner in tuners.values():
        for _ in range(warmup):
            zero_grads(tuner, x)
            train_step(tuner, x, grad_y)
    samples = {name: [] for name in tuners}
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for name, tuner in tuners.items():
                zero_grads(tuner, x)
                start = time.perf_counter()
                train_step(tuner, x, grad_y)
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return samples


def profile_case(tuner: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, label: str, rows: int = 18) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        zero_grads(tuner, x)
        train_step(tuner, x, grad_y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            zero_grads(tuner, x)
            train_step(tuner, x, grad_y)
    print(f"\n  torch.profiler, {label}, 3 steps, by self CPU time:")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44)
    print("\n".join("    " + line for line in table.splitlines()))


def fmt_ratio(value: float, limit: Optional[float]) -> str:
    if limit is None:
        return f"{value:5.2f}x     "
    return f"{value:5.2f}x {'PASS' if value <= limit else 'FAIL'}"


def bench(d: int, tokens: int, dtype: torch.dtype, warmup: int, reps: int, args) -> list[str]:
    torch.manual_seed(0)
    weight = nn.Parameter((torch.randn(d, d) / d**0.5).to(dtype), requires_grad=False)
    bias = nn.Parameter(torch.zeros(d, dtype=dtype), requires_grad=False)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)  # a middle layer: the input needs a gradient
    grad_y = torch.randn(tokens, d, dtype=dtype)

    measured = [c for c in CASES if c.same_as is None]
    tuners = {c.name: build(c, d, dtype, weight, bias) for c in measured}
    adapter_dtypes = {p.dtype for t in tuners.values() for p in trainable(t)}
    saved = {name: measure_saved(t, x) for name, t in tuners.items()}
    samples = time_cases(tuners, x, grad_y, warmup, reps)
    for case in CASES:
        if case.same_as is not None:
            samples[case.name], saved[case.name] = samples[case.same_as], saved[case.same_as]
    med = {name: statistics.median(s) for name, s in samples.items()}

    def ratio(name: str, ref: str) -> float:
        # Median of the per-round ratios: the cases of one round run back to back, so slow drift of a shared machine
        # cancels, and the median discards rounds hit by a burst of load.
        return statistics.median(a / b for a, b in zip(samples[name], samples[ref]))

    r8, r64 = "LoRA r=8", "LoRA r=64"
    base_case = "MOELORA E=8 r=8 top-2"
    print(
        f"\n== d={d}  T={tokens}  dtype={str(dtype).split('.')[-1]} (adapter params: "
        f"{', '.join(sorted(str(t).split('.')[-1] for t in adapter_dtypes))})  "
        f"threads={torch.get_num_threads()}  median of {reps} (after {warmup} warmup) =="
    )
    header = (
        f"{'config':27s} {'E*r':>4s} {'fwd+bwd ms':>10s} {'iqr%':>5s} {'vs LoRA r8':>12s} {'vs LoRA r64':>12s} "
        f"{'saved KiB':>10s} {'B/tok':>6s} {'act vs r64':>12s} {'+x vs r64':>9s} {'contrast/off':>13s}"
    )
    print(header)
    print("-" * len(header))
    failures = []
    for case in CASES:
        s = sorted(samples[case.name])
        q1, q3 = s[len(s) // 4], s[(3 * len(s)) // 4]
        iqr = 100 * (q3 - q1) / med[case.name]
        act = saved[case.name]
        t8, t64 = ratio(case.name, r8), ratio(case.name, r64)
        a64 = act.other / saved[r64].other
        # With the input counted (it is saved by every config here, and alive anyway as the previous layer's output).
        ax64 = (act.other + act.input) / (saved[r64].other + saved[r64].input)
        time_on, con_on = "time" in case.targets, "contrastive" in case.targets
        cells = [
            fmt_ratio(t8, TIME_VS_LORA_R8 if time_on else None),
            fmt_ratio(t64, TIME_VS_LORA_R64 if time_on else None),
        ]
        con = ""
        if con_on:
            tc = ratio(case.name, base_case)
            con = fmt_ratio(tc, CONTRASTIVE_VS_OFF)
            if tc > CONTRASTIVE_VS_OFF:
                failures.append(f"d={d} {case.name}: contrastive/off {tc:.2f}x > {CONTRASTIVE_VS_OFF}")
        if time_on and t8 > TIME_VS_LORA_R8:
            failures.append(f"d={d} {case.name}: time {t8:.2f}x LoRA r=8 > {TIME_VS_LORA_R8}")
        if time_on and t64 > TIME_VS_LORA_R64:
            failures.append(f"d={d} {case.name}: time {t64:.2f}x LoRA r=64 > {TIME_VS_LORA_R64}")
        print(
            f"{case.name:27s} {case.rank_total:4d} {1e3 * med[case.name]:10.1f} {iqr:5.1f} {cells[0]:>12s} "
            f"{cells[1]:>12s} {act.other / 1024:10.1f} {act.other / tokens:6.0f} "
            f"{fmt_ratio(a64, None):>12s} {ax64:8.2f}x {con:>13s}"
        )
    x_bytes = x.numel() * x.element_size()
    savers = [case.name for case in CASES if saved[case.name].input]
    if len(savers) == len(CASES):
        x_savers = "all configs"
    elif savers:
        x_savers = ", ".join(savers)
    else:
        x_savers = f"none: the {adapter_dtypes.pop()} adapters save an upcast copy of x, counted"
    print(
        f"(saved KiB, B/tok: unique storages saved for backward in one forward, without parameters and without x "
        f"({x_bytes / 1024:.0f} KiB, saved by {x_savers}); '+x vs r64': ratio with x counted;\n ratios: median "
        f"of per-round ratios (configs interleaved); iqr%: interquartile range / median of the step time)"
    )
    if args.verbose:
        for name in (r64, base_case, "MOELORA E=8 +contrastive"):
            items = ", ".join(f"{tuple(s)} {str(t).split('.')[-1]} {n / 1024:.0f}K" for n, s, t in saved[name].items)
            print(f"  saved by {name}: {items}")
    if args.profile:
        profile_case(tuners[base_case], x, grad_y, f"{base_case}, d={d}")
        profile_case(tuners[r64], x, grad_y, f"{r64}, d={d}", rows=10)
    del tuners
    gc.collect()
    return failures


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--quick", action="store_true", help="small token counts and few reps (~30 s)")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per dim (default 2048 / 1024; quick 512 / 256)")
    parser.add_argument("--reps", type=int, help="timed steps per config (default 15; quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps per config (default 3; quick 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--skip-check", action="store_true", help="skip the float64 correctness check")
    parser.add_argument(
        "--profile", action="store_true", help="print torch.profiler top ops of MOELORA E=8, LoRA r=64"
    )
    parser.add_argument("--verbose", action="store_true", help="list the saved tensors of the main configs")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    default_tokens = {1024: 512, 4096: 256} if args.quick else {1024: 2048, 4096: 1024}
    if args.tokens is not None and len(args.tokens) != len(args.dims):
        parser.error("--tokens needs one value per --dims entry")
    tokens = args.tokens or [default_tokens.get(d, max(256, 2**21 // d)) for d in args.dims]
    reps = args.reps or (5 if args.quick else 15)
    warmup = args.warmup or (2 if args.quick else 3)

    wait_policy = os.environ.get("OMP_WAIT_POLICY")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={wait_policy}"
        + ("" if wait_policy else " (hint: set OMP_WAIT_POLICY=PASSIVE for steadier timings on few cores)")
    )
    start = time.perf_counter()
    if not args.skip_check:
        print("correctness (float64, fast path vs per-expert loop):")
        check_correctness()
    failures = []
    load_before = os.getloadavg()[0]
    for d, t in zip(args.dims, tokens):
        failures += bench(d, t, dtype, warmup, reps, args)
    load_after = os.getloadavg()[0]
    if max(load_before, load_after) > 0.5 * os.cpu_count() + 1.5:
        # This process alone contributes about one unit; more means other work competes for the cores.
        print(
            f"\nWARNING: 1-min load average {load_before:.1f} before / {load_after:.1f} after on {os.cpu_count()} cores: "
            "other processes compete for the CPU, timings are noisy (see iqr%); rerun on an idle machine."
        )
    print(
        f"\ntargets: time <= {TIME_VS_LORA_R8}x LoRA r=8 and <= {TIME_VS_LORA_R64}x LoRA r=64, contrastive <= "
        f"{CONTRASTIVE_VS_OFF}x off (memory: the whole step's, in bench_train.py)"
    )
    print("FAIL:\n  " + "\n  ".join(failures) if failures else "all targets PASS")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
