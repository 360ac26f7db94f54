"""The generate stage: sampled answers, checked against the right answer or scored by a reward model, kept by
check, threshold or best-of-n, written as a chat dataset; a killed run resumes with the same answers."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import REPO, read_jsonl, run_script, start_script, wait_for_file, write_recipe
from transformers import AutoTokenizer

from trellis.core.recipe import RecipeError
from trellis.core.run_record import read_record
from trellis.data.arguments import DatasetSource
from trellis.data.sources import load_mixture
from trellis.stages import parse_recipe
from trellis.train import alignment, generation


def _generate(workdir, sft_model, reward_model, out, *overrides: str, prompts: int = 24):
    """The tiny recipe on the tests' SFT and reward models, for the first `prompts` prompts."""
    text = (REPO / "recipes/tiny/generate.yaml").read_text()
    text = text.replace("outputs/tiny/sft", str(sft_model)).replace("outputs/tiny/reward", str(reward_model))
    recipe = write_recipe(workdir / "recipes-under-test" / "generate.yaml", text)
    return [
        "generate.py",
        "--config",
        str(recipe),
        "--output_dir",
        str(out),
        "--max_prompts",
        str(prompts),
        *overrides,
    ]


def _answers(out) -> list[dict]:
    return [
        record
        for path in sorted((out / generation.BATCHES_DIR).glob("*.jsonl"))
        for record in read_jsonl(path)
    ]


def test_rejection_sampling_keeps_exactly_the_answers_at_or_above_the_threshold(
    workdir, sft_model, reward_model, tmp_path
):
    # First every answer, scored; then a threshold at their median, so that it really splits them.
    scored = tmp_path / "scored"
    result = run_script(
        _generate(workdir, sft_model, reward_model, scored, "--best_of_n", "false", "--min_reward=-1e9"),
        workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = _answers(scored)
    assert len(answers) == 24 * 4 and all(record["kept"] for record in answers)
    threshold = statistics.median(record["score"] for record in answers)

    out = tmp_path / "filtered"
    result = run_script(
        _generate(
            workdir, sft_model, reward_model, out, "--best_of_n", "false", "--min_reward", str(threshold)
        ),
        workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = _answers(out)
    assert [r["messages"] for r in answers] == [
        r["messages"] for r in _answers(scored)
    ]  # same seed, same answers
    assert all(r["kept"] == (r["score"] >= threshold) for r in answers)
    kept = read_jsonl(out / generation.KEPT_NAME)
    assert 0 < len(kept) < len(answers) and len(kept) == sum(r["kept"] for r in answers)
    # what was written is what was scored: the reward model, run again on the dataset, agrees
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    model = alignment.load_scoring_model(str(reward_model), "float32")
    rescored = generation.score_answers(model, tokenizer, [record["messages"] for record in kept])
    assert min(rescored) >= threshold - 1e-4
    metrics = read_record(str(out))["metrics"]["generated"]
    assert metrics["kept"] == len(kept) and metrics["answers"] == 24 * 4


def test_best_of_n_keeps_each_prompts_best_answer_and_sft_reads_them(
    workdir, sft_model, reward_model, tmp_path
):
    out = tmp_path / "best"
    result = run_script(_generate(workdir, sft_model, reward_model, out, "--min_reward=-1e9"), workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = _answers(out)
    for index in range(24):
        choices = [r for r in answers if r["prompt_index"] == index]
        assert len(choices) == 4
        (best,) = [r for r in choices if r["kept"]]  # one a prompt, even when answers tie
        assert best["score"] == max(r["score"] for r in choices)
    kept = load_mixture([DatasetSource(path=str(out / generation.KEPT_NAME))], seed=0, task="messages")
    assert len(kept) == 24  # one conversation a prompt, as the SFT stage reads them
    assert all(messages[-1]["role"] == "assistant" for messages in kept["messages"])


def test_a_killed_run_resumes_at_the_first_missing_batch_with_the_same_answers(
    workdir, sft_model, reward_model, tmp_path
):
    # 192 prompts in 96 batches: after the first batch is written, seconds of work are still ahead
    def command(out):
        return _generate(workdir, sft_model, reward_model, out, "--batch_size", "2", prompts=192)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_script(command(whole), workdir).returncode == 0
    process = start_script(command(killed), workdir)
    wait_for_file(killed / generation.BATCHES_DIR / "00000000.jsonl", process)
    process.kill()
    process.wait()
    written = sorted(p.name for p in (killed / generation.BATCHES_DIR).glob("*.jsonl"))
    assert 1 <= len(written) < 96 and not (killed / generation.KEPT_NAME).exists()

    rerun = run_script(command(killed), workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming: {len(written)} of 96 batches are already written" in rerun.stdout + rerun.stderr
    assert (killed / generation.KEPT_NAME).read_text() == (whole / generation.KEPT_NAME).read_text()

    # another setting: nothing is resumed from batches sampled otherwise
    changed = run_script([*command(killed), "--temperature", "0.5"], workdir)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "Removing 96 batches written with other settings" in changed.stdout + changed.stderr
    assert (killed / generation.KEPT_NAME).read_text() != (whole / generation.KEPT_NAME).read_text()


def test_a_checker_keeps_exactly_the_answers_whose_final_answer_is_right(workdir, sft_model, tmp_path):
    # The model's own greedy answers first; then a prompt set whose `answer` is that answer for every
    # other prompt and another for the rest: the checker must keep exactly the first half.
    def generate(prompts, out, *overrides):
        recipe = write_recipe(
            tmp_path / "generate.yaml",
            f"model_name_or_path: {sft_model}\noutput_dir: {out}\ndatasets: [{{path: {prompts}}}]\n"
            "temperature: 0\nmax_new_tokens: 24\n",
        )
        result = run_script(["generate.py", "--config", str(recipe), *overrides], workdir)
        assert result.returncode == 0, result.stderr[-3000:]

    questions = read_jsonl(workdir / "data/tiny/eval/qa.jsonl")[:24]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": row["question"]}) + "\n" for row in questions))
    generate(plain, tmp_path / "plain")
    replies = [r["messages"][-1]["content"] for r in _answers(tmp_path / "plain")]

    checked = tmp_path / "checked.jsonl"
    finals = [generation.final_answer(reply, "Answer:") or "" for reply in replies]
    checked.write_text(
        "".join(
            json.dumps({"prompt": row["question"], "answer": final if i % 2 == 0 else final + " not"}) + "\n"
            for i, (row, final) in enumerate(zip(questions, finals, strict=True))
        )
    )
    generate(checked, tmp_path / "checked", "--check_answers", "true")
    answers = _answers(tmp_path / "checked")
    assert [r["messages"][-1]["content"] for r in answers] == replies  # greedy: the same replies
    assert [r["kept"] for r in answers] == [i % 2 == 0 and bool(f) for i, f in enumerate(finals)]
    assert sum(r["kept"] for r in answers) >= 6  # the tests' SFT model answers in the taught form
    assert read_jsonl(tmp_path / "checked" / generation.KEPT_NAME) == [
        {"messages": r["messages"]} for r in answers if r["kept"]
    ]
    metrics = read_record(str(tmp_path / "checked"))["metrics"]["generated"]
    assert metrics["correct_fraction"] == metrics["kept_fraction"]


def test_final_answers_are_what_follows_the_last_marker():
    assert generation.final_answer("3 + 4 = 7.\nAnswer: 7.\nAnswer: 14.", "Answer:") == "14"
    assert generation.final_answer("no marker here", "Answer:") is None
    assert generation.final_answer(" Oslo.", "") == "Oslo"


def test_checking_prompts_without_answers_is_refused_naming_the_file(workdir):
    args = generation.GenerateArguments(
        model_name_or_path="m",
        output_dir="o",
        datasets=[{"path": str(workdir / "data/tiny/prompts/test.jsonl")}],
        check_answers=True,
    )
    with pytest.raises(generation.GenerationError, match="prompts/test.jsonl\\) have no `answer` column"):
        generation.prompts_of(args)


def test_a_threshold_without_a_reward_model_is_refused(tmp_path):
    recipe = write_recipe(
        tmp_path / "generate.yaml",
        "model_name_or_path: m\noutput_dir: o\ndatasets: [{path: p.jsonl}]\nmin_reward: 0.5\nbest_of_n: true\n",
    )
    with pytest.raises(RecipeError) as error:
        parse_recipe("generate", ["--config", str(recipe)], check_paths=False)
    assert "min_reward: scores answers: set reward_model_path" in str(error.value)
    assert "best_of_n: picks the best of num_samples answers" in str(error.value)
