"""PPO end to end on the tiny default, and the checks that stop a recipe naming the wrong kind of reward model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LORA, run_script, run_stage, write_recipe
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from trellis.alignment import mean_reward, tokenize_prompts
from trellis.config import DatasetSource
from trellis.data import load_source
from trellis.models import _config_from_recipe
from trellis.run_record import read_record
from trellis.tokenizer import train_bpe_tokenizer


def held_out_reward(workdir: Path, policy_dir: Path, reward_dir: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    prompts = tokenize_prompts(
        load_source(DatasetSource(path=str(workdir / "data/tiny/prompts/test.jsonl"))), tokenizer
    )
    return mean_reward(
        AutoModelForCausalLM.from_pretrained(policy_dir),
        AutoModelForSequenceClassification.from_pretrained(reward_dir),
        tokenizer,
        prompts,
        response_length=16,
    )


@pytest.fixture(scope="module")
def early_sft_model(workdir, tmp_path_factory) -> Path:
    """An SFT policy stopped early: it half knows the answer form, so the reward model has room to teach it."""
    out = tmp_path_factory.mktemp("early_sft") / "model"
    run_stage(workdir, "sft", out, "--max_steps", "40", "--eval_strategy", "no", "--save_strategy", "no")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora-merged"])
def test_ppo_raises_mean_reward_on_held_out_prompts(
    workdir, early_sft_model, reward_model, tmp_path, variant
):
    out = tmp_path / "ppo"
    recipe = "recipes/tiny/ppo.yaml"
    if variant == "lora-merged":
        text = (workdir / recipe).read_text() + LORA + "merge_adapters: true\n"
        recipe = str(write_recipe(tmp_path / "ppo_lora.yaml", text))
    record = run_stage(
        workdir,
        "ppo",
        out,
        "--model_name_or_path",
        str(early_sft_model),
        "--reward_model_path",
        str(reward_model),
        recipe=recipe,
    )
    initial, final = record["metrics"]["initial"], record["metrics"]["eval"]
    if variant == "full":  # measured: 2.69 -> 3.08, end of turn 69% -> 100% of held-out replies
        assert final["mean_reward"] > initial["mean_reward"] + 0.2, (initial, final)
        assert final["eos_rate"] >= initial["eos_rate"]
    assert "objective/kl" in record["metrics"]["train"] and "objective/entropy" in record["metrics"]["train"]
    # The saved policy reloads with from_pretrained and earns the recorded reward.
    assert "adapter_config.json" not in {p.name for p in out.iterdir()}
    measured = held_out_reward(workdir, out, reward_model)
    assert measured["mean_reward"] == pytest.approx(final["mean_reward"], abs=0.05)


@pytest.fixture(scope="module")
def wrong_reward_models(workdir, tmp_path_factory) -> dict[str, Path]:
    """Small untrained models of the wrong kind: a causal LM (no score head), and a reward model on another vocabulary."""
    root = tmp_path_factory.mktemp("wrong_reward")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "data/tiny/tokenizer")
    causal = AutoModelForCausalLM.from_config(
        _config_from_recipe(str(workdir / "recipes/tiny/model.json"), tokenizer)
    )
    causal.save_pretrained(root / "causal")
    tokenizer.save_pretrained(root / "causal")
    other = train_bpe_tokenizer(["a different corpus gives a different vocabulary"] * 10, vocab_size=300)
    config = _config_from_recipe(str(workdir / "recipes/tiny/model.json"), other)
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "other_vocab")
    other.save_pretrained(root / "other_vocab")
    return {"causal": root / "causal", "other_vocab": root / "other_vocab"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("causal", ["reward_model_path", "not a reward model", "LlamaForCausalLM", "without a score head"]),
        ("other_vocab", ["reward_model_path", "tokenizer of", "does not match the policy's"]),
    ],
)
def test_wrong_kind_of_reward_model_fails_before_training(
    workdir, sft_model, wrong_reward_models, tmp_path, kind, expected
):
    out = tmp_path / "ppo"
    result = run_script(
        [
            "ppo.py",
            "--config",
            "recipes/tiny/ppo.yaml",
            "--model_name_or_path",
            str(sft_model),
            "--reward_model_path",
            str(wrong_reward_models[kind]),
            "--output_dir",
            str(out),
        ],
        cwd=workdir,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr[-2000:]
    # Stopped before the policy was loaded: nothing measured, nothing trained, nothing saved.
    record = read_record(str(out))
    assert record["status"] == "failed" and record["metrics"]["initial"] == {}
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
