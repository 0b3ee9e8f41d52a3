"""The speed benchmark still runs end to end: every config trains a step and the JSON holds what docs/benchmarks.md
reads. Its timings are not checked here (timed unit tests are noise); `benchmarks/bench_train.py` itself compares them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
CONFIGS = {
    "LoRA r=8",
    "LoRA r=64",
    "MOELORA E=8 r=8 top-2",
    "MOELORA E=8 +contrastive",
    "MOELORA E=8 shared routers",
    "MoLA 2-4-6-8",
    "MoLE soft E=3 frozen",
}


def _import_bench_train():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_train
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench_train


def test_the_random_llamas_have_their_documented_shapes():
    """`llama-1b` is the "1B-class" model of the GPU run (Llama-3.2-1B's shape): counted on the meta device, no
    memory; `--llama-layers` changes only the depth."""
    import torch
    from transformers import LlamaForCausalLM

    bench_train = _import_bench_train()
    with torch.device("meta"):
        one_b = LlamaForCausalLM(bench_train.random_llama_config("llama-1b"))
    assert 1.0e9 < sum(p.numel() for p in one_b.parameters()) < 1.3e9
    assert (one_b.config.hidden_size, one_b.config.num_hidden_layers) == (2048, 16)
    assert bench_train.random_llama_config("llama-d1024").num_hidden_layers == 4
    deeper = bench_train.random_llama_config("llama-d1024", 6)
    assert (deeper.hidden_size, deeper.num_hidden_layers) == (1024, 6)


@pytest.mark.slow
def test_bench_train_runs_every_config_on_packed_batches_and_writes_its_json(tmp_path):
    out = tmp_path / "bench_train.json"
    command = [sys.executable, str(SCRIPT), "--models", "llama-d1024", "--steps", "1", "--warmup", "1", "--batch", "2"]
    command += ["--seq", "16", "--packed", "--skip-4bit", "--skip-generation", "--json", str(out)]
    command += ["--dtype", "float32"]  # bfloat16 is emulated, 8x slower, on CPUs without its kernels (AVX2)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    # A missed target is reported, not an error exit: one-step timings on a busy machine may well miss one.
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packed in one row" in result.stdout

    report = json.loads(out.read_text())
    assert report["args"]["packed"] is True
    train = report["models"]["llama-d1024"]["train"]
    assert set(train) == CONFIGS
    for name, numbers in train.items():
        assert len(numbers["step_s"]) == 1 and numbers["step_s"][0] > 0, name
        assert numbers["saved_bytes"] > 0 and numbers["memory_bytes"] > numbers["saved_bytes"], name
    # The comparison the benchmark exists for: 8 experts of rank 8 have about LoRA r=64's trainable parameters.
    ratio = train["MOELORA E=8 r=8 top-2"]["trainable_params"] / train["LoRA r=64"]["trainable_params"]
    assert 1.0 < ratio < 1.1, ratio
    assert train["LoRA r=8"]["time_vs_lora_r8"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("decode", [False, True], ids=["train", "decode"])
def test_op_count_counts_every_config(capsys, decode):
    # It had crashed since bench_train.saved_bytes took a batch dict instead of the input ids: nothing ran it.
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import op_count
    finally:
        sys.path.remove(str(SCRIPT.parent))
    argv = ["--hidden", "64", "--layers", "1", "--batch", "1", "--seq", "8", "--contrastive", "--router-sharing"]
    op_count.main(argv + (["--decode"] if decode else ["--top", "3"]))
    rows = {}
    names = ("LoRA r=64", "MOELORA E=8 r=8 top-2", "MOELORA +contrastive", "MOELORA shared routers")
    for line in capsys.readouterr().out.splitlines():  # "{config:<24}{aten ops}{top-level}{matmuls}{copies}{KiB}"
        if line[:24].strip() in names:
            rows[line[:24].strip()] = [float(value) for value in line[24:].split()]
    assert len(rows) == 4, rows
    lora_ops, moe_ops = rows["LoRA r=64"][0], rows["MOELORA E=8 r=8 top-2"][0]
    assert moe_ops > lora_ops > 0 and rows["MOELORA shared routers"][0] < moe_ops
    if decode:  # no router losses while decoding
        assert rows["MOELORA +contrastive"] == rows["MOELORA E=8 r=8 top-2"]
    else:
        assert rows["MOELORA +contrastive"][0] > moe_ops
        assert all(row[4] > 0 for row in rows.values())  # saved KiB


@pytest.mark.slow
def test_bench_layer_checks_the_fast_path_and_times_every_config():
    # It had crashed in its float64 check since `routing_options` became a dict of RoutingOptions: nothing ran it.
    script = SCRIPT.parent / "bench_layer.py"
    sizes = ["--dims", "64", "--tokens", "32", "--reps", "1", "--warmup", "1", "--threads", "1"]
    result = subprocess.run(
        [sys.executable, str(script), "--quick", *sizes], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checks = [line for line in result.stdout.splitlines() if line.startswith("  ok  ")]
    assert len(checks) == 3, result.stdout  # E=8 top-2 + contrastive, dense E=2, MoLE: each "ok" against float64
    table = result.stdout.split("== d=64", 1)[1]
    assert all(name in table for name in ("LoRA r=64", "MOELORA E=8 +contrastive", "MoLE soft E=3 r=8 frozen"))


@pytest.mark.slow
def test_compiled_generation_generates_every_token_through_the_compiled_forward():
    """`bench_train.py --compiled-generation`: generation with a static cache and the decoding forward compiled
    (forced on CPU) runs for LoRA and MOELORA alike, without hitting dynamo's recompile limit (made an error), and
    generates the requested number of tokens."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model

    from moe_peft_plugin import MoeLoraConfig

    from .helpers import build_tiny_llama

    bench_train = _import_bench_train()
    models = {}
    for name, config in ((bench_train.R8, LoraConfig(r=8, target_modules="all-linear")),
                         (bench_train.MOE, MoeLoraConfig(r=4, num_experts=4, top_k=2, target_modules="all-linear",
                                                         init_weights=False))):  # fmt: skip
        base, _ = build_tiny_llama()
        models[name] = get_peft_model(base, config)
    args = SimpleNamespace(gen_prompt=4, gen_tokens=3, gen_rounds=1)
    problems: list[str] = []
    report, _ = bench_train.bench_generation("tiny", models, 64, args, torch.device("cpu"), problems, compiled=True)
    assert problems == []
    assert set(report) == set(models) and all(r["tokens_per_s"] > 0 for r in report.values())
