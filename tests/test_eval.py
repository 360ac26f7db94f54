"""The evaluation stage: known scores on checkpoints built to score them, gates, resume, model cards, and
the tiny default's before/after comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import fresh_tiny_model, run_script, write_recipe
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from trellis.core.recipe import RecipeError
from trellis.core.run_record import read_record
from trellis.evaluate import comparison, evaluation
from trellis.evaluate.arguments import EvalArguments
from trellis.evaluate.gates import GateError, check_gates, parse_gate, select_candidate
from trellis.evaluate.perplexity import evaluate_perplexity, sliding_windows
from trellis.stages import parse_recipe

TASKS = "tasks: [tiny_qa, tiny_qa_form, tiny_preference]\napply_chat_template: true\n"
LIMIT = 8  # held-out examples per task in the known-score test
PERPLEXITY = (
    "perplexity:\n  - label: corpus\n    path: data/tiny/corpus/validation.jsonl\n    max_length: 64\n"
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def save(model, tokenizer, path: Path) -> Path:
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def uniform_checkpoint(workdir, tmp_path_factory) -> Path:
    """A model that knows nothing: all weights zero, so every next token has probability 1 / vocabulary."""
    model, tokenizer = fresh_tiny_model(workdir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return save(model, tokenizer, tmp_path_factory.mktemp("uniform"))


@pytest.fixture(scope="session")
def oracle_checkpoint(workdir, tmp_path_factory) -> Path:
    """A model trained on the first LIMIT held-out conversations themselves (their answers), so it answers
    those questions right; the known-score test evaluates only them (`limit`)."""
    model, tokenizer = fresh_tiny_model(workdir)
    conversations = [row["messages"] for row in read_jsonl(workdir / "data/tiny/sft/test.jsonl")[:LIMIT]]
    encoded = [
        tokenizer.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        for c in conversations
    ]
    width = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    for row, e in enumerate(encoded):
        ids, answer = torch.tensor(e["input_ids"]), torch.tensor(e["assistant_masks"]).bool()
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)][answer] = ids[answer]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = model(
            input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.1, f"the oracle did not memorise the held-out set (loss {loss.item():.3f})"
    return save(model, tokenizer, tmp_path_factory.mktemp("oracle"))


def evaluate(workdir: Path, recipe: str, name: str, *overrides: str):
    path = write_recipe(workdir / "recipes-under-test" / f"{name}.yaml", recipe)
    return run_script(["evaluate.py", "--config", str(path), *overrides], cwd=workdir)


def uniform_preference_accuracy(workdir: Path, tokenizer) -> float:
    """Under a uniform model a reply's log-likelihood is -(its token count) * ln(vocabulary), so the chosen
    reply wins when it has no more tokens than the rejected one (a tie goes to the first choice, the chosen).
    Tokens are counted as lm-eval does: the reply after the chat-formatted prompt, which gives it the
    prompt's trailing newline."""
    wins = []
    for row in read_jsonl(workdir / "data/tiny/preferences/test.jsonl")[:LIMIT]:
        context = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        base = len(tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"])

        def count(reply: str, context=context, base=base) -> int:
            return len(tokenizer(context + reply, add_special_tokens=False)["input_ids"]) - base

        wins.append(count(row["chosen"][0]["content"]) <= count(row["rejected"][0]["content"]))
    return sum(wins) / len(wins)


@pytest.mark.slow
def test_known_scores_gates_resume_and_model_card(workdir, tmp_path, uniform_checkpoint, oracle_checkpoint):
    out = tmp_path / "eval"
    recipe = (
        f"output_dir: {out}\n"
        f"checkpoints:\n  - name: uniform\n    path: {uniform_checkpoint}\n"
        f"  - name: oracle\n    path: {oracle_checkpoint}\n"
        + TASKS
        + PERPLEXITY
        + f"limit: {LIMIT}\n"
        + "gates: ['tiny_qa.exact_match >= 0.9', 'tiny_preference.acc == 1']\n"
    )
    result = evaluate(workdir, recipe, "eval_known")
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    tokenizer = AutoTokenizer.from_pretrained(uniform_checkpoint)
    # The oracle answers every held-out question exactly, in form, and prefers every well-formed answer.
    assert metrics["tiny_qa.exact_match"] == {"uniform": 0.0, "oracle": 1.0}
    assert metrics["tiny_qa_form.acc"] == {"uniform": 0.0, "oracle": 1.0}
    assert metrics["tiny_preference.acc"]["oracle"] == 1.0
    assert metrics["tiny_preference.acc"]["uniform"] == pytest.approx(
        uniform_preference_accuracy(workdir, tokenizer), abs=1e-9
    )
    # Uniform over the vocabulary: perplexity is the vocabulary size, bits per byte follows from the counts.
    texts = [row["text"] for row in read_jsonl(workdir / "data/tiny/corpus/validation.jsonl")]
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert metrics["corpus.perplexity"]["uniform"] == pytest.approx(len(tokenizer), rel=1e-5)
    assert metrics["corpus.bits_per_byte"]["uniform"] == pytest.approx(
        tokens * math.log2(len(tokenizer)) / sum(len(t.encode()) for t in texts), rel=1e-5
    )

    # The table: a column per checkpoint and the delta against the baseline (the first), a chart per metric.
    assert results["baseline"] == "uniform" and results["candidate"] == "oracle"
    assert results["delta_vs_baseline"]["tiny_qa.exact_match"] == {"oracle": 1.0}
    table = (out / "results.md").read_text()
    assert "| tiny_qa.exact_match | 0 | 1 | +1 ▲ |" in table
    assert "| corpus.perplexity | " in table
    assert {p.name for p in (out / "plots").iterdir()} == {f"{m}.png" for m in metrics}
    assert (out / "plots" / "tiny_qa.exact_match.png").read_bytes()[:4] == b"\x89PNG"
    assert read_jsonl(out / "samples" / "oracle" / "tiny_qa.jsonl")[0]["filtered_resps"]

    record = read_record(str(out))
    assert record["status"] == "complete" and record["metrics"]["oracle"]["tiny_qa.exact_match"] == 1.0
    assert record["gates"][0].startswith("pass tiny_qa.exact_match >= 0.9")

    # The model-index block round-trips through huggingface_hub's parser, here and in the checkpoint's card.
    for card_path in (out / "model_card.md", oracle_checkpoint / "README.md"):
        parsed = {
            (r.dataset_name, r.metric_type): r.metric_value
            for r in ModelCard.load(card_path).data.eval_results
        }
        assert parsed[("tiny_qa", "exact_match")] == 1.0
        assert parsed[("corpus", "perplexity")] == pytest.approx(
            metrics["corpus.perplexity"]["oracle"], rel=1e-5
        )
        assert len(parsed) == len(metrics)

    # A failed gate exits non-zero and says which; the rerun resumes: nothing is evaluated again.
    # One gate, which the uniform model fails (its preference accuracy depends on the generated pairs' lengths).
    failing = recipe.replace(
        "'tiny_qa.exact_match >= 0.9', 'tiny_preference.acc == 1'", "'tiny_qa_form.acc >= 0.5'"
    )
    failing += "candidate: uniform\n"
    result = evaluate(workdir, failing, "eval_known_gate")
    assert result.returncode == 2
    assert "checkpoint 'uniform' failed 1 gate(s): tiny_qa_form.acc = 0, required >= 0.5" in result.stderr
    assert result.stdout.count("already evaluated with these settings") == 2
    assert read_record(str(out))["status"] == "failed"


def test_unknown_task_lists_the_closest_names_and_code_tasks_are_opt_in(workdir, tmp_path):
    recipe = (
        f"output_dir: {tmp_path}\ncheckpoints:\n  - name: x\n    path: {tmp_path}\n"
        "tasks: [tiny_qa_fom, arc_easyy, humaneval]\n"
    )
    result = evaluate(workdir, recipe, "eval_bad_task")
    assert result.returncode == 2
    assert "unknown task 'tiny_qa_fom'; closest: tiny_qa_form" in result.stderr
    assert "unknown task 'arc_easyy'; closest: arc_easy" in result.stderr
    assert "task 'humaneval' executes code the model writes" in result.stderr  # opt-in only
    assert not (tmp_path / "trellis_run.json").exists(), "nothing runs before the tasks are checked"


def test_trellis_tasks_alone_skip_indexing_lm_evals_own():
    args = EvalArguments(output_dir="unused", checkpoints=[{"name": "x", "path": "x"}], tasks=["tiny_qa"])
    manager = evaluation.task_manager(args)
    assert "tiny_qa" in manager.all_tasks and "arc_easy" not in manager.all_tasks  # lm-eval's ~14,000 unread
    # (a task of lm-eval's own in the recipe indexes them all: the unknown-task test above)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("checkpoints:\n  - name: a\n    pth: x\n", ["checkpoints[0].pth", "did you mean 'path'"]),
        ("checkpoints:\n  - path: x\n", ["checkpoints[0]", "missing required key 'name'"]),
        (
            "checkpoints:\n  - name: a\n    path: x\n    model_config: recipes/tiny/model.json\n",
            ["exactly one of 'path'"],
        ),
        (
            "checkpoints:\n  - name: a\n    path: x\nbaseline: b\n",
            ["baseline", "'b' is not a checkpoint name"],
        ),
        (
            "checkpoints:\n  - name: a\n    path: x\ngates: ['acc > high']\n",
            ["gates", "<metric> <op> <number>"],
        ),
        (
            "checkpoints:\n  - name: a\n    path: x\nperplexity:\n  - label: p\n",
            ["missing required key 'path'"],
        ),
        (
            "checkpoints:\n  - name: a\n    path: x\nselect_from: [a, bb]\nselect_by: tiny_qa.exact_match\n",
            ["select_from[1]", "'bb' is not a checkpoint name"],
        ),
        (
            "checkpoints:\n  - name: a\n    path: x\nselect_from: [a]\ncandidate: a\nselect_by: q.acc\n",
            ["candidate", "set 'candidate' or 'select_from', not both"],
        ),
        ("checkpoints:\n  - name: a\n    path: x\nselect_from: [a]\n", ["select_by", "go together"]),
    ],
    ids=[
        "typo-in-checkpoint",
        "no-name",
        "path-and-config",
        "unknown-baseline",
        "bad-gate",
        "ppl-no-path",
        "unknown-selectable",
        "candidate-and-select",
        "select-without-metric",
    ],
)
def test_bad_eval_recipes_fail_clearly(workdir, monkeypatch, extra, expected):
    monkeypatch.chdir(workdir)
    path = write_recipe(
        workdir / "recipes-under-test" / "eval.yaml", "output_dir: x\ntasks: [tiny_qa]\n" + extra
    )
    with pytest.raises(RecipeError) as error:
        parse_recipe("eval", ["--config", str(path)])
    for text in expected:
        assert text in str(error.value)


def test_sliding_windows_score_every_token_once_with_context():
    ids = list(range(100))
    windows = sliding_windows(ids, max_length=32, stride=8)
    scored = [t for window, n in windows for t in window[len(window) - n :]]
    assert scored == ids[1:]  # every token but the prefix, once, in order
    assert all(len(window) - n >= 32 - 8 for window, n in windows[1:])  # with at least 24 tokens of context
    assert sliding_windows(ids[:10], max_length=32, stride=8) == [(ids[:10], 9)]


def test_perplexity_matches_a_direct_computation(workdir):
    model, tokenizer = fresh_tiny_model(workdir)
    text = "Kalo lives in Rome. 2 plus 3 is 5. Kalo likes the color red."
    ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    nll = -log_probs.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum().item()
    result = evaluate_perplexity(model, tokenizer, [text, text], max_length=64, stride=32, batch_size=1)
    assert result["tokens"] == 2 * (len(ids) - 1)
    assert result["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(
        2 * nll / math.log(2) / (2 * len(text.encode())), rel=1e-4
    )
    # A window shorter than the text scores the same tokens, with less context.
    windowed = evaluate_perplexity(model, tokenizer, [text], max_length=8, stride=4, batch_size=4)
    assert windowed["tokens"] == len(ids) - 1


def test_gates():
    assert parse_gate("gsm8k.exact_match,strict-match >= 0.3").metric == "gsm8k.exact_match,strict-match"
    assert check_gates(["a.acc >= 0.5", "p.perplexity < 10"], {"a.acc": 0.5, "p.perplexity": 9.0}, "sft") == [
        "pass a.acc >= 0.5 (sft: 0.5)",
        "pass p.perplexity < 10 (sft: 9)",
    ]
    with pytest.raises(GateError, match=r"failed 1 gate\(s\): a.acc = 0.4, required >= 0.5"):
        check_gates(["a.acc >= 0.5"], {"a.acc": 0.4}, "sft")
    with pytest.raises(GateError, match=r"no metric 'a.ac' .*\(did you mean 'a.acc'\?\)"):
        check_gates(["a.ac >= 0.5"], {"a.acc": 0.4}, "sft")


def test_the_candidate_is_the_best_of_select_from_that_passes_the_gates():
    def result(clean: float, exact: float) -> dict:
        return {"metrics": {"clean.acc": clean, "qa.exact": exact}, "higher_is_better": {"clean.acc": True}}

    models = {"dpo": result(0.9, 0.7), "ppo": result(0.95, 0.5), "kto": result(0.9, 0.9), "sft": result(1, 1)}
    gates = ["qa.exact >= 0.6"]
    # ppo has the best clean.acc but fails the gate; dpo and kto tie: the first listed wins; sft is not listed.
    assert select_candidate(gates, models, ["ppo", "dpo", "kto"], "clean.acc") == (
        "dpo",
        {"ppo": 0.95, "dpo": 0.9, "kto": 0.9},
    )
    lower = {"a": {"metrics": {"p.perplexity": 3.0}, "higher_is_better": {"p.perplexity": False}}}
    lower["b"] = {"metrics": {"p.perplexity": 2.0}, "higher_is_better": {"p.perplexity": False}}
    assert select_candidate([], lower, ["a", "b"], "p.perplexity")[0] == "b"
    # None passes: the best of all, whose gates then fail as any candidate's would.
    assert select_candidate(["qa.exact >= 0.95"], models, ["ppo", "dpo"], "clean.acc")[0] == "ppo"
    with pytest.raises(GateError, match=r"select_by: no metric 'clean.ac' in the results of 'ppo'"):
        select_candidate(gates, models, ["ppo"], "clean.ac")


def test_model_index_round_trips_through_huggingface_hub(tmp_path):
    result = comparison.comparison(
        {
            "base": {"metrics": {"mmlu.acc": 0.25}},
            "sft": {"metrics": {"mmlu.acc": 0.5, "wiki.perplexity": 9.5}},
        },
        baseline="base",
        candidate="sft",
    )
    card = comparison.model_card(
        "my-model", {"mmlu.acc": 0.5, "wiki.perplexity": 9.5}, {"wiki": "data/wiki.jsonl"}, ""
    )
    card.save(tmp_path / "README.md")
    parsed = ModelCard.load(tmp_path / "README.md").data
    assert parsed.model_name == "my-model"
    assert {(r.dataset_type, r.dataset_name, r.metric_type, r.metric_value) for r in parsed.eval_results} == {
        ("mmlu", "mmlu", "acc", 0.5),
        ("data/wiki.jsonl", "wiki", "perplexity", 9.5),
    }
    assert result["delta_vs_baseline"] == {"mmlu.acc": {"sft": 0.25}, "wiki.perplexity": {"sft": None}}


@pytest.fixture(scope="session")
def tiny_sft(workdir, seed) -> Path:
    """The SFT model of recipes/tiny/sft.yaml (the test's seed), where recipes/tiny/eval.yaml looks for it."""
    result = run_script(["sft.py", "--config", "recipes/tiny/sft.yaml", "--seed", str(seed)], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "outputs/tiny/sft"


@pytest.mark.slow
def test_tiny_eval_recipe_shows_what_sft_changed(workdir, tmp_path, tiny_sft, record_property):
    out = tmp_path / "eval"
    result = run_script(
        ["evaluate.py", "--config", "recipes/tiny/eval.yaml", "--output_dir", str(out)], cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((out / "results.json").read_text())["metrics"]
    form, preference = metrics["tiny_qa_form.acc"], metrics["tiny_preference.acc"]
    record_property("sft_form_acc", form["sft"])
    record_property("preference_acc_gain", preference["sft"] - preference["base"])
    record_property("sft_exact_match", metrics["tiny_qa.exact_match"]["sft"])
    record_property("base_perplexity", metrics["tiny_corpus.perplexity"]["base"])
    # What SFT teaches: the untrained base never replies in the answer's form and stops; the SFT model does
    # on most held-out questions, and prefers the well-formed reply to a rude or rambling one more often.
    # Measured, seeds 0-4, 1-2 threads (docs/test_bounds.md): SFT form 0.792 / 0.979 / 1.0 (min / median /
    # max), preference gain 0.156 on every seed (the base's preferences are fixed: seed 0 initialisation).
    assert form["base"] == 0.0 and form["sft"] >= 0.5  # BOUND eval-sft-form
    assert preference["sft"] >= preference["base"] + 0.05  # BOUND eval-sft-preference
    # What it does not teach: facts it never saw. Exact match on held-out facts stays near chance (1/8).
    # BOUND eval-sft-exact-match: 0.042 / 0.083 / 0.125 (seeds 0-4).
    assert metrics["tiny_qa.exact_match"]["sft"] < 0.2
    # The untrained base is near uniform over the 640-token vocabulary.
    # BOUND eval-base-perplexity: 666.77 for every seed (the base is initialised with seed 0).
    assert 550 < metrics["tiny_corpus.perplexity"]["base"] < 750
    row = next(line for line in (out / "results.md").read_text().splitlines() if "tiny_qa_form.acc" in line)
    assert row.startswith("| tiny_qa_form.acc | 0 |") and row.endswith("▲ |")
    record = read_record(str(out))
    assert record["status"] == "complete" and record["gates"][0].startswith("pass tiny_qa_form.acc >= 0.5")
    card = ModelCard.load(tiny_sft / "README.md")
    assert ("tiny_qa_form", "acc") in {(r.dataset_name, r.metric_type) for r in card.data.eval_results}
