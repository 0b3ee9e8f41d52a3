"""The packages import one way: `moe_peft_plugin` (core) <- `trainer_callbacks` (TRL) <- `moe_peft_cli` (command line).

- the core imports neither trl, datasets nor matplotlib, nor the packages above it, at any level (function-level
  imports included); the trainer never imports the CLI; no package imports bitsandbytes itself (peft does);
- no import cycle between modules, function-level imports included (`if TYPE_CHECKING:` imports excluded);
- the CLI runs the SFT script as a module (no `exec` of examples/, no import by string);
- `moe-peft --help`, `moe-peft train --help` and `--version` start without torch.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from moe_peft_plugin import MoeLoraConfig

from .helpers import REPO


PACKAGES = ("moe_peft_plugin", "trainer_callbacks", "moe_peft_cli")
CORE_MUST_NOT_IMPORT = ("trl", "datasets", "matplotlib", "trainer_callbacks", "moe_peft_cli")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def imports(module: str) -> set[str]:
    """Every module `module` imports, at any level of its code (resolved relative imports; `from a import b` gives
    `a.b` when that is one of our modules, else `a`)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_core_imports_nothing_above_it_nor_trl_datasets_matplotlib():
    offenders = {
        module: sorted(name for name in imports(module) if _top(name) in CORE_MUST_NOT_IMPORT)
        for module in MODULES
        if _top(module) == "moe_peft_plugin"
    }
    assert not {m: names for m, names in offenders.items() if names}


def test_the_trainer_never_imports_the_cli_and_nothing_imports_bitsandbytes_itself():
    for module in MODULES:
        names = {_top(name) for name in imports(module)}
        assert "bitsandbytes" not in names, module  # peft imports it; our code only checks that it is installed
        if _top(module) == "trainer_callbacks":
            assert "moe_peft_cli" not in names, module


def test_no_import_cycles():
    graph = {module: {name for name in imports(module) if name in MODULES and name != module} for module in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(name) :] + [name]))
            if name not in state:
                visit(name, [*path, name])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_cli_runs_the_sft_script_as_a_module():
    for module, path in MODULES.items():
        if _top(module) != "moe_peft_cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = getattr(node.func, "attr", getattr(node.func, "id", None))
                forbidden = ("exec", "exec_module", "import_module", "spec_from_file_location", "__import__")
                assert called not in forbidden, f"{module} calls {called}"
    assert "trainer_callbacks.sft_script" in imports("moe_peft_cli.train")


def test_core_modules_import_no_trl_datasets_matplotlib_at_run_time():
    core = sorted(module for module in MODULES if _top(module) == "moe_peft_plugin")
    code = (
        "import importlib, json, sys\n"
        f"for module in {core!r}:\n"
        "    importlib.import_module(module)\n"
        f"    heavy = [name for name in {CORE_MUST_NOT_IMPORT!r} if name in sys.modules]\n"
        "    if heavy:\n"
        "        print(json.dumps([module, heavy])); sys.exit(1)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_the_trainer_registers_moelora_and_imports_no_cli():
    # A program that uses only the trainer or the SFT script can load MOELORA adapters: importing it registers them.
    code = (
        "import sys\n"
        "import trainer_callbacks.sft_script\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "assert 'MOELORA' in PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "assert not [m for m in sys.modules if m.startswith('moe_peft_cli')]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["--version"], []])
def test_help_starts_without_torch(argv):
    code = (
        "import json, sys\n"
        "from moe_peft_cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'peft', 'transformers', 'bitsandbytes', 'trl') if m in sys.modules]\n"
        "print(json.dumps(heavy), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
    assert "usage: moe-peft" in result.stdout or "moe-peft-plugin" in result.stdout


def test_a_cli_command_in_a_fresh_process_loads_moelora_and_keeps_bitsandbytes_quiet(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = MoeLoraConfig(r=2, target_modules=["q_proj"], num_experts=2, top_k=1, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"prompt": "the cat sat on the", "choices": [" mat", " dog"], "label": 0}) + "\n")
    command = [sys.executable, "-m", "moe_peft_cli", "eval", str(tmp_path / "adapter"), "--base_model",
               tiny_model_dir, "--data", str(data), "--dtype", "float32", "--no_base"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]  # the CLI registered MOELORA itself
    assert "fine-tuned" in result.stdout
    # bitsandbytes' import-time note on its optional CPU 4-bit kernels (printed where AVX512-BF16 exists) is held back.
    assert "kernels-community" not in result.stderr


def test_the_held_kernel_messages_are_logged_after_all_for_a_quantized_model(caplog):
    """Both loggers that report on bitsandbytes' CPU kernel (`kernels` since transformers 5.25 installs it, and
    bitsandbytes) are held back, other messages are not, and a 4-bit command logs the held ones, in order."""
    from moe_peft_cli.quiet import hold_bitsandbytes_kernels_warning, release_bitsandbytes_kernels_warning

    trust = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' (offline mode)."
    failed = "Failed to load CPU gemm_4bit_forward from kernels-community: not found."
    hold_bitsandbytes_kernels_warning()
    try:
        with caplog.at_level(logging.WARNING):
            logging.getLogger("kernels._internals.hf_hub").warning(trust)
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(failed)
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("something else")
            assert [r.getMessage() for r in caplog.records] == ["something else"]
            release_bitsandbytes_kernels_warning()
            assert [r.getMessage() for r in caplog.records] == ["something else", trust, failed]
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(failed)  # no longer held
            assert len(caplog.records) == 4
    finally:
        release_bitsandbytes_kernels_warning()
