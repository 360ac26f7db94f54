"""The distill stage: a pruned student learns its teacher's distributions; on text, it learns more from them
than from the text itself; a small student learns a teacher's reasoning from its checked worked answers,
which final answers alone do not teach; a teacher it cannot learn from is refused before training."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import datasets
import pytest
import yaml
from conftest import REPO, prune_in_process, read_jsonl, run_script, run_stage, write_recipe
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trellis.core.recipe import RecipeError
from trellis.evaluate.perplexity import evaluate_perplexity
from trellis.stages import parse_recipe
from trellis.train import distillation, generation

# Held-out KL(teacher || student) on the SFT test answers, after / before 60 steps, the student being the
# tests' SFT model pruned to 1 of its 2 layers: 0.056 / 0.123 / 0.161 (seeds 0-4, 1 and 2 threads: identical;
# KL before 0.14-0.36). The effect (1 - ratio, median 0.88) is 8.3x the spread (0.105); the worst run is
# 3.2x the spread below the bound.
KL_RATIO_BOUND = 0.5  # BOUND distill-kl


@pytest.fixture(scope="module")
def pruned_student(workdir, sft_model, tmp_path_factory):
    """The tests' SFT model pruned by the tiny prune recipe (1 of 2 layers), with its tokenizer."""
    out = tmp_path_factory.mktemp("pruned") / "model"
    recipe = (REPO / "recipes/tiny/prune.yaml").read_text().replace("outputs/tiny/sft", str(sft_model))
    path = write_recipe(workdir / "recipes-under-test" / "prune-student.yaml", recipe)
    result = run_script(["prune.py", "--config", str(path), "--output_dir", str(out)], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_pruned_student_learns_its_teachers_distributions(
    workdir, sft_model, pruned_student, seed, record_property
):
    out = workdir / "outputs-under-test" / "distill"
    record = run_stage(
        workdir,
        "distill",
        out,
        "--model_name_or_path", str(pruned_student),
        "--teacher_model_name_or_path", str(sft_model),
        "--max_steps", "60",
        "--eval_steps", "60",
        "--save_steps", "60",
        "--seed", str(seed),
    )  # fmt: skip
    before, after = (record["metrics"][name]["eval_loss"] for name in ("initial", "eval"))
    record_property("kl_before", before)
    record_property("kl_ratio", after / before)
    assert after < KL_RATIO_BOUND * before, (before, after)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and model.config.num_hidden_layers == 1


def test_a_teacher_with_another_vocabulary_is_refused_before_training(workdir, pruned_student, tmp_path):
    config = AutoConfig.from_pretrained(pruned_student)
    config.vocab_size += 7
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "teacher")
    result = run_script(
        [
            "distill.py",
            "--config", "recipes/tiny/distill.yaml",
            "--model_name_or_path", str(pruned_student),
            "--teacher_model_name_or_path", str(tmp_path / "teacher"),
            "--output_dir", str(tmp_path / "out"),
        ],
        workdir,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"vocabulary of {config.vocab_size} tokens, the student {config.vocab_size - 7}" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_distill_recipe_without_a_teacher_is_refused(tmp_path):
    recipe = (
        (REPO / "recipes/tiny/distill.yaml").read_text().replace("teacher_model_name_or_path", "# teacher")
    )
    path = write_recipe(tmp_path / "distill.yaml", recipe)
    with pytest.raises(RecipeError, match="teacher_model_name_or_path: required in logit mode"):
        parse_recipe("distill", ["--config", str(path)], check_paths=False)


def compression_pipeline_recipe(workdir: Path, stage: str, **keys) -> Path:
    """A stage's recipe as recipes/tiny/pipeline_compression.yaml runs it (its overrides applied), with
    `keys` in place of its references to earlier stages."""
    pipeline = yaml.safe_load((REPO / "recipes/tiny/pipeline_compression.yaml").read_text())
    entry = next(entry for entry in pipeline["stages"] if entry["name"] == stage)
    recipe = yaml.safe_load((REPO / entry["recipe"]).read_text()) | entry.get("overrides", {}) | keys
    text = yaml.safe_dump(recipe, sort_keys=False)
    assert "${" not in text, text
    return write_recipe(workdir / "recipes-under-test" / f"{stage}.yaml", text)


def _held_out_perplexity(workdir: Path, model_dir: Path) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [row["text"] for row in read_jsonl(workdir / "data/tiny/corpus/validation.jsonl")]
    scores = evaluate_perplexity(model, tokenizer, texts, max_length=128, stride=64, batch_size=32)
    return scores["perplexity"]


# Held-out corpus perplexity of the pruned model distilled from the unpruned one on a transfer set of the
# corpus, over the same model trained on that text itself (same data, steps and learning rate, as the
# compression pipeline's last stages; here a hundredth of the corpus, 30 documents, and 100 steps where the
# pipeline takes a tenth and 300): 0.597 / 0.634 / 0.717 (seeds 0-4, 1 and 2 threads; spread 0.12). The
# effect (1 - ratio, median 0.37) is 3.0x the spread; the worst run is 1.5x the spread below the bound.
DISTILL_TEXT_RATIO_BOUND = 0.9  # BOUND distill-text
TRANSFER_SHARE = 0.01


def test_on_text_a_pruned_student_learns_more_from_its_teacher_than_from_the_text(
    workdir, language_model, seed, tmp_path_factory, record_property
):
    root = tmp_path_factory.mktemp("distill-text")
    student = prune_in_process(workdir, language_model, root / "student", num_hidden_layers=1)
    models = {name: root / name for name in ("distilled", "trained")}
    steps = ["--max_steps", "100", "--eval_steps", "100", "--save_steps", "100", "--seed", str(seed)]
    transfer = {"datasets": [{"path": "data/tiny/corpus/train.jsonl", "weight": TRANSFER_SHARE}]}
    distill = compression_pipeline_recipe(
        workdir,
        "distill_pretrained",
        model_name_or_path=str(student),
        teacher_model_name_or_path=str(language_model),
        **transfer,
    )
    run_stage(workdir, "distill", models["distilled"], *steps, recipe=str(distill))
    train = compression_pipeline_recipe(
        workdir, "train_pretrained", model_name_or_path=str(student), **transfer
    )
    run_stage(workdir, "sft", models["trained"], *steps, recipe=str(train))

    perplexity = {name: _held_out_perplexity(workdir, path) for name, path in models.items()}
    perplexity |= {
        name: _held_out_perplexity(workdir, path)
        for name, path in (("student", student), ("teacher", language_model))
    }
    for name, value in perplexity.items():
        record_property(f"{name}_perplexity", value)
    ratio = perplexity["distilled"] / perplexity["trained"]
    record_property("distilled_over_trained", ratio)
    # The teacher's distributions teach; 53 epochs of 30 documents' tokens overfit (seed 1: worse than before)
    assert perplexity["distilled"] < perplexity["student"], perplexity
    assert ratio < DISTILL_TEXT_RATIO_BOUND, perplexity


def test_plain_text_has_no_prompts_for_on_policy_distillation():
    args = distillation.DistillConfig(
        output_dir="unused", lmbda=0.5, teacher_model_name_or_path="t", bf16=False
    )
    data = datasets.DatasetDict(train=datasets.Dataset.from_list([{"text": "Pepe lives in Oslo."}]))
    with pytest.raises(distillation.DistillationError, match="plain text has none; set lmbda: 0"):
        distillation.text_collator(args, data, tokenizer=None)


# Held-out two-step exact match of the student (a quarter of the teacher's size) trained on the teacher's
# checked worked answers, minus the same student's on final answers only, at the recipe's 1,200 steps:
# 0.325 / 0.39 / 0.465 (seeds 0-4 x 1 and 2 threads; spread 0.14). The student's exact match / the teacher's:
# 0.957 / 0.995 / 1.037.
COT_MARGIN_BOUND = 0.15  # BOUND distill-cot
COT_KEPT_BOUND = 0.8  # BOUND distill-cot-kept


def _held_out_exact_match(model: Path, prompts: Path) -> float:
    """Greedy answers to the held-out two-step questions, checked as the generate stage checks them."""
    args = generation.GenerateArguments(
        model_name_or_path=str(model),
        output_dir="unused",
        datasets=[{"path": str(prompts)}],
        temperature=0.0,
        max_new_tokens=48,
        batch_size=200,
        check_answers=True,
    )
    model, tokenizer, _ = generation.load_models(args)
    records = generation.answer_batch(args, model, tokenizer, None, generation.prompts_of(args), 0)
    return statistics.mean(record["correct"] for record in records)


def test_a_small_student_learns_the_teachers_reasoning_which_answers_alone_do_not_teach(
    workdir, seed, tmp_path_factory, record_property
):
    root = tmp_path_factory.mktemp("cot")
    teacher = root / "teacher"
    run_stage(workdir, "sft", teacher, "--seed", str(seed), recipe="recipes/tiny/sft_teacher.yaml")
    rationales = workdir / "outputs/tiny/generate_rationales"  # where recipes/tiny/distill_cot.yaml reads
    generated = run_stage(
        workdir, "generate", rationales, "--model_name_or_path", str(teacher),
        recipe="recipes/tiny/generate_rationales.yaml",
    )  # fmt: skip
    kept = read_jsonl(rationales / generation.KEPT_NAME)
    assert len(kept) == generated["metrics"]["generated"]["kept"] > 0.8 * 800
    students = {}
    for name, overrides in (("cot", []), ("answers", ["--answers_only", "true"])):
        students[name] = root / name
        run_stage(
            workdir, "distill", students[name], "--seed", str(seed), *overrides,
            recipe="recipes/tiny/distill_cot.yaml",
        )  # fmt: skip

    prompts = root / "held_out.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": [{"role": "user", "content": row["question"]}], "answer": row["answer"]})
            + "\n"
            for row in read_jsonl(workdir / "data/tiny/eval/multistep.jsonl")
        )
    )
    match = {
        name: _held_out_exact_match(path, prompts) for name, path in [("teacher", teacher), *students.items()]
    }
    for name, value in match.items():
        record_property(f"{name}_exact_match", value)
    record_property("cot_margin", match["cot"] - match["answers"])
    assert match["cot"] - match["answers"] >= COT_MARGIN_BOUND, match
    assert match["cot"] >= COT_KEPT_BOUND * match["teacher"], match
    sizes = {
        name: AutoModelForCausalLM.from_pretrained(path).num_parameters() for name, path in students.items()
    }
    assert sizes["cot"] <= 0.25 * AutoModelForCausalLM.from_pretrained(teacher).num_parameters()


def test_answers_only_cuts_each_answer_to_its_final_answer_and_names_a_row_without_one():
    rows = [
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "1 + 2 = 3.\nAnswer: 3."},
            ]
        },
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "3, I think"}]},
    ]
    cut = distillation.final_answers_only(datasets.Dataset.from_list(rows[:1]), "Answer:")
    assert cut[0]["messages"][-1] == {"role": "assistant", "content": "Answer: 3."}
    with pytest.raises(distillation.DistillationError, match="row 1 of the data has no 'Answer:'"):
        distillation.final_answers_only(datasets.Dataset.from_list(rows), "Answer:")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--teacher_model_name_or_path", "t"], "teacher_model_name_or_path: unused in cot mode"),
        (["--mode", "logit", "--answers_only", "true"], "answers_only: a cot-mode baseline"),
    ],
)
def test_cot_mode_keys_that_would_be_ignored_are_refused(overrides, message):
    with pytest.raises(RecipeError, match=message):
        recipe = str(REPO / "recipes/tiny/distill_cot.yaml")
        parse_recipe("distill", ["--config", recipe, *overrides], check_paths=False)
