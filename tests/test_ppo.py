"""PPO end to end on the tiny default, and the checks that stop a recipe naming the wrong kind of reward model."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from alignment_metrics import clean_form
from conftest import LORA, fresh_tiny_model, run_script, run_stage, start_script, wait_for_file, write_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from trellis.core.run_record import read_record
from trellis.data.arguments import DatasetSource
from trellis.data.sources import load_source
from trellis.data.tokenizer import train_bpe_tokenizer
from trellis.train.alignment import mean_reward, tokenize_prompts
from trellis.train.models import config_from_recipe


def held_out_reward(workdir: Path, policy_dir: Path, reward_dir: Path, response_length: int = 16) -> dict:
    """The held-out mean reward as the stages measure it, with the stage's token budget (PPO's
    response_length, GRPO's and RLOO's max_completion_length)."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    prompts = tokenize_prompts(
        load_source(DatasetSource(path=str(workdir / "data/tiny/prompts/test.jsonl"))), tokenizer
    )
    return mean_reward(
        AutoModelForCausalLM.from_pretrained(policy_dir),
        AutoModelForSequenceClassification.from_pretrained(reward_dir),
        tokenizer,
        prompts,
        response_length=response_length,
    )


def ppo_inputs(sft_model: Path, reward_model: Path, seed: int = 0) -> list[str]:
    return [
        "--model_name_or_path",
        str(sft_model),
        "--reward_model_path",
        str(reward_model),
        "--seed",
        str(seed),
    ]


@pytest.fixture(scope="module")
def full_ppo(workdir, sft_model, reward_model, seed, tmp_path_factory) -> Path:
    """recipes/tiny/ppo.yaml run from the tiny SFT policy at the learning rate the tests' SFT model (from
    scratch, not pretrained) needs, 3e-4 (measured: at 1e-4 and 3e-5 seed 4 did not learn to end its
    turn); the recipe's 3e-5 is tuned on the pretrained pipeline's SFT model: its output_dir."""
    out = tmp_path_factory.mktemp("ppo") / "full"
    run_stage(workdir, "ppo", out, *ppo_inputs(sft_model, reward_model, seed), "--learning_rate", "3e-4")
    return out


def check_saved_policy(workdir: Path, out: Path, reward_model: Path, record: dict) -> None:
    assert "objective/kl" in record["metrics"]["train"] and "objective/entropy" in record["metrics"]["train"]
    # Each update's time is split into generating replies and training on them.
    split = record["metrics"]["time_split"]
    assert split["generation_seconds"] > 0 and split["training_seconds"] > 0
    assert 0 < split["generation_fraction"] < 1
    # The saved policy reloads with from_pretrained and earns the recorded reward.
    assert "adapter_config.json" not in {p.name for p in out.iterdir()}
    measured = held_out_reward(workdir, out, reward_model)
    assert measured["mean_reward"] == pytest.approx(record["metrics"]["eval"]["mean_reward"], abs=0.05)


def record_rl_measures(record_property, workdir: Path, sft_model: Path, policy: Path, record: dict) -> None:
    """The held-out reward before and after, and the rule-judged clean answer form of both policies."""
    initial, final = record["metrics"]["initial"], record["metrics"]["eval"]
    for key in ("mean_reward", "eos_rate"):
        record_property(f"{key}_before", initial[key])
        record_property(f"{key}_after", final[key])
    record_property("clean_form_before", clean_form(workdir, sft_model))
    record_property("clean_form_after", clean_form(workdir, policy))


def test_value_model_trains_at_its_own_learning_rate(workdir, tmp_path):
    """`value_learning_rate` puts every value-model parameter, and only those, on its own rate."""
    import copy

    from datasets import Dataset

    from trellis.train.ppo_config import PPOConfig
    from trellis.train.ppo_trainer import ResumablePPOTrainer

    policy, tokenizer = fresh_tiny_model(workdir)
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    value_model = AutoModelForSequenceClassification.from_config(config)
    prompts = Dataset.from_dict({"input_ids": [tokenizer("Where does Kalo live?")["input_ids"]] * 4})
    args = PPOConfig(
        output_dir=str(tmp_path),
        learning_rate=1e-5,
        value_learning_rate=3e-4,
        per_device_train_batch_size=2,
        total_episodes=4,
        use_cpu=True,
        report_to="none",
    )
    trainer = ResumablePPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=copy.deepcopy(policy),
        reward_model=copy.deepcopy(value_model),
        value_model=value_model,
        train_dataset=prompts,
    )
    rate = {id(p): group["initial_lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {rate[id(p)] for p in value_model.parameters()} == {3e-4}
    assert {rate[id(p)] for p in policy.parameters()} == {1e-5}


@pytest.mark.slow
def test_ppo_raises_mean_reward_on_held_out_prompts(
    workdir, sft_model, reward_model, full_ppo, record_property
):
    record = read_record(str(full_ppo))
    initial, final = record["metrics"]["initial"], record["metrics"]["eval"]
    record_rl_measures(record_property, workdir, sft_model, full_ppo, record)
    # Measured, seeds 0-4, 1-2 threads (learning rate 3e-4): the share of held-out replies that end the turn
    # within the 16-token budget (the flaw: rambling runs past it) 0.49-0.61 -> 0.97-1.0; the held-out mean
    # reward rises on every seed, +0.37 / +2.82 / +3.25 with 1 thread, +0.37 / +2.64 / +2.94 with 2 (min /
    # median / max: seed 4's reward model rates this SFT model's answers low whatever their length). The
    # clean answer form does not rise (0-0.33 -> 0-0.28, recorded): this SFT model does not know the
    # facts, nor the reward model.
    assert final["eos_rate"] >= 0.9, (initial, final)
    assert final["mean_reward"] > initial["mean_reward"], (initial, final)
    check_saved_policy(workdir, full_ppo, reward_model, record)


@pytest.mark.slow
def test_ppo_training_reward_curve_reaches_the_report(full_ppo, tmp_path):
    from trellis.pipeline.report import plot_training_curves, trainer_log_history

    history = trainer_log_history(str(full_ppo))  # the run record's
    rewards = [entry["objective/rlhf_reward"] for entry in history if "objective/rlhf_reward" in entry]
    assert len(rewards) == 16  # one per update (TRL's PPO logs every update)
    assert plot_training_curves(history, "ppo: training", tmp_path / "ppo.png")
    assert (tmp_path / "ppo.png").stat().st_size > 1000


@pytest.mark.slow
def test_lora_ppo_merged_reloads(workdir, sft_model, reward_model, tmp_path):
    out = tmp_path / "ppo"
    text = (workdir / "recipes/tiny/ppo.yaml").read_text() + LORA + "merge_adapters: true\n"
    recipe = str(write_recipe(tmp_path / "ppo_lora.yaml", text))
    record = run_stage(workdir, "ppo", out, *ppo_inputs(sft_model, reward_model), recipe=recipe)
    check_saved_policy(workdir, out, reward_model, record)


@pytest.mark.slow
def test_killed_ppo_resumes_onto_the_uninterrupted_run(workdir, sft_model, reward_model, tmp_path):
    # 4 updates of 16 prompts with a checkpoint every 2: the killed run resumes after update 2.
    short = ["--total_episodes", "64", "--save_strategy", "steps", "--save_steps", "2"]
    arguments = [*ppo_inputs(sft_model, reward_model), *short]
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    command = ["ppo.py", "--config", "recipes/tiny/ppo.yaml", *arguments, "--output_dir", str(killed)]
    process = start_script(command, cwd=workdir)
    wait_for_file(killed / "checkpoint-2" / "trainer_state.json", process, timeout=900)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_record(str(killed))["status"] == "running"
    assert (killed / "checkpoint-2" / "value_model" / "model.safetensors").exists()

    resumed = run_stage(workdir, "ppo", killed, *arguments)
    assert resumed["resumed_from"] in ("checkpoint-2", "checkpoint-4")
    want = run_stage(workdir, "ppo", uninterrupted, *arguments)
    # The same updates from the same state: the resumed run ends where the uninterrupted one does
    # (measured on CPU: identical weights and metrics).
    assert resumed["metrics"]["initial"] == want["metrics"]["initial"]
    for key in ("mean_reward", "eos_rate"):
        assert resumed["metrics"]["eval"][key] == pytest.approx(want["metrics"]["eval"][key], abs=1e-4)
    for key in ("objective/scores", "objective/kl", "episode", "lr"):
        assert resumed["metrics"]["train"][key] == pytest.approx(want["metrics"]["train"][key], abs=1e-4)
    got, expected = load_file(killed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert got.keys() == expected.keys()
    assert max((got[name] - expected[name]).abs().max().item() for name in expected) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_grpo_and_rloo_against_the_reward_model(
    workdir, sft_model, reward_model, seed, tmp_path, stage, record_property
):
    """The same reward model and held-out measure as PPO, so the three online methods compare."""
    out = tmp_path / stage
    record = run_stage(
        workdir, stage, out, *ppo_inputs(sft_model, reward_model, seed), "--save_strategy", "no"
    )
    final = record["metrics"]["eval"]
    record_rl_measures(record_property, workdir, sft_model, out, record)
    # Not held to a gain: from the tests' SFT model (not pretrained, 150 steps) neither was measured to
    # move the held-out mean reward (seed 0: -0.741 -> -0.742 and -0.744) or the clean answer form
    # (0.063 -> 0.054 and 0.045); in the pipeline, from the pretrained SFT model, both raise
    # tiny_qa_clean a little (docs/test_bounds.md). They must still run, log and record the same measure.
    assert "reward" in record["metrics"]["train"]  # TRL's mean reward of the sampled replies
    budget = record["config"]["training"]["max_completion_length"]
    measured = held_out_reward(workdir, out, reward_model, response_length=budget)
    assert measured["mean_reward"] == pytest.approx(final["mean_reward"], abs=0.05)


@pytest.fixture(scope="module")
def wrong_reward_models(workdir, tmp_path_factory) -> dict[str, Path]:
    """Small untrained models of the wrong kind: a causal LM (no score head), and a reward model on another vocabulary."""
    root = tmp_path_factory.mktemp("wrong_reward")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "data/tiny/tokenizer")
    causal = AutoModelForCausalLM.from_config(
        config_from_recipe(str(workdir / "recipes/tiny/model.json"), tokenizer)
    )
    causal.save_pretrained(root / "causal")
    tokenizer.save_pretrained(root / "causal")
    other = train_bpe_tokenizer(["a different corpus gives a different vocabulary"] * 10, vocab_size=300)
    config = config_from_recipe(str(workdir / "recipes/tiny/model.json"), other)
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
