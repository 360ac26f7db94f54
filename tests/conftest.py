"""Shared fixtures: the tiny world generated once per session, and running stage scripts for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from trellis.core.run_record import read_record

# No test may reach the Hub: everything is made locally.
os.environ.update(
    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1"
)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def pytest_addoption(parser):
    parser.addoption(
        "--seed",
        type=int,
        default=int(os.environ.get("TRELLIS_TEST_SEED", "0")),
        help="training seed of the learning tests (default: $TRELLIS_TEST_SEED or 0); "
        "their bounds hold for seeds 0-4 with 1 or 2 torch threads",
    )


@pytest.fixture(scope="session")
def seed(request) -> int:
    """The seed every test that trains passes to its stage (`pytest --seed 3`)."""
    return request.config.getoption("--seed")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A directory laid out like a user's checkout: recipes/ and accelerate_configs/ plus generated data/tiny."""
    from trellis.data.tiny import write_tiny_data

    root = tmp_path_factory.mktemp("work")
    for name in ("recipes", "accelerate_configs"):
        (root / name).symlink_to(REPO / name)
    write_tiny_data(root / "data" / "tiny")
    return root


@pytest.fixture(scope="session")
def tiny_data_output(workdir) -> Path:
    """recipes/tiny/data.yaml run once on the generated tiny corpus (as `make tiny` does); its output_dir.
    Its speed is measured by scripts/benchmark_data.py, not asserted here."""
    result = run_script(["prepare_data.py", "--config", "recipes/tiny/data.yaml"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "outputs" / "tiny" / "data"


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def run_script(args: list[str], cwd: Path, timeout: float = 600, launcher: list[str] | None = None):
    """Run `python scripts/<name>.py ...` (or under a launcher such as accelerate) and capture its output."""
    script, *rest = args
    command = [*(launcher or [sys.executable]), str(SCRIPTS / script), *rest]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )


LORA = "use_peft: true\nlora_r: 16\nlora_alpha: 32\nlora_dropout: 0.0\nlora_target_modules: all-linear\n"


def run_stage(workdir: Path, stage: str, out: Path, *overrides: str, recipe: str | None = None) -> dict:
    """The stage's script on `recipe` (default: the stage's tiny recipe) with `overrides`, run from `workdir`
    in this process; its run record. In process, a stage skips the interpreter's start and the libraries'
    imports: about 6 s of CPU, most of what a short tiny stage costs."""
    from trellis.stages import stage_flag, stage_kind

    config = recipe or f"recipes/tiny/{stage}.yaml"
    arguments = ["--config", config, "--output_dir", str(out), *stage_flag(stage), *overrides]
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        run_in_process(stage_kind(stage).script.removesuffix(".py"), arguments)
    finally:
        os.chdir(cwd)
    record = read_record(str(out))
    assert record["status"] == "complete"
    return record


def prune_in_process(workdir: Path, model_dir: Path, out: Path, **cuts: int) -> Path:
    """The model cut to `cuts` (e.g. num_hidden_layers=1) by the prune stage's library, what the tiny SFT
    conversations use least going: a smaller model made from it, in seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trellis.compress import pruning

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
    )
    rows = read_jsonl(workdir / "data/tiny/sft/train.jsonl")[:16]
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    samples = [tokenizer(text, return_tensors="pt", add_special_tokens=False) for text in texts]
    pruned, _ = pruning.prune(model, pruning.measure_importance(model, samples), cuts)
    pruned.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_in_process(script: str, arguments: list[str]) -> None:
    """scripts/<script>.py's main() on its command-line `arguments` in this process (no interpreter start-up):
    its errors raise here, as the exceptions they are."""
    import runpy

    argv = sys.argv
    sys.argv = [script, *arguments]
    try:
        runpy.run_path(str(SCRIPTS / f"{script}.py"))["main"]()
    finally:
        sys.argv = argv


def write_recipe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until a running stage writes `path` (e.g. its first checkpoint); fail if it dies first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The directory `build(path)` fills, for the whole test run. Session fixtures are per xdist worker: without
    this each worker would train the same model again. The first worker to ask builds it under the run's
    shared temporary directory; the others wait on a lock and reuse it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name) / "model"
        build(out)
        return out
    shared = tmp_path_factory.getbasetemp().parent / "built_once"  # the run's directory, above each worker's
    shared.mkdir(exist_ok=True)
    out, built = shared / name, shared / f"{name}.built"
    with FileLock(shared / f"{name}.lock"):
        if not built.exists():
            shutil.rmtree(out, ignore_errors=True)  # what a failed build left
            build(out)
            built.touch()
    return out


@pytest.fixture(scope="session")
def sft_model(workdir, seed, tmp_path_factory) -> Path:
    """The tiny SFT model, the starting point of every alignment stage: recipes/tiny/sft.yaml cut to half its
    steps, which already teaches the answer form (held-out facts are beyond an SFT model from scratch)."""
    arguments = ["--max_steps", "150", "--eval_steps", "150", "--save_steps", "150", "--seed", str(seed)]
    return built_once(tmp_path_factory, "sft", lambda out: run_stage(workdir, "sft", out, *arguments))


@pytest.fixture(scope="session")
def reward_model(workdir, sft_model, seed, tmp_path_factory) -> Path:
    """The tiny reward model, trained from the tiny SFT model by recipes/tiny/reward.yaml."""
    arguments = ["--model_name_or_path", str(sft_model), "--seed", str(seed)]
    return built_once(tmp_path_factory, "reward", lambda out: run_stage(workdir, "reward", out, *arguments))


def fresh_tiny_model(workdir: Path, seed: int = 0):
    """The tiny model (recipes/tiny/model.json), untrained (initialised from `seed`), with the tiny tokenizer
    in ChatML (as the SFT stage builds it)."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from trellis.data import chat

    tokenizer = AutoTokenizer.from_pretrained(workdir / "data" / "tiny" / "tokenizer")
    values = json.loads((REPO / "recipes" / "tiny" / "model.json").read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    chat.apply_chat_template(model, tokenizer, "chatml")
    return model, tokenizer


def fresh_stage_model(stage: str, workdir: Path, seed: int):
    """The tiny model, untrained, and its tokenizer; for the reward stage with a one-output score head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model, tokenizer = fresh_tiny_model(workdir, seed)
    path = workdir / "unused" / "policy"  # DPO and KTO load their reference model from the policy's path
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)  # the reward model's new score head
    if stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    return AutoModelForCausalLM.from_pretrained(path), tokenizer


def stage_trainer(stage: str, workdir: Path, model, tokenizer):
    """A real TRL trainer of `stage` on the tiny data (KTO: the pairs unpaired), as scripts/ build them."""
    from trellis.data import sources
    from trellis.data.arguments import ScriptArguments
    from trellis.stages import stage_types

    config_class = stage_types(stage)[1]
    args = config_class(
        output_dir=str(workdir / "unused"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=16,
        max_length=128,
        activation_checkpointing=False,
        seed=0,
    )
    if stage == "sft":  # as scripts/sft.py builds it, with the tiny recipe's at-once loss
        from trellis.train.arguments import ModelArguments, TokenLossScriptArguments
        from trellis.train.sft import sft_trainer

        data = TokenLossScriptArguments(datasets=[{"path": str(workdir / "data/tiny/sft/train.jsonl")}])
        data.unchunked_loss_max_mib = 64
        dataset = sources.load_train_eval(data, seed=0)
        args.assistant_only_loss = True
        return sft_trainer(model, tokenizer, args, ModelArguments(), dataset, data)
    data = ScriptArguments(datasets=[{"path": str(workdir / "data/tiny/preferences/train.jsonl")}])
    dataset = sources.load_train_eval(data, seed=0, task="unpaired" if stage == "kto" else "preference")
    if stage == "reward":
        from trl import RewardTrainer as trainer_class
    elif stage == "orpo":
        from trellis.train.orpo import ORPOTrainer as trainer_class
    else:
        from trl import DPOTrainer, KTOTrainer

        trainer_class = KTOTrainer if stage == "kto" else DPOTrainer
    return trainer_class(model=model, args=args, train_dataset=dataset["train"], processing_class=tokenizer)


def tokens_per_call(module) -> list[int]:
    """The tokens (positions of its input's leading dimensions) each later call of `module` runs on."""
    tokens = []
    module.register_forward_pre_hook(lambda module, args: tokens.append(args[0].shape[:-1].numel()))
    return tokens


def recorded_differences(record_property, loss, expected_loss, grads, expected_grads) -> tuple[float, float]:
    """How far a loss and its gradients are from the expected ones, recorded for scripts/measure_bounds.py: the
    loss's relative difference, and over the parameters the largest gradient difference relative to the
    expected gradient's largest entry."""
    loss_difference = abs(loss - expected_loss) / max(abs(expected_loss), 1e-8)
    gradient_difference = max(
        ((grads[name] - expected).abs().max() / expected.abs().max().clamp_min(1e-8)).item()
        for name, expected in expected_grads.items()
    )
    record_property("loss_relative_difference", loss_difference)
    record_property("gradient_relative_difference", gradient_difference)
    return loss_difference, gradient_difference


@pytest.fixture(scope="session")
def language_model(workdir, seed, tmp_path_factory) -> Path:
    """The tiny model (recipes/tiny/model.json) trained in-process on the tiny corpus and the SFT
    conversations, so its held-out perplexity means something and small losses in it show (the
    compression stages' input)."""
    return built_once(tmp_path_factory, "lm", lambda out: train_language_model(workdir, seed, out))


def train_language_model(workdir: Path, seed: int, out: Path) -> None:
    import torch

    model, tokenizer = fresh_tiny_model(workdir, seed)
    texts = [row["text"] for row in read_jsonl(workdir / "data/tiny/corpus/train.jsonl")]
    texts += [
        tokenizer.apply_chat_template(row["messages"], tokenize=False)
        for row in read_jsonl(workdir / "data/tiny/sft/train.jsonl")
    ]
    ids = [i for text in texts for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(100):
        batch = blocks[torch.randint(len(blocks), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 2.0, f"the tiny model did not learn the corpus (loss {loss.item():.2f})"
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def start_script(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start `python scripts/<name>.py ...` in the background (to be killed), its stderr kept."""
    script, *rest = args
    command = [sys.executable, str(SCRIPTS / script), *rest]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


class RecordingHub:
    """Stands in for huggingface_hub.HfApi (the Hub is unreachable here): records what would be sent."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))

    def create_branch(self, repo_id, **options):
        self.calls.append(("create_branch", repo_id, options))

    def create_commit(self, repo_id, operations, **options):
        files = {op.path_in_repo: op.path_or_fileobj for op in operations}
        self.calls.append(("create_commit", repo_id, {**options, "files": files}))
        return f"https://huggingface.co/{repo_id}/commit/0"
