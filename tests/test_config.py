"""Strict recipe parsing: every shipped recipe validates; every kind of bad recipe fails fast and clearly."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import REPO, run_script, write_recipe

from trellis.core.recipe import RecipeError, looks_like_local_path
from trellis.data.arguments import DatasetSource
from trellis.stages import parse_recipe, validate_recipe_file

# Stage recipes; pipeline files are validated by tests/test_pipeline.py (tiny) and tests/test_families.py.
RECIPES = sorted(path for path in REPO.glob("recipes/**/*.yaml") if path.name != "pipeline.yaml")

TINY = """\
model_config: recipes/tiny/model.json
tokenizer_name_or_path: data/tiny/tokenizer
datasets:
  - path: data/tiny/sft/train.jsonl
output_dir: outputs/test
use_cpu: true
"""


def parse(workdir, text: str, *cli: str):
    path = write_recipe(workdir / "recipes-under-test" / "sft.yaml", text)
    return parse_recipe("sft", ["--config", str(path), *cli])


@pytest.fixture(autouse=True)
def _in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_validates(recipe):
    # Inputs may be outputs of earlier stages that this test does not run; path checks are tested below.
    validate_recipe_file(str(recipe), check_paths=False)


def test_recipe_values_and_overrides_reach_the_dataclasses(workdir):
    script, training, model = parse(workdir, TINY + "learning_rate: 2e-5\n", "--max_steps", "7")
    assert isinstance(script.datasets[0], DatasetSource) and script.datasets[0].format == "auto"
    assert training.learning_rate == 2e-5  # YAML reads `2e-5` as a string; it is coerced
    assert training.max_steps == 7
    assert model.model_config == "recipes/tiny/model.json" and model.merge_adapters is False


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("learnig_rate: 0.1\n", ["line 7", "learnig_rate", "did you mean 'learning_rate'"]),
        ("num_train_epochs: many\n", ["line 7", "num_train_epochs", "expected a number", "'many'"]),
        ("lr_scheduler_type: cosin\n", ["lr_scheduler_type", "did you mean 'cosine'"]),
        ("use_peft: yes please\n", ["use_peft", "expected true or false"]),
        (
            "eval_datasets:\n  - path: data/tiny/sft/test.jsonl\n    fromat: messages\n",
            ["line 9", "eval_datasets[0].fromat", "did you mean 'format'"],
        ),
        ("eval_datasets:\n  - split: test\n", ["eval_datasets[0]", "missing required key 'path'"]),
        (
            "eval_datasets:\n  - path: data/tiny/sft/missing.jsonl\n",
            ["eval_datasets[0].path", "no such local dataset file or directory", "missing.jsonl"],
        ),
        ("eval_strategy: steps\n", ["eval_strategy", "no held-out data"]),
        ("load_in_4bit: true\n", ["load_in_4bit", "use_peft"]),
        ("chat_template: templates/missing.jinja\n", ["chat_template", "no such local template file"]),
    ],
    ids=[
        "misspelled",
        "wrong-type",
        "bad-choice",
        "wrong-bool",
        "nested-misspelled",
        "nested-missing",
        "missing-file",
        "eval-without-data",
        "qlora-without-peft",
        "missing-template",
    ],
)
def test_bad_recipes_are_rejected_with_the_key(workdir, extra, expected):
    with pytest.raises(RecipeError) as error:
        parse(workdir, TINY + extra)
    for text in expected:
        assert text in str(error.value)


def test_all_problems_are_reported_at_once(workdir):
    with pytest.raises(RecipeError, match="3 problems") as error:
        parse(workdir, TINY + "learnig_rate: 0.1\nmax_step: 3\nnum_train_epochs: x\n")
    assert "did you mean 'max_steps'" in str(error.value)


def test_missing_datasets_and_model(workdir):
    with pytest.raises(RecipeError) as error:
        parse(workdir, "output_dir: out\nuse_cpu: true\n")
    assert "datasets: required" in str(error.value)
    assert "set exactly one of 'model_name_or_path'" in str(error.value)


def test_missing_local_model_dir_is_not_sent_to_the_hub(workdir):
    recipe = TINY.replace("model_config: recipes/tiny/model.json\n", "model_name_or_path: ./models/missing\n")
    with pytest.raises(RecipeError, match="no such local model directory: './models/missing'"):
        parse(workdir, recipe)


def test_unknown_command_line_flag(workdir):
    with pytest.raises(RecipeError, match="--learnin_rate.*did you mean 'learning_rate'"):
        parse(workdir, TINY, "--learnin_rate", "0.1")


def test_bad_command_line_value(workdir):
    with pytest.raises(RecipeError, match="max_steps.*invalid int value"):
        parse(workdir, TINY, "--max_steps", "lots")


def test_hub_ids_and_local_paths_are_told_apart():
    assert not looks_like_local_path("Qwen/Qwen2.5-0.5B")
    assert not looks_like_local_path("gpt2")
    for path in ("./model", "/abs/model", "outputs/tiny/sft", "train.jsonl", "~/models/x", "data/*.parquet"):
        assert looks_like_local_path(path), path


BAD_RECIPES = {
    "misspelled-key": (TINY + "learnig_rate: 0.1\n", "did you mean 'learning_rate'"),
    "wrong-type": (
        TINY + "per_device_train_batch_size: 8.5\n",
        "per_device_train_batch_size: expected an integer",
    ),
    "missing-file": (TINY.replace("sft/train.jsonl", "sft/typo.jsonl"), "no such local dataset file"),
    "missing-model-dir": (
        TINY.replace("model_config: recipes/tiny/model.json", "model_name_or_path: ckpt/base/v1"),
        "no such local model directory: 'ckpt/base/v1'",
    ),
}


@pytest.mark.parametrize("case", BAD_RECIPES)
def test_stage_script_fails_within_10_seconds_without_traceback(workdir, case):
    text, expected = BAD_RECIPES[case]
    path = write_recipe(workdir / "bad" / f"sft_{case}.yaml", text)
    start = time.monotonic()
    result = run_script(["sft.py", "--config", str(path)], cwd=workdir, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and expected in result.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_trellis_validate_command(workdir):
    bad = write_recipe(workdir / "bad" / "sft_cli.yaml", TINY + "learnig_rate: 0.1\n")
    result = subprocess.run(
        [sys.executable, "-m", "trellis.cli", "validate", "recipes/tiny/sft.yaml", str(bad)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "ok   recipes/tiny/sft.yaml (sft)" in result.stdout
    assert "FAIL" in result.stderr and "did you mean 'learning_rate'" in result.stderr
    version = subprocess.run(
        [sys.executable, "-m", "trellis.cli", "--version"], capture_output=True, text=True
    )
    assert version.stdout.startswith("trellis ")
