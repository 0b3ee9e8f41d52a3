"""Multiple-choice scoring speed: prompts shared through the KV cache vs every option as one whole sequence.

`moe_peft_plugin.evaluation.score_items` scores a question whose prompt is most of its text by running the prompt once
and every option from the prompt's KV cache; other questions (and every question when the routing is collected,
`after_forward`) run each option as prompt + option. This script times both on the embedded model (SmolLM2-135M-Instruct,
bf16) on the first `--questions` validation questions of each commonsense task, in one process, and counts the
questions whose predicted answer differs between the two (bf16 rounding flips near ties; in float64 the two agree to
1e-10, `tests/test_cli.py::test_scoring_from_the_prompt_cache_equals_scoring_whole_sequences`).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_scoring.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moe_peft_cli.data import COMMONSENSE_TASKS, load_mc_file, prepare_mixture
from moe_peft_cli.models import load_base
from moe_peft_plugin import evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=32, help="validation questions per task (default 32)")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    model, tokenizer = load_base(None, "bfloat16")
    totals = {"whole": 0.0, "shared": 0.0}
    print(f"{'task':12s} {'whole s':>8s} {'shared s':>9s} {'speed-up':>9s} {'prompt tok':>11s} {'options':>8s} "
          f"{'option tok':>11s} {'differ':>7s}")  # fmt: skip
    for task in COMMONSENSE_TASKS:
        items = load_mc_file(str(prepare_mixture().mc_file(task, "validation")))[: args.questions]
        seconds, predictions = {}, {}
        for path, kwargs in (("whole", {"after_forward": lambda mask: None}), ("shared", {})):
            started = time.perf_counter()
            scores = evaluation.score_items(model, tokenizer, items, args.batch_size, progress=False, **kwargs)
            seconds[path] = time.perf_counter() - started
            predictions[path] = scores.predictions()
            totals[path] += seconds[path]
        encoded = evaluation._encode(tokenizer, items)
        print(
            f"{task:12s} {seconds['whole']:8.1f} {seconds['shared']:9.1f} {seconds['whole'] / seconds['shared']:8.2f}x "
            f"{np.mean([len(c) for c, _ in encoded]):11.0f} {np.mean([len(o) for _, o in encoded]):8.1f} "
            f"{np.mean([len(x) for _, o in encoded for x in o]):11.0f} "
            f"{int((predictions['whole'] != predictions['shared']).sum()):4d}/{len(items)}",
            flush=True,
        )
    print(f"all tasks: whole {totals['whole']:.1f} s, shared {totals['shared']:.1f} s "
          f"({totals['whole'] / totals['shared']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
