"""Operator counts of one training step of MOELORA against peft LoRA (deterministic, unlike timings).

On small and medium models a training step of MOELORA is dominated by the number of operators it launches, not by
their size (each costs dispatcher, autograd and, on a GPU, kernel-launch overhead). Counts do not depend on the load of
the machine, so they can be compared across commits on a busy machine where timings cannot.

For each config a tiny random Llama (`--hidden`, `--layers`) is wrapped with `get_peft_model`
(`target_modules="all-linear"`) and one training step (forward with labels, backward; no optimizer step) runs under
`torch.profiler.profile` after one warm-up step. The batch has an attention mask (all ones), as a Trainer's has:
MOELORA excludes padding from its router losses and statistics. Printed per config:

- `aten ops`: every `aten::` event, nested ones included (e.g. `aten::linear` and the `aten::mm` it calls);
- `top-level`: `aten::` events without an `aten::` parent (what Python code and autograd nodes call directly);
- `matmuls`: `aten::mm`, `aten::addmm`, `aten::bmm` (the kernels; `aten::linear`/`aten::matmul` dispatch to them);
- `copies`: `aten::copy_` (what `aten::to`/`aten::_to_copy`/`aten::clone`/`aten::contiguous` end up calling);
- `saved KiB`: bytes saved for the backward pass by one forward without attention mask (`bench_train.saved_bytes`:
  unique storages, without parameters and buffers), since fewer operators can cost memory (e.g. routing not
  recomputed in the backward pass);
- `per layer`: (MOELORA - LoRA r=64) top-level ops divided by the number of adapted linear layers.

`--decode` counts one step of cached decoding instead (eval mode, no autograd: one new token of a batch of one with
the KV cache of the prompt, as `generate` runs it); `--router-sharing` adds MOELORA with `router_sharing=True`.

Usage:

    OMP_NUM_THREADS=1 python benchmarks/op_count.py
    OMP_NUM_THREADS=1 python benchmarks/op_count.py --contrastive --top 25   # + the most frequent MOELORA ops
    OMP_NUM_THREADS=1 python benchmarks/op_count.py --decode --router-sharing
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections import Counter

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import moe_peft_plugin  # noqa: F401  (registers MOELORA)
from moe_peft_plugin import MoeLoraConfig
from moe_peft_plugin.evaluation import kv_cache_argument


try:  # run as a script from this folder
    from bench_train import saved_bytes
except ImportError:  # imported as `benchmarks.op_count`
    from .bench_train import saved_bytes


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
COPIES = ("aten::copy_",)


def build_model(hidden: int, layers: int, peft_config) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(LlamaForCausalLM(config), peft_config).train()


def count_step(model: torch.nn.Module, inputs: dict) -> tuple[Counter, Counter]:
    """`(all aten events, top-level aten events)` by name, for one forward + backward."""

    def step() -> None:
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        model.zero_grad(set_to_none=True)

    return _count(step)


def count_decode(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[Counter, Counter]:
    """`(all aten events, top-level aten events)` by name, for one step of cached decoding of the first sample."""
    model.eval()
    prompt = input_ids[:1]
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    token = prompt[:, -1:]
    cache_name = kv_cache_argument(model)

    def step() -> None:
        # The same cache position every time: each call sees the prompt's cache and one new token, like `generate`.
        with torch.no_grad():
            model(input_ids=token, use_cache=True, **{cache_name: copy.deepcopy(cache)})

    return _count(step)


def _count(step) -> tuple[Counter, Counter]:
    step()  # warm-up: lazy initialisation (and the inference caches of MOELORA) are not part of a step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    every, top = Counter(), Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        every[event.name] += 1
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top[event.name] += 1
    return every, top


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--contrastive", action="store_true", help="also MOELORA with contrastive_loss_coef=0.01")
    parser.add_argument("--top", type=int, default=0, help="list the N most frequent top-level ops of MOELORA")
    parser.add_argument("--router-sharing", action="store_true", help="also MOELORA with router_sharing=True")
    parser.add_argument("--decode", action="store_true", help="count one step of cached decoding instead of training")
    args = parser.parse_args(argv)

    common = dict(task_type="CAUSAL_LM", target_modules="all-linear")
    moe = dict(r=8, lora_alpha=8, num_experts=8, top_k=2, aux_loss_coef=0.01)
    configs = {
        "LoRA r=8": LoraConfig(r=8, lora_alpha=8, **common),
        "LoRA r=64": LoraConfig(r=64, lora_alpha=64, **common),
        "MOELORA E=8 r=8 top-2": MoeLoraConfig(**moe, **common),
    }
    if args.contrastive:
        configs["MOELORA +contrastive"] = MoeLoraConfig(**moe, contrastive_loss_coef=0.01, **common)
    if args.router_sharing:
        configs["MOELORA shared routers"] = MoeLoraConfig(**moe, router_sharing=True, **common)

    torch.manual_seed(0)
    input_ids = torch.randint(0, 512, (args.batch, args.seq))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    rows, num_layers = {}, 0
    for name, config in configs.items():
        model = build_model(args.hidden, args.layers, config)
        if isinstance(config, MoeLoraConfig):
            num_layers = sum(1 for m in model.modules() if isinstance(m, moe_peft_plugin.layer.MoeLoraLayer))
        if args.decode:
            every, top = count_decode(model, input_ids)
            rows[name] = (every, top, 0)
        else:
            every, top = count_step(model, inputs)
            rows[name] = (every, top, saved_bytes(model, {"input_ids": input_ids, "labels": input_ids}))

    header = f"{'config':<24}{'aten ops':>10}{'top-level':>11}{'matmuls':>9}{'copies':>8}{'saved KiB':>11}"
    what = f"one decoding step after a prompt of {args.seq}" if args.decode else f"batch={args.batch}x{args.seq}"
    print(f"hidden={args.hidden} layers={args.layers} {what}, {num_layers} adapted linears")
    print(header)
    for name, (every, top, saved) in rows.items():
        matmuls = sum(every[n] for n in MATMULS)
        copies = sum(every[n] for n in COPIES)
        print(
            f"{name:<24}{sum(every.values()):>10}{sum(top.values()):>11}{matmuls:>9}{copies:>8}{saved / 1024:>11.0f}"
        )
    lora_every, lora_top, _ = rows["LoRA r=64"]
    for name, (every, top, _) in rows.items():
        if name.startswith("MOELORA"):
            print(
                f"{name} / LoRA r=64: aten ops {sum(every.values()) / sum(lora_every.values()):.2f}x, "
                f"top-level {sum(top.values()) / sum(lora_top.values()):.2f}x, "
                f"+{(sum(top.values()) - sum(lora_top.values())) / num_layers:.1f} top-level ops per layer"
            )
    if args.top:
        _, top, _ = rows["MOELORA E=8 r=8 top-2"]
        print("most frequent top-level ops of MOELORA E=8 r=8 top-2 (LoRA r=64 in brackets):")
        for op, count in top.most_common(args.top):
            print(f"  {op:<40}{count:>6} ({lora_top[op]})")


if __name__ == "__main__":
    main()
