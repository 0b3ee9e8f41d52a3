"""examples/sft_moelora.py: the `trl sft` command line for MOELORA (parsing, recipes, a single-process run, MoLE)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from moe_peft_plugin import MoeLoraConfig

from .helpers import CORPUS, build_tiny_llama


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "sft_moelora.py"
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))


def _load_script():
    spec = importlib.util.spec_from_file_location("sft_moelora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through the module
    spec.loader.exec_module(module)
    return module


sft_moelora = _load_script()


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def jsonl_dataset(tmp_path_factory) -> str:
    """A local dataset folder, as `--dataset_name` takes it: train.jsonl and test.jsonl."""
    path = tmp_path_factory.mktemp("jsonl-data")
    for split, texts in (("train", CORPUS), ("test", CORPUS[:6])):
        with open(path / f"{split}.jsonl", "w") as handle:
            handle.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    return str(path)


def _parse(argv):
    # bf16 (SFTConfig's default) needs a GPU, or `use_cpu`.
    return sft_moelora.make_parser().parse_args_and_config([*argv, "--bf16", "false"])


def test_trl_lora_and_moelora_arguments_map_onto_the_adapter_config(tmp_path):
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(
        yaml.safe_dump(
            {
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_target_modules": ["q_proj", "v_proj"],
                "num_experts": [2, 4],
                "top_k": 1,
                "contrastive_loss_coef": 0.05,
                "aux_loss_coef": 0.05,
                "learning_rate": 1e-3,
            }
        )
    )
    argv = ["--config", str(yaml_path), "--output_dir", str(tmp_path), "--report_to", "none"]
    # The command line overrides the YAML file.
    argv += [
        "--lora_r",
        "8",
        "--lora_dropout",
        "0.0",
        "--aux_loss_coef",
        "0.1",
        "--router_z_loss_coef",
        "1e-3",
    ]
    script_args, training_args, model_args, dataset_args, moe_args = _parse(argv)
    config = sft_moelora.get_moelora_config(model_args, moe_args)
    assert isinstance(config, MoeLoraConfig) and config.task_type == "CAUSAL_LM"
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 8, 0.0)
    assert config.target_modules == {"q_proj", "v_proj"}
    assert config.num_experts == [2, 4] and config.top_k == 1 and config.router_type == "topk"
    assert (config.contrastive_loss_coef, config.router_z_loss_coef, config.aux_loss_coef) == (0.05, 1e-3, 0.1)
    assert training_args.moelora_aux_loss_coef is None and training_args.learning_rate == 1e-3

    _, _, model_args, _, moe_args = _parse(
        ["--output_dir", str(tmp_path), "--num_experts", "6", "--top_k", "2", "--lora_target_modules", "all-linear"]
        + ["--router_sharing", "true"]
    )
    config = sft_moelora.get_moelora_config(model_args, moe_args)
    assert config.num_experts == 6 and config.top_k == 2 and config.target_modules == "all-linear"
    assert config.router_sharing is True

    # MoLE: rank, scaling and targets come from the LoRAs.
    _, _, model_args, _, moe_args = _parse(
        ["--output_dir", str(tmp_path), "--expert_adapters", "a", "b", "--gate_balance_loss_coef", "0.1"]
    )
    config = sft_moelora.get_moelora_config(model_args, moe_args)
    assert config.expert_adapters == ["a", "b"] and config.num_experts == 2 and config.router_type == "soft"
    assert config.target_modules is None and config.freeze_experts

    # QLoRA: TRL's bitsandbytes arguments.
    _, training_args, model_args, _, _ = _parse(["--output_dir", str(tmp_path), "--load_in_4bit", "true"])
    quantization = sft_moelora.get_quantization_config(model_args, training_args)
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--use_dora", "true"], "use_dora"),
        (["--lora_target_parameters", "mlp.experts"], "lora_target_parameters"),
        (["--num_experts", "2", "--top_k", "3"], "top_k"),
        (["--expert_adapters", "a", "--lora_target_modules", "q_proj"], "lora_target_modules"),
        (["--router_type", "soft", "--num_experts", "2", "--top_k", "1", "--router_temperature", "0"], "temperature"),
    ],
)
def test_bad_script_arguments(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        _, _, model_args, _, moe_args = _parse(["--output_dir", str(tmp_path), *argv])
        sft_moelora.get_moelora_config(model_args, moe_args)


def test_qlora_zero3_storage_dtype_must_match(tmp_path):
    class Plugin:
        zero_stage = 3

    class Args:
        deepspeed_plugin = Plugin()

    _, _, model_args, _, _ = _parse(["--output_dir", str(tmp_path), "--load_in_4bit", "true", "--dtype", "bfloat16"])
    assert sft_moelora.get_quantization_config(model_args, Args()).bnb_4bit_quant_storage == torch.bfloat16
    _, _, model_args, _, _ = _parse(
        ["--output_dir", str(tmp_path), "--load_in_4bit", "true", "--bnb_4bit_quant_storage", "float16"]
    )
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage"):
        sft_moelora.get_quantization_config(model_args, Args())


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_are_valid(recipe, tmp_path):
    values = yaml.safe_load(recipe.read_text())
    known = {name for cls in sft_moelora.make_parser().dataclass_types for name in cls.__dataclass_fields__}
    assert set(values) <= known, set(values) - known
    if values.get("deepspeed"):
        assert (ROOT / values["deepspeed"]).is_file()
    if values.get("load_in_4bit") and "zero3" in recipe.stem:
        assert values["bnb_4bit_quant_storage"] == values["dtype"]
    # Parsed as the script parses it (bf16 and the hub model and data are irrelevant on this CPU).
    argv = ["--config", str(recipe), "--output_dir", str(tmp_path)]
    script_args, training_args, model_args, _, moe_args = _parse(argv)
    config = sft_moelora.get_moelora_config(model_args, moe_args)
    assert script_args.dataset_name and model_args.model_name_or_path
    if recipe.stem == "mola":
        assert config.num_experts == [2, 4, 6, 8]
    if recipe.stem == "mole":
        assert config.expert_adapters and config.router_type == "soft" and config.gate_balance_loss_coef > 0
    if "moelora" in recipe.stem or "zero3" in recipe.stem:
        assert (config.num_experts, config.top_k, config.contrastive_loss_coef) == (8, 2, 0.01)
    if "qlora" in recipe.stem:
        assert model_args.load_in_4bit


@pytest.mark.slow
def test_script_trains_in_one_process_from_yaml_and_a_jsonl_folder(tiny_model_dir, jsonl_dataset, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": tiny_model_dir,
                "dataset_name": jsonl_dataset,
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_target_modules": "all-linear",
                "num_experts": [2, 4],
                "top_k": [1, 2],
                "contrastive_loss_coef": 0.01,
                "max_steps": 4,
                "per_device_train_batch_size": 4,
                "logging_steps": 2,
                "eval_strategy": "steps",
                "eval_steps": 2,
                "save_steps": 2,
                "bf16": False,
                "report_to": "none",
                "disable_tqdm": True,
            }
        )
    )
    out = tmp_path / "out"
    argv = [sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(out), "--lora_dropout", "0.0"]
    result = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "engine PeftModelForCausalLM, 1 process(es), 4 steps" in result.stdout

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOELORA" and config["num_experts"] == [2, 4] and config["lora_dropout"] == 0.0
    weights = load_file(out / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.moelora_A"].shape == (2, 4, 64)
    assert weights["base_model.model.model.layers.3.self_attn.q_proj.moelora_router"].shape == (4, 64)
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    train = [log for log in history if "loss" in log]
    evals = [log for log in history if "eval_loss" in log]
    assert len(train) == 2 and len(evals) == 2
    assert all(log["router/aux_loss"] > 0 and "router/contrastive" in log for log in train)
    assert all(log["eval_router/aux_loss"] > 0 for log in evals)
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        assert (folder / "router_load_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_mole_trains_only_the_gates(tiny_model_dir, jsonl_dataset, tmp_path):
    # Two trained LoRAs of the base model become the frozen experts.
    loras = []
    for seed in (1, 2):
        base, _ = build_tiny_llama()
        torch.manual_seed(seed)
        lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        lora.peft_config["default"].base_model_name_or_path = tiny_model_dir
        lora.save_pretrained(tmp_path / f"lora{seed}")
        loras.append(str(tmp_path / f"lora{seed}"))
    out = tmp_path / "mole"
    argv = [
        "--model_name_or_path", tiny_model_dir, "--dataset_name", jsonl_dataset, "--output_dir", str(out),
        "--expert_adapters", *loras, "--gate_balance_loss_coef", "0.1", "--aux_loss_coef", "0.0",
        "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2", "--bf16", "false", "--report_to", "none",
        "--disable_tqdm", "true", "--save_strategy", "no", "--router_load_heatmap", "false",
    ]  # fmt: skip
    trainer = sft_moelora.main(*sft_moelora.parse_args(argv))
    trainable = {n.split(".")[-2] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"moelora_router", "moelora_log_temperature"}
    assert [log for log in trainer.state.log_history if "loss" in log][0]["router/gate_balance"] > 0
    saved = load_file(out / "adapter_model.safetensors")
    first = load_file(Path(loras[0]) / "adapter_model.safetensors")
    key = "base_model.model.model.layers.2.self_attn.v_proj"
    torch.testing.assert_close(saved[f"{key}.moelora_A"][0], first[f"{key}.lora_A.weight"])


def test_deepspeed_detection_and_configured_state_arguments(tmp_path, monkeypatch):
    from trainer_callbacks import configured_state, deepspeed_requested
    from trainer_callbacks.sft_script import explicit_arguments

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"deepspeed": "configs/deepspeed/zero3.json", "accelerator_config": {"split_batches": False}})
    )
    parser = sft_moelora.make_parser()

    def given(*argv):  # what the command line and its YAML file set, as the parser reads them
        return explicit_arguments(parser, list(argv))

    assert deepspeed_requested(given("--deepspeed", "configs/deepspeed/zero2.json"))
    assert deepspeed_requested(given("--deepspeed=configs/deepspeed/zero2.json"))
    assert deepspeed_requested(given("--config", str(recipe)))
    assert deepspeed_requested(given(f"--config={recipe}"))
    assert not deepspeed_requested(given("--output_dir", "x"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch with a DeepSpeed config
    assert deepspeed_requested({})
    with pytest.raises(TypeError, match="explicit_arguments"):  # the parsed values, no more scanning of argv
        deepspeed_requested(["--deepspeed", "configs/deepspeed/zero2.json"])

    # The flag joins the `accelerator_config` that the run gets: the command line's, else the YAML file's.
    from_yaml = given("--config", str(recipe))["accelerator_config"]
    assert configured_state(from_yaml) == {"split_batches": False, "use_configured_state": True}
    from_cli = given("--config", str(recipe), "--accelerator_config", '{"dispatch_batches": false}')
    assert configured_state(from_cli["accelerator_config"]) == {
        "dispatch_batches": False,
        "use_configured_state": True,
    }
    assert configured_state(None) == {"use_configured_state": True}


def test_one_flag_per_setting_and_exact_names(tmp_path, capsys):
    """`--aux_loss_coef` (the adapter's field) is the one flag; the trainer's override is refused, from YAML too."""
    _, training_args, model_args, _, moe_args = sft_moelora.parse_args(
        ["--output_dir", str(tmp_path), "--aux_loss_coef", "0.2", "--bf16", "false"]
    )
    assert sft_moelora.get_moelora_config(model_args, moe_args).aux_loss_coef == 0.2
    assert training_args.moelora_aux_loss_coef is None
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("moelora_contrastive_loss_coef: 0.1\n")
    for argv, flag in (
        (["--moelora_aux_loss_coef", "0.1"], "--aux_loss_coef"),
        (["--config", str(recipe)], "--contrastive_loss_coef"),
        (["--max_step", "3"], "--max_steps"),  # abbreviations are refused
        (["--lerning_rate", "3"], "--learning_rate"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            sft_moelora.parse_args(["--output_dir", str(tmp_path), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1, err
    assert "--moelora_aux_loss_coef" not in sft_moelora.make_parser().format_help()
