"""The reward and DPO stages end to end on the tiny default, chained from the tiny SFT model.

Two thirds of the tiny preference pairs (rude, rambling or hedging rejected answers) are decidable by
form, which the SFT model already knows; one third (a wrong fact) is not, since an SFT model trained
from scratch knows the answer form but not held-out facts. The bounds below are set accordingly.

The flaw SFT leaves (it rambles or hedges after the answer to casual questions) is measured by rule on
the held-out questions, without a reward model: `clean_form`, the share of greedy replies that are the
answer sentence (any fact: this SFT model has not been pretrained) and end the turn right there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alignment_metrics import (
    accuracy_and_margin,
    answer_logps,
    clean_form,
    kind_of_pair,
    preference_pairs,
    reward_scores,
)
from conftest import LORA, RecordingHub, run_stage, write_recipe
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from trellis.core.run_record import read_record

QLORA = LORA + "load_in_4bit: true\nbnb_4bit_quant_type: nf4\n"


def held_out_pairs(workdir: Path) -> list[dict]:
    return preference_pairs(workdir / "data/tiny/preferences/test.jsonl")


def form_decidable(pairs: list[dict], scores: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [score for pair, score in zip(pairs, scores, strict=True) if kind_of_pair(pair) != "wrong"]


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(workdir, sft_model, reward_model):
    record = read_record(str(reward_model))
    initial, final = record["metrics"]["initial"], record["metrics"]["eval"]
    assert (
        final["eval_accuracy"] > initial["eval_accuracy"]
        and final["eval_margin"] > initial["eval_margin"] + 2
    )
    assert record["config"]["model"]["model_name_or_path"] == str(sft_model)

    # Measured independently of the trainer, pair by pair, on the saved model.
    model = AutoModelForSequenceClassification.from_pretrained(reward_model)
    assert model.config.num_labels == 1
    pairs = held_out_pairs(workdir)
    scores = reward_scores(model, AutoTokenizer.from_pretrained(reward_model), pairs)
    accuracy, margin = accuracy_and_margin(scores)
    assert accuracy >= 0.8 and margin > 2, (accuracy, margin)  # chance is 0.5
    assert accuracy_and_margin(form_decidable(pairs, scores))[0] >= 0.95


@pytest.mark.slow
def test_dpo_raises_margin_and_accuracy_over_sft(workdir, sft_model, seed, tmp_path):
    out = tmp_path / "dpo"
    record = run_stage(workdir, "dpo", out, "--model_name_or_path", str(sft_model), "--seed", str(seed))
    initial, final = record["metrics"]["initial"], record["metrics"]["eval"]
    assert final["eval_loss"] < 0.5 * initial["eval_loss"]  # from ln 2 at the start
    assert final["eval_rewards/accuracies"] >= 0.8 and final["eval_rewards/margins"] > 2

    pairs = held_out_pairs(workdir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    before = answer_logps(AutoModelForCausalLM.from_pretrained(sft_model), tokenizer, pairs)
    after = answer_logps(AutoModelForCausalLM.from_pretrained(out), tokenizer, pairs)
    (accuracy_before, margin_before), (accuracy_after, margin_after) = map(
        accuracy_and_margin, (before, after)
    )
    assert margin_after > 1.3 * margin_before > 0, (margin_before, margin_after)
    assert accuracy_after > accuracy_before, (accuracy_before, accuracy_after)
    assert accuracy_and_margin(form_decidable(pairs, after))[0] == 1.0
    before, after = clean_form(workdir, sft_model), clean_form(workdir, out)
    # Measured (seed 0, 1 thread): 0.063 -> 0.216 of the held-out replies in the clean answer form.
    assert after >= before + 0.08, (before, after)


@pytest.mark.slow
def test_qlora_reward_merged_and_qlora_dpo_reload(workdir, sft_model, seed, tmp_path, record_property):
    """QLoRA (LoRA on a 4-bit nf4 base, which bitsandbytes runs on CPU too) for both preference stages."""
    reward_out, dpo_out = tmp_path / "reward", tmp_path / "dpo"
    reward_recipe = write_recipe(
        tmp_path / "reward_qlora.yaml",
        (workdir / "recipes/tiny/reward.yaml").read_text() + QLORA + "merge_adapters: true\n",
    )
    steps = ("--model_name_or_path", str(sft_model), "--seed", str(seed))
    run_stage(workdir, "reward", reward_out, "--max_steps", "30", *steps, recipe=str(reward_recipe))
    names = {p.name for p in reward_out.iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names
    model = AutoModelForSequenceClassification.from_pretrained(reward_out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    pairs = held_out_pairs(workdir)
    accuracy, _ = accuracy_and_margin(reward_scores(model, AutoTokenizer.from_pretrained(reward_out), pairs))
    record_property("reward_pairwise_accuracy", accuracy)

    dpo_recipe = write_recipe(
        tmp_path / "dpo_qlora.yaml", (workdir / "recipes/tiny/dpo.yaml").read_text() + QLORA
    )
    record = run_stage(workdir, "dpo", dpo_out, "--max_steps", "40", *steps, recipe=str(dpo_recipe))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in dpo_out.iterdir()}
    final = record["metrics"]["eval"]
    tokenizer = AutoTokenizer.from_pretrained(dpo_out)
    before = accuracy_and_margin(
        answer_logps(AutoModelForCausalLM.from_pretrained(sft_model), tokenizer, pairs)
    )
    after = accuracy_and_margin(answer_logps(AutoModelForCausalLM.from_pretrained(dpo_out), tokenizer, pairs))
    for name, value in (
        ("dpo_margin", final["eval_rewards/margins"]),
        ("dpo_accuracy", final["eval_rewards/accuracies"]),
        ("answer_accuracy_gain", after[0] - before[0]),
    ):
        record_property(name, value)
    # Measured over seeds 0-4 with 1 and 2 threads (AMD EPYC, 2026-12-02, the redesigned tiny world; the same
    # to 4 decimals for both thread counts): reward pairwise accuracy 0.721 / 0.748 / 0.829 (min / median / max;
    # a fresh score head ranks pairs at ~0.5); DPO's held-out implicit-reward margin 0.042 / 0.083 / 0.143,
    # positive on every seed. The answers' log-prob accuracy gain, -0.027 / 0.081 / 0.180, is recorded but not
    # asserted: 40 QLoRA steps do not move it beyond its spread.
    assert accuracy >= 0.65, accuracy
    assert final["eval_rewards/margins"] > 0, final


def hh_transcript(messages: list[dict]) -> str:
    speakers = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{speakers[m['role']]}: {m['content']}" for m in messages)


@pytest.mark.slow
def test_reward_and_dpo_on_anthropic_hh_transcripts(workdir, sft_model, tmp_path):
    """The tiny pairs rewritten as HH transcripts ({chosen, rejected} whole dialogues) train both stages."""
    for split in ("train", "test"):
        rows = [
            {
                "chosen": hh_transcript(pair["prompt"] + pair["chosen"]),
                "rejected": hh_transcript(pair["prompt"] + pair["rejected"]),
            }
            for pair in preference_pairs(workdir / f"data/tiny/preferences/{split}.jsonl")
        ]
        write_recipe(tmp_path / "hh" / f"{split}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    recipes = {}
    for stage in ("reward", "dpo"):
        text = (workdir / f"recipes/tiny/{stage}.yaml").read_text()
        text = text.replace(
            "data/tiny/preferences/train.jsonl", str(tmp_path / "hh/train.jsonl")
        )  # auto-detected
        text = text.replace(
            "- path: data/tiny/preferences/test.jsonl",
            f"- path: {tmp_path / 'hh/test.jsonl'}\n    format: hh",
        )
        recipes[stage] = str(write_recipe(tmp_path / f"{stage}_hh.yaml", text))
    overrides = ["--model_name_or_path", str(sft_model), "--max_steps", "40"]
    reward = run_stage(workdir, "reward", tmp_path / "reward", *overrides, recipe=recipes["reward"])
    assert reward["metrics"]["eval"]["eval_accuracy"] >= 0.75
    dpo = run_stage(workdir, "dpo", tmp_path / "dpo", *overrides, recipe=recipes["dpo"])
    assert dpo["metrics"]["eval"]["eval_rewards/accuracies"] >= 0.75
    assert dpo["metrics"]["eval"]["eval_rewards/margins"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["kto", "orpo"])
def test_kto_and_orpo_prefer_chosen_answers_more_than_sft(workdir, sft_model, seed, tmp_path, stage):
    """KTO trains on the pairs unpaired (chosen: desirable, rejected: undesirable); ORPO on the pairs, no reference."""
    out = tmp_path / stage
    # KTO: its tiny recipe's 60 steps; ORPO: half of its recipe's. Both at the learning rate (and ORPO's
    # beta) these bounds were measured at, above the recipes' (tuned to keep the pretrained pipeline's
    # held-out facts, which the tests' SFT model from scratch does not know).
    steps = (
        []
        if stage == "kto"
        else ["--max_steps", "30", "--eval_steps", "30", "--save_steps", "30", "--beta", "2.0"]
    )
    steps += ["--learning_rate", "5e-4"]
    record = run_stage(
        workdir, stage, out, "--model_name_or_path", str(sft_model), "--seed", str(seed), *steps
    )
    initial, final = record["metrics"]["initial"], record["metrics"]["eval"]
    pairs = held_out_pairs(workdir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # ORPO compares answers by their mean log-probability per token; KTO, like DPO, by the sum.
    per_token = stage == "orpo"
    before, after = (
        accuracy_and_margin(
            answer_logps(AutoModelForCausalLM.from_pretrained(model), tokenizer, pairs, per_token)
        )
        for model in (sft_model, out)
    )
    if stage == "kto":
        # Measured (seed 0, 1 thread): implicit-reward margin 0 -> 1.76; summed log-prob margin 6.7 -> 25.7,
        # while the pair accuracy stayed at 0.79 (the wrong-fact third is beyond this SFT model).
        assert final["eval_rewards/margins"] > initial["eval_rewards/margins"] + 1
        assert after[1] > 2 * before[1] > 0, (before, after)
    else:  # measured (seed 0, 1 thread): accuracy 0.30 -> 0.83 (ORPO's own), 0.31 -> 0.82 (per token, independently)
        assert final["eval_rewards/accuracies"] > initial["eval_rewards/accuracies"] + 0.1
        assert after[0] > before[0] + 0.04, (before, after)


def test_a_training_stages_push_uploads_the_final_model_with_its_card(sft_model):
    """push_to_hub on a training stage goes through the one upload (trellis.core.hub): the final model's files,
    no checkpoints or pickles, and a card naming the stage; private unless the recipe says otherwise."""
    from types import SimpleNamespace

    from trellis.train.run import push_final_model

    hub = RecordingHub()
    args = SimpleNamespace(hub_model_id="me/tiny-sft", hub_private_repo=None, hub_revision=None)
    plan = push_final_model(args, str(sft_model), api=hub)

    (_, repo, repo_options), (_, _, commit) = hub.calls
    assert repo == "me/tiny-sft" and repo_options["private"] is True
    assert set(commit["files"]) == set(plan["files"]) and "model.safetensors" in commit["files"]
    assert not any(name.startswith("checkpoint-") or name.endswith(".bin") for name in commit["files"])
    card = commit["files"]["README.md"].decode()
    assert "Trellis `sft` stage" in card and "eval_loss" in card
