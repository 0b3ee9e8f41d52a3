"""Evaluation of a multi-task run (`moe-peft train`'s default): accuracy per task and the routing by task.

A multi-task run trains one adapter on several embedded benchmarks at once (`data.prepare_mixture`). Its report is:

- per task, base vs fine-tuned accuracy on the task's held-out questions (95% Wilson intervals), the paired
  difference (bootstrap) and the macro average (every task weighs the same);
- for a MOELORA adapter, which experts each task uses: the routing of the fine-tuned model is collected while it
  scores the held-out questions (no extra forward), per task, and summarised per layer as the task specialisation
  (`moe_peft_plugin.TaskRouting.specialisation`: 0 every task routes alike, 1 the task fixes the experts) against its
  chance level (the same number with the task labels shuffled).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Optional

from .data import BENCHMARKS, load_mc_file, log, prepare_mixture


if TYPE_CHECKING:
    from moe_peft_plugin import TaskRouting
    from moe_peft_plugin.evaluation import MCItem


SPECIALISATION_FILE = "specialisation.json"
SPECIALISATION_FIGURE = "routing_by_task.png"
EXPERT_LOAD_FIGURE = "expert_load.png"


def mixture_tasks(info: Mapping) -> Optional[list[str]]:
    """The tasks of a multi-task run from its record (`moe_peft_run.json`), or `None` for a single-task run."""
    recorded = info.get("eval") or info.get("train_data") or {}
    return list(recorded["tasks"]) if recorded.get("mixture") else None


def mixture_seed(info: Mapping) -> int:
    """The seed of the train / validation / held-out split of a multi-task run (`moe-peft train --split_seed`)."""
    return int((info.get("train_data") or {}).get("seed", 0))


def mixture_items(
    tasks: Sequence[str], per_task: Optional[int], split: str = "eval", seed: int = 0
) -> dict[str, list[MCItem]]:
    """The first `per_task` questions (all with `None`) of each task's `split` of the mixture split with `seed`."""
    mixture = prepare_mixture(tasks, seed=seed)
    return {task: load_mc_file(str(mixture.mc_file(task, split)))[:per_task] for task in tasks}


def score_tasks(model, tokenizer, items: Mapping[str, Sequence[MCItem]], options, name: str) -> dict:
    """`{task: Accuracy}` of `model` on the questions of each task."""
    from moe_peft_plugin.evaluation import accuracy, score_items

    results = {}
    for task, task_items in items.items():
        scores = score_items(model, tokenizer, task_items, options.batch_size, description=f"{name}: {task}")
        results[task] = accuracy(name, scores, options.metric)
    return results


def routing_texts(items: Mapping[str, Sequence[MCItem]]) -> dict[str, list[str]]:
    """The texts whose routing shows which experts each task uses: every question with its correct answer."""
    return {task: [item.answered for item in task_items] for task, task_items in items.items()}


def eval_mixture(options, info: Mapping, tasks: Sequence[str]) -> int:
    """`moe-peft eval` of a multi-task run: the per-task table, `eval_results.json` and the routing by task."""
    from moe_peft_plugin import MoeLoraModel
    from moe_peft_plugin.evaluation import (
        chance_level,
        collect_task_routing,
        format_task_table,
        macro_bootstrap,
        paired_bootstrap,
    )

    from .models import base_model_of, load_adapter, load_base

    recorded = info.get("eval") or {}
    per_task = options.eval_size or recorded.get("eval_size")
    items = mixture_items(tasks, per_task, seed=mixture_seed(info))
    if options.limit:
        items = {task: task_items[: options.limit] for task, task_items in items.items()}
    base_name = options.base_model or (base_model_of(options.adapter) if options.adapter else None)
    model, tokenizer = load_base(base_name, options.dtype, options.device)
    base = tuned = routing = None
    if not options.no_base or not options.adapter:
        base = score_tasks(model, tokenizer, items, options, "base model")
    if options.adapter:
        model = load_adapter(model, options.adapter)
        tuned = score_tasks(model, tokenizer, items, options, "fine-tuned")
        if isinstance(model.base_model, MoeLoraModel):
            log("routing the held-out questions (with their correct answers) by task")
            routing = collect_task_routing(model, tokenizer, routing_texts(items), options.batch_size)
    total = sum(len(task_items) for task_items in items.values())
    title = (
        f"{len(tasks)} tasks, {total} held-out questions never seen in training, log-likelihood scoring "
        f"({options.metric})"
    )
    chance = {task: chance_level(task_items) for task, task_items in items.items()}
    if base is not None:
        table = format_task_table(base, tuned, title, chance)
    else:
        table = format_task_table(tuned, None, title, chance, label="fine-tuned")
    print(table, flush=True)
    payload: dict = {"source": "mixture", "tasks": list(tasks), "num_questions": total, "metric": options.metric}
    payload["per_task"] = {
        task: {
            "n": len(items[task]),
            "chance": chance[task],
            **({"base": base[task].to_dict()} if base is not None else {}),
            **({"fine_tuned": tuned[task].to_dict()} if tuned is not None else {}),
        }
        for task in tasks
    }
    for key, results in (("base", base), ("fine_tuned", tuned)):
        if results is not None:
            mean, low, high = macro_bootstrap({task: r.correct for task, r in results.items()})
            payload.setdefault("macro_average", {})[key] = {"accuracy": mean, "ci95": [low, high]}
    if base is not None and tuned is not None:
        for task in tasks:
            mean, low, high = paired_bootstrap(base[task].correct, tuned[task].correct)
            payload["per_task"][task]["difference"] = {"mean": mean, "ci95": [low, high]}
        mean, low, high = macro_bootstrap(
            {t: r.correct for t, r in base.items()}, {t: r.correct for t, r in tuned.items()}
        )
        payload["macro_average"]["difference"] = {"mean": mean, "ci95": [low, high],
                                                  "method": "paired bootstrap within tasks, 10000 resamples"}  # fmt: skip
    payload["table"] = table
    output = options.output or (os.path.join(options.adapter, "eval_results.json") if options.adapter else None)
    if routing is not None and routing.num_samples:
        payload["specialisation"] = report_routing(routing, options.adapter)
    if output:
        with open(output, "w") as handle:
            json.dump(payload, handle, indent=1)
        log(f"results written to {output}")
    return 0


def report_routing(routing, adapter_dir: str, top: int = 5) -> dict:
    """Print the task specialisation per layer (summary and the most specialised layers), save it as JSON and draw
    the routing figures into `adapter_dir`; return the summary."""
    import numpy as np

    results: dict[str, TaskRouting] = routing.results()
    chance = routing.chance_specialisation(num_permutations=5)
    values = {name: r.specialisation for name, r in results.items() if np.isfinite(r.specialisation)}
    chance_mean = float(np.nanmean([chance[name] for name in values]))
    summary = {
        "mean": float(np.mean(list(values.values()))),
        "max": float(max(values.values())),
        "chance_mean": chance_mean,
        "layers_above_twice_chance": int(sum(v > 2 * chance[name] for name, v in values.items())),
        "num_layers": len(values),
        "definition": "I(task; expert) / min(H(task), log(E/k)) per adapted layer, on the held-out questions; chance: "
        "the same with the task labels shuffled (5 permutations)",
    }
    ranked = sorted(values, key=values.get, reverse=True)
    lines = [
        f"Do the experts specialise by task? Specialisation per layer (0: all tasks route alike, 1: the task fixes the "
        f"experts), over {routing.num_samples} held-out questions with their correct answers: mean {summary['mean']:.3f}, max {summary['max']:.3f}; "
        f"chance level {chance_mean:.3f}; {summary['layers_above_twice_chance']} of {len(values)} layers above twice "
        "their chance level. Most specialised layers:",
    ]
    for name in ranked[:top]:
        result = results[name]
        favourite = {task: int(np.nanargmax(result.load[i])) for i, task in enumerate(result.tasks)}
        shown = ", ".join(f"{task}->{expert}" for task, expert in favourite.items())
        lines.append(f"  {name}: {values[name]:.3f} (chance {chance[name]:.3f}); busiest expert per task: {shown}")
    print("\n".join(lines), flush=True)
    per_layer = {
        name: {
            "specialisation": r.specialisation,
            "chance": chance.get(name),
            "load": np.asarray(r.load).tolist(),
            "tasks": list(r.tasks),
        }
        for name, r in results.items()
    }
    with open(os.path.join(adapter_dir, SPECIALISATION_FILE), "w") as handle:
        json.dump({"summary": summary, "per_layer": per_layer}, handle, indent=1)
    try:
        from trainer_callbacks.plots import save_expert_load_summary, save_specialisation_report
    except ImportError:  # matplotlib missing: the numbers are printed and saved, the figures are skipped
        return summary
    title = os.path.basename(os.path.normpath(adapter_dir))
    figure = save_specialisation_report(results, os.path.join(adapter_dir, SPECIALISATION_FIGURE),
                                        title=f"Routing by task on held-out questions: {title}", chance=chance,
                                        spread=True)  # fmt: skip
    loads = {name: np.asarray(r.load).T @ np.asarray(r.task_share) for name, r in results.items()}
    load_figure = save_expert_load_summary(loads, os.path.join(adapter_dir, EXPERT_LOAD_FIGURE),
                                           title=f"Expert load on held-out questions (all tasks): {title}")  # fmt: skip
    print(f"routing by task: {os.path.abspath(figure)}\nexpert load:     {os.path.abspath(load_figure)}", flush=True)
    return summary


def task_titles(tasks: Sequence[str]) -> str:
    """The display names of the benchmarks, e.g. `ARC-Easy, BoolQ`."""
    return ", ".join(BENCHMARKS[task].title for task in tasks)
