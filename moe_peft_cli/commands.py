"""The `moe-peft eval`, `inspect` and `export` subcommands (argument handling around evaluate/inspect/export)."""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Optional

from .data import BENCHMARKS, DEFAULT_BENCHMARK, interleave, load_mc_file, log, prepare_benchmark
from .errors import UserError
from .models import adapter_config, base_model_of, check_device, load_adapter, load_base, run_info
from .multitask import eval_mixture, mixture_items, mixture_seed, mixture_tasks, task_titles


if TYPE_CHECKING:
    from moe_peft_plugin.evaluation import MCItem


def _held_out_items(options, info: dict, split: str = "eval") -> tuple[list[MCItem], str]:
    """Questions from --data, --benchmark, the adapter's training run, or the default benchmark (held-out part)."""
    if getattr(options, "data", None):
        return load_mc_file(options.data), options.data
    tasks = mixture_tasks(info)
    if tasks and (not options.benchmark or options.benchmark in tasks):
        # A multi-task run: its own split, so that no training question is ever used as held-out text.
        chosen = [options.benchmark] if options.benchmark else tasks
        by_task = mixture_items(chosen, options.eval_size, split, seed=mixture_seed(info))
        name = "held-out" if split == "eval" else "training"
        return [item for _, item in interleave(by_task)], f"{task_titles(chosen)}, {name} questions of the mixture"
    recorded = info.get("eval") or {}
    train_data = info.get("train_data") or {}
    benchmark = options.benchmark or recorded.get("benchmark") or train_data.get("benchmark") or DEFAULT_BENCHMARK
    same_run = benchmark == recorded.get("benchmark")
    eval_size = options.eval_size or (recorded.get("eval_size") if same_run else None) or 200
    seed = options.split_seed if options.split_seed is not None else (recorded.get("split_seed", 0) if same_run else 0)
    prepared = prepare_benchmark(benchmark, eval_size, seed)
    path = prepared.mc_eval if split == "eval" else prepared.mc_train
    title = f"{BENCHMARKS[benchmark].title}, {'held-out' if split == 'eval' else 'training'} questions"
    return load_mc_file(str(path)), title


# ---------------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------------


def eval_command(options) -> int:
    from moe_peft_plugin.evaluation import accuracy, chance_level, format_table, score_items

    check_device(options.device)
    info = run_info(options.adapter)
    if options.adapter:
        adapter_config(options.adapter)  # fail early on a wrong folder
    tasks = mixture_tasks(info)
    if tasks and not options.data and not options.benchmark:
        return eval_mixture(options, info, tasks)
    items, source = _held_out_items(options, info)
    if options.limit:
        items = items[: options.limit]
    base_name = options.base_model or (base_model_of(options.adapter) if options.adapter else None)
    model, tokenizer = load_base(base_name, options.dtype, options.device)
    results = []
    if not options.no_base or not options.adapter:
        scores = score_items(model, tokenizer, items, options.batch_size, description="base model")
        results.append(accuracy("base", scores, options.metric))
    if options.adapter:
        model = load_adapter(model, options.adapter)
        scores = score_items(model, tokenizer, items, options.batch_size, description="fine-tuned")
        results.append(accuracy("fine-tuned", scores, options.metric))
    title = f"{source}: {len(items)} questions, log-likelihood scoring ({options.metric})"
    if info.get("eval"):
        title += "; never seen in training"
    baseline = results[0] if len(results) == 2 else None
    table = format_table(results, title, chance=chance_level(items), baseline=baseline)
    print(table, flush=True)
    output = options.output or (os.path.join(options.adapter, "eval_results.json") if options.adapter else None)
    if output:
        from moe_peft_plugin.evaluation import paired_bootstrap

        payload = {"source": source, "num_questions": len(items), "results": [r.to_dict() for r in results]}
        if baseline is not None:
            mean, low, high = paired_bootstrap(results[0].correct, results[1].correct)
            payload["difference"] = {"mean": mean, "ci95": [low, high], "method": "paired bootstrap, 10000 resamples"}
        payload["table"] = table
        with open(output, "w") as handle:
            json.dump(payload, handle, indent=1)
        log(f"results written to {output}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------------------


def _texts(options, info: dict, split: str, limit: int) -> list[str]:
    texts = list(getattr(options, "text", None) or [])
    if getattr(options, "text_file", None):
        texts += _read_lines(options.text_file)
    if texts:
        return texts
    items, _ = _held_out_items(options, info, split)
    return [item.answered for item in items[:limit]]


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist.")
    with open(path, encoding="utf-8") as handle:
        lines = [line.rstrip("\n") for line in handle if line.strip()]
    if not lines:
        raise UserError(f"{path} has no text.")
    return lines


def _load_moelora(options):
    config = adapter_config(options.adapter)
    if config.get("peft_type") != "MOELORA":
        raise UserError(f"{options.adapter!r} holds a {config.get('peft_type')} adapter, not a MOELORA adapter.")
    base_name = options.base_model or base_model_of(options.adapter)
    model, tokenizer = load_base(base_name, options.dtype, options.device)
    return load_adapter(model, options.adapter), tokenizer, config


def inspect_command(options) -> int:
    from .inspect import collect_routing, format_routing_table, save_routing_heatmap, save_routing_json

    check_device(options.device)
    info = run_info(options.adapter)
    texts = _texts(options, info, "eval", options.num_texts)
    model, tokenizer, config = _load_moelora(options)
    stats = collect_routing(model, tokenizer, texts, batch_size=options.batch_size)
    if options.modules:
        pattern = re.compile(options.modules)
        stats = {name: s for name, s in stats.items() if pattern.search(name)}
        if not stats:
            raise UserError(f"No adapted layer matches --modules {options.modules!r}.")
    names = config.get("expert_names")
    print(format_routing_table(stats, names), flush=True)
    output_dir = options.output_dir or os.path.join(options.adapter, "inspect")
    os.makedirs(output_dir, exist_ok=True)
    json_path = save_routing_json(
        stats, os.path.join(output_dir, "routing_stats.json"), {"adapter": options.adapter, "num_texts": len(texts)}
    )
    png = save_routing_heatmap(
        stats,
        os.path.join(output_dir, "routing_heatmap.png"),
        title=f"Expert load over {len(texts)} texts: {os.path.basename(os.path.normpath(options.adapter))}",
        expert_names=names,
    )
    print(f"routing statistics: {os.path.abspath(json_path)}\nrouting heatmap:    {os.path.abspath(png)}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------------


def _export_texts(options, info: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(calibration pairs, held-out measurement pairs) as (prompt, completion)."""
    n = options.num_texts
    if options.calibration_file:
        lines = _read_lines(options.calibration_file)
        if len(lines) < 2:
            raise UserError("--calibration_file needs at least 2 lines (half calibrates, half measures).")
        half = len(lines) // 2
        return [(t, "") for t in lines[:half]], [(t, "") for t in lines[half:]]
    if not info and not options.benchmark:
        log(f"no --calibration_file and no training record next to the adapter: calibrating on {DEFAULT_BENCHMARK}")
    train, _ = _held_out_items(options, info, "train")
    held_out, _ = _held_out_items(options, info, "eval")
    return (
        [(i.prompt, i.choices[i.label]) for i in train[:n]],
        [(i.prompt, i.choices[i.label]) for i in held_out[:n]],
    )


def _parse_weights(spec: str, count: int) -> Optional[list[float]]:
    if spec == "sum":
        return [1.0] * count
    if spec == "mean":
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError as err:
        raise UserError(f"--weights must be sum, mean or comma-separated numbers, got {spec!r}.") from err
    if len(weights) != count:
        raise UserError(f"--weights has {len(weights)} numbers for {count} experts.")
    return weights


def export_command(options) -> int:
    from moe_peft_plugin.export import MoeLoraExportError

    try:
        return _export(options)
    except MoeLoraExportError as err:  # a mistake in the adapter or the selection: one line, no traceback
        raise UserError(str(err)) from err


def _export(options) -> int:
    import numpy as np

    from moe_peft_plugin.export import (
        QualityReport,
        build_lora_state,
        completion_nll,
        parse_layers,
        read_moelora,
        resolve_experts,
        save_lora,
    )

    if not (options.expert is not None or options.experts or options.merge):
        raise UserError("Say what to export: --expert E, --experts E1,E2,... (a subset) or --merge.")
    if options.merge or not options.no_measure:
        check_device(options.device)
    config, experts = read_moelora(options.adapter)
    max_experts = max(e.num_experts for e in experts.values())
    names = config.get("expert_names")
    if options.expert is not None:
        selected = resolve_experts([options.expert], names, max_experts)
    elif options.experts:
        selected = resolve_experts(options.experts.split(","), names, max_experts)
    else:
        selected = list(range(max_experts))
    layers = parse_layers(options.layers)
    info = run_info(options.adapter)
    measure = options.merge or not options.no_measure

    model = tokenizer = None
    calibration = held_out = None
    if measure:
        calibration, held_out = _export_texts(options, info)
        model, tokenizer, _ = _load_moelora(options)

    if options.merge:
        from .inspect import collect_routing

        log(f"estimating the expected gates over {len(calibration)} calibration texts ...")
        stats = collect_routing(model, tokenizer, [p + c for p, c in calibration])
        weights = {}
        for module in experts:  # a layer without a router (a single expert) has the gate 1
            gate = np.zeros(max_experts)
            mean_gate = stats[module].mean_gate.double().cpu().numpy() if module in stats else np.ones(1)
            chosen = [e for e in selected if e < len(mean_gate)]
            total = mean_gate[chosen].sum()
            gate[chosen] = mean_gate[chosen] / total if total > 0 else 1.0 / len(chosen)
            weights[module] = gate
        mode = {"mode": "merge", "weights": "expected gates E_t[g_e], renormalised over the exported experts"}
    else:
        values = [1.0] if options.expert is not None else _parse_weights(options.weights, len(selected))
        weights = {}
        for module in experts:
            w = np.zeros(max_experts)
            w[selected] = values
            weights[module] = w
        mode = {"mode": "expert" if options.expert is not None else "subset", "weights": values}
    state, ranks = build_lora_state(experts, weights, selected, layers, config.get("layers_pattern"))
    export_info = {
        "source_adapter": os.path.abspath(options.adapter),
        "experts": [names[e] if names and e < len(names) else e for e in selected],
        "layers": sorted(layers) if layers is not None else "all",
        **mode,
        "per_module_weights": {
            m: [round(float(x), 6) for x in w[: experts[m].num_experts]] for m, w in weights.items()
        }
        if options.merge
        else None,
    }
    save_lora(
        options.output_dir,
        state,
        ranks,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        info=export_info,
        dtype=options.save_dtype,
    )
    rank_text = ", ".join(f"r={r}" for r in sorted(set(ranks.values())))
    print(
        f"exported a plain LoRA adapter ({len(ranks)} modules, {rank_text}) to {os.path.abspath(options.output_dir)}"
    )

    if measure:
        from peft import PeftModel

        base_nll, tokens = _nll_without_adapter(model, tokenizer, held_out)
        moe_nll, _ = completion_nll(model, tokenizer, held_out)
        base = model.unload()
        lora = PeftModel.from_pretrained(base, options.output_dir).eval()
        export_nll, _ = completion_nll(lora, tokenizer, held_out)
        report = QualityReport(base_nll, moe_nll, export_nll, tokens)
        print(report.format())
        export_info["quality"] = report.to_dict()
        with open(os.path.join(options.output_dir, "moe_peft_export.json"), "w") as handle:
            json.dump(export_info, handle, indent=1)
    print(
        "load it without the plugin: PeftModel.from_pretrained(base_model, "
        f"{options.output_dir!r}); accuracy: moe-peft eval {options.output_dir}"
    )
    return 0


def _nll_without_adapter(peft_model, tokenizer, pairs):
    from moe_peft_plugin.export import completion_nll

    with peft_model.disable_adapter():
        return completion_nll(peft_model, tokenizer, pairs)
