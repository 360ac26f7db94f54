"""Strict recipe parsing: every shipped recipe validates; every kind of bad recipe fails fast and clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SCRIPTS, write_recipe
from record_opens import run_recording_opens

from trellis.core.errors import TrellisError
from trellis.core.recipe import RecipeError, looks_like_local_path
from trellis.data.arguments import DatasetSource
from trellis.stages import parse_recipe, validate_recipe_file

# Stage recipes; pipeline files are validated by tests/test_pipeline.py (tiny) and tests/test_families.py.
RECIPES = sorted(path for path in REPO.glob("recipes/**/*.yaml") if path.stem.split("_")[0] != "pipeline")

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


OUT_OF_RANGE = {
    "per_device_train_batch_size": (
        "per_device_train_batch_size: -4\n",
        "line 7: per_device_train_batch_size: must be >= 1, got -4",
    ),
    "learning_rate": ("learning_rate: -0.001\n", "line 7: learning_rate: must be >= 0, got -0.001"),
    "learning_rate-yaml-string": (  # YAML 1.1 reads -1e-3 as a string; it is coerced, then checked
        "learning_rate: -1e-3\n",
        "line 7: learning_rate: must be >= 0, got -0.001",
    ),
    "gradient_accumulation_steps": (
        "gradient_accumulation_steps: 0\n",
        "line 7: gradient_accumulation_steps: must be >= 1, got 0",
    ),
    "num_train_epochs": ("num_train_epochs: 0\n", "line 7: num_train_epochs: must be > 0, got 0.0"),
    "max_steps": (
        "max_steps: -2\n",
        "line 7: max_steps: must be >= -1 (-1: train for num_train_epochs), got -2",
    ),
    "warmup_steps": ("warmup_steps: -0.1\n", "line 7: warmup_steps: must be >= 0"),
    "weight_decay": ("weight_decay: -0.01\n", "line 7: weight_decay: must be >= 0, got -0.01"),
    "max_length": ("max_length: 0\n", "line 7: max_length: must be >= 1, got 0"),
    "eval_steps": (
        "eval_steps: 0\n",
        "line 7: eval_steps: must be > 0 (a step count, or a fraction < 1 of the run)",
    ),
    "adam_beta2": ("adam_beta2: 1.5\n", "line 7: adam_beta2: must be in [0, 1), got 1.5"),
    "seed": ("seed: -1\n", "line 7: seed: must be in [0, 4294967295]"),
    "lora_r": ("use_peft: true\nlora_r: 0\n", "line 8: lora_r: must be >= 1, got 0"),
    "datasets-weight": (
        "eval_datasets:\n  - path: data/tiny/sft/test.jsonl\n    weight: 0\n",
        "line 9: eval_datasets[0].weight: must be > 0 (the share of the source to use: 0.5 a half, 2.0 "
        "twice), got 0",
    ),
    "test_split_size": ("test_split_size: 0\n", "line 7: test_split_size: must be > 0"),
}


@pytest.mark.parametrize("case", OUT_OF_RANGE)
def test_out_of_range_values_are_rejected_with_line_and_key(workdir, case):
    extra, expected = OUT_OF_RANGE[case]
    with pytest.raises(RecipeError) as error:
        parse(workdir, TINY + extra)
    assert "sft.yaml: line" in str(error.value) and expected in str(error.value)


def test_out_of_range_command_line_values_are_rejected_with_the_flag(workdir):
    with pytest.raises(RecipeError) as error:
        parse(workdir, TINY, "--per_device_train_batch_size", "-4", "--learning-rate=-0.001")
    assert str(error.value) == (
        "command line: 2 problems\n"
        "  - --per_device_train_batch_size: must be >= 1, got -4\n"
        "  - --learning_rate: must be >= 0, got -0.001"
    )
    # The file is checked on its own: an override does not hide a bad value in it.
    with pytest.raises(RecipeError, match="line 7: learning_rate"):
        parse(workdir, TINY + "learning_rate: -1\n", "--learning_rate", "0.1")


def test_beta_bounds_depend_on_the_stage(workdir):
    # DPO (and KTO, ORPO) learn no preference at beta 0; for GRPO and RLOO 0 only turns the KL term off.
    with pytest.raises(RecipeError, match=r"--beta: must be > 0, got 0.0"):
        parse_recipe("dpo", ["--config", "recipes/tiny/dpo.yaml", "--beta", "0"], check_paths=False)
    _, training, _ = parse_recipe(
        "grpo", ["--config", "recipes/tiny/grpo.yaml", "--beta", "0"], check_paths=False
    )
    assert training.beta == 0
    with pytest.raises(RecipeError, match=r"--beta: must be >= 0, got -0.1"):
        parse_recipe("grpo", ["--config", "recipes/tiny/grpo.yaml", "--beta", "-0.1"], check_paths=False)


def test_a_key_written_twice_is_rejected_naming_both_lines(workdir):
    text = (
        TINY + "learning_rate: 1e-4\neval_datasets:\n  - path: a.jsonl\n    split: test\n    path: b.jsonl\n"
    )
    text += "learning_rate: 2e-4\n"
    with pytest.raises(RecipeError) as error:
        parse(workdir, text)
    assert str(error.value).endswith(
        "sft.yaml: 2 problems\n"
        "  - line 11: eval_datasets[0].path: written twice (also on line 9); YAML would silently keep only "
        "this one: delete one of them\n"
        "  - line 12: learning_rate: written twice (also on line 7); YAML would silently keep only this "
        "one: delete one of them"
    )


def test_pipeline_files_reject_duplicate_keys_and_out_of_range_overrides(workdir):
    from trellis.pipeline.spec import load_pipeline

    head = "output_dir: out/dup\nstages:\n  - name: sft\n    recipe: recipes/tiny/sft.yaml\n    overrides:\n"
    twice = write_recipe(workdir / "pipelines" / "twice.yaml", head + "      seed: 1\n      seed: 2\n")
    with pytest.raises(
        TrellisError,
        match=r"twice.yaml: line 7: stages\[0\].overrides.seed: written twice \(also on line 6\)",
    ):
        load_pipeline(str(twice))
    negative = write_recipe(workdir / "pipelines" / "negative.yaml", head + "      learning_rate: -0.1\n")
    with pytest.raises(
        TrellisError, match=r"negative.yaml \(overrides\): line 6: learning_rate: must be >= 0"
    ):
        load_pipeline(str(negative))


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


def model_or_data_files(opened: list[str], workdir: Path) -> list[str]:
    """The opened files that mean a stage went on to load its model, tokenizer or data."""
    data = str(workdir / "data") + os.sep
    model_config = str(workdir / "recipes" / "tiny" / "model.json")
    return [
        path
        for path in opened
        if path.startswith(data)
        or path == model_config
        or path.endswith((".safetensors", ".arrow", ".jsonl"))
    ]


@pytest.mark.parametrize("case", BAD_RECIPES)
def test_bad_recipe_stops_the_script_before_it_opens_any_model_or_data(workdir, tmp_path, case):
    text, expected = BAD_RECIPES[case]
    output_dir = workdir / "outputs" / f"bad-{case}"
    path = write_recipe(workdir / "bad" / f"sft_{case}.yaml", text.replace("outputs/test", str(output_dir)))
    result, opened = run_recording_opens(
        [str(SCRIPTS / "sft.py"), "--config", str(path)], workdir, tmp_path / "opened.txt"
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: {path}" in result.stderr and expected in result.stderr
    assert str(path) in opened  # the hook saw the recipe being read ...
    assert model_or_data_files(opened, workdir) == []  # ... and nothing the stage trains on
    assert not output_dir.exists()


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
