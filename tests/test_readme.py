"""The README's Python snippets run as written.

They run in order in one fresh interpreter, like cells of a notebook, in an empty working folder. One line is swapped:
the README's `model_path = ensure_default_model()` (the embedded SmolLM2-135M-Instruct, downloaded from PyPI and
converted on first use; `test_main_job.py` runs that model) becomes the path of the tiny test model. Nothing else
changes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .helpers import REPO


MODEL_LINE = "model_path = ensure_default_model()"


def readme_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)


def test_readme_python_snippets_run(tiny_model_dir, tmp_path):
    snippets = readme_snippets()
    assert len(snippets) >= 3
    code = "\n".join(snippets)
    lines = [line for line in code.splitlines() if line.startswith("model_path = ")]
    assert len(lines) == 1 and lines[0].startswith(MODEL_LINE), lines  # the one line this test swaps
    code = code.replace(lines[0], f"model_path = {tiny_model_dir!r}  # swapped by tests/test_readme.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    # What the snippets say they write.
    assert (tmp_path / "my-moelora" / "adapter_config.json").is_file()
    assert "import moe_peft_plugin" in (tmp_path / "my-moelora" / "README.md").read_text()
    assert (tmp_path / "mole" / "adapter_model.safetensors").is_file()


def test_readme_install_line_is_the_cpu_build():
    readme = (REPO / "README.md").read_text()
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "pip install torch &&" not in readme and "pip install torch            #" not in readme
