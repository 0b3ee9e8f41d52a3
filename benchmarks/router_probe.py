"""Do MOELORA's routers learn on the multi-task mixture? A short probe of router entropy and task specialisation.

Trains SmolLM2-135M-Instruct (the embedded model, bf16) with MOELORA 8 x r8 top-2 on all linear layers on the 8
commonsense tasks interleaved (`moe_peft_cli.data.COMMONSENSE_TASKS`, completion-only loss, batch 8, AdamW 3e-4) in a
plain loop, and every `--probe_every` steps measures on 6 fixed questions per task:

- `entropy_over_lnE`: the mean router entropy of the last training batch over ln E (1.0 = uniform probabilities),
- `spec_mean` / `spec_max`: the task specialisation per layer (`moe_peft_plugin.TaskRoutingAccumulator`: mutual
  information between task and expert choice, normalised), mean and max over the 210 adapted layers, and `chance`,
  the same number with shuffled task labels,
- `underused`: experts (of 1,680) with less than a quarter of their fair share of the probe's routing decisions.

Variants: `default`; `lr10` (the routers train at 10x the learning rate, as LoRA+ does for B). One JSON line per
probe on stdout and `--output` (a JSON list). A scratch study for issue 10, not a benchmark with targets.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/router_probe.py default --steps 61 --output probe-default.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_peft_cli.data import COMMONSENSE_TASKS, ensure_default_model, load_benchmark
from moe_peft_plugin import MoeLoraConfig, TaskRoutingAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=["default", "lr10"])
    parser.add_argument("--steps", type=int, default=61)
    parser.add_argument("--probe_every", type=int, default=20)
    parser.add_argument("--output", default=None)
    options = parser.parse_args()

    torch.manual_seed(0)
    items = {task: load_benchmark(task) for task in COMMONSENSE_TASKS}
    for task in items:
        random.Random(0).shuffle(items[task])
    probe = {task: items[task][:6] for task in items}
    train = {task: items[task][6:] for task in items}
    tasks = list(items)

    path = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    config = MoeLoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        num_experts=8,
        top_k=2,
        aux_loss_coef=0.01,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    routers = [p for n, p in model.named_parameters() if p.requires_grad and "moelora_router" in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and "moelora_router" not in n]
    router_lr = 3e-4 * (10.0 if options.variant == "lr10" else 1.0)
    optimizer = torch.optim.AdamW(
        [{"params": others, "lr": 3e-4}, {"params": routers, "lr": router_lr}], weight_decay=0
    )

    def encode(batch):
        enc = tokenizer([it.prompt + it.choices[it.label] for it in batch], return_tensors="pt", padding=True,
                        truncation=True, max_length=256)  # fmt: skip
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for row, item in enumerate(batch):
            labels[row, : len(tokenizer(item.prompt)["input_ids"])] = -100
        return enc, labels

    def measure() -> dict:
        model.eval()
        model.base_model.record_sample_routing(True)
        accumulator = TaskRoutingAccumulator(keep_samples=True)
        with torch.no_grad():
            for task in tasks:
                enc, _ = encode(probe[task])
                model(**enc)
                accumulator.add(model.base_model.get_routing_stats(), [task] * len(probe[task]), enc["attention_mask"])
        results = accumulator.results()
        specialisation = torch.tensor([r.specialisation for r in results.values()])
        loads = torch.stack([torch.as_tensor(r.expert_load) for r in results.values()])
        chance = torch.tensor(list(accumulator.chance_specialisation(num_permutations=5).values()))
        model.train()
        model.base_model.record_sample_routing(False)
        return {
            "spec_mean": float(specialisation.nanmean()),
            "spec_max": float(specialisation.nan_to_num().max()),
            "chance": float(chance.nanmean()),
            "underused": int((loads < 0.25 / loads.shape[1]).sum()),
        }

    log, start = [], time.time()
    model.train()
    for step in range(options.steps):
        batch = [train[tasks[(step * 8 + i) % len(tasks)]][(step * 8 + i) // len(tasks)] for i in range(8)]
        enc, labels = encode(batch)
        outputs = model(**enc, labels=labels)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        stats = model.base_model.get_routing_stats()
        entropy = sum(float(s["default"].entropy) for s in stats.values()) / len(stats) / math.log(8)
        if step % options.probe_every == 0 or step == options.steps - 1:
            row = {"step": step, "loss": float(outputs.loss.detach()), "entropy_over_lnE": entropy, **measure(),
                   "seconds": round(time.time() - start, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            log.append(row)
    if options.output:
        with open(options.output, "w") as handle:
            json.dump(log, handle, indent=1)


if __name__ == "__main__":
    main()
