"""The benchmark's arithmetic: tokens counted per step, padding efficiency, FLOPs, ratios, equal-token loss."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from trellis.train import benchmark
from trellis.train.throughput import CountingCollator, ThroughputMeter, flops_per_token, take_counts


class _Args:
    device = torch.device("cpu")


def _pad_collator(examples):
    longest = max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] + [0] * (longest - len(e["input_ids"])) for e in examples]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(ids) != 0}


def test_meter_counts_real_and_processed_tokens_of_the_micro_batches_each_step_consumed():
    collator = CountingCollator(_pad_collator)
    meter = ThroughputMeter(warmup_steps=1)
    meter.on_train_begin(_Args(), None, None)
    # The dataloader builds batches ahead of the steps (and in worker processes when it has any):
    # a step counts the batches the training step took, read off the batches themselves.
    batches = [
        collator([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2, 3, 4, 5]}]),  # 8 real of 2 x 5
        collator([{"input_ids": [7] * 4}, {"input_ids": [7] * 4}]),  # 8 real of 8
        collator([{"input_ids": [5]}, {"input_ids": [5, 6]}]),  # 3 real of 2 x 2
    ]
    meter.count(take_counts(batches[0]))
    meter.on_step_end(_Args(), None, None)
    for batch in batches[1:]:  # step 2: two micro-batches (gradient accumulation)
        meter.count(take_counts(batch))
    meter.on_step_end(_Args(), None, None)

    assert all(set(batch) == {"input_ids", "attention_mask"} for batch in batches)  # counts taken out
    first, second = meter.steps
    assert (first.real_tokens, first.processed_tokens) == (8, 10)
    assert (second.real_tokens, second.processed_tokens) == (11, 12)
    figures = meter.summary()  # the first step is warm-up
    assert figures["padding_efficiency"] == pytest.approx(11 / 12)
    assert figures["tokens_per_second"] == pytest.approx(11 / second.seconds)
    assert figures["measured_steps"] == 1


def test_steps_holding_an_evaluation_are_not_measured():
    collator = CountingCollator(_pad_collator)
    meter = ThroughputMeter(warmup_steps=0)
    meter.on_train_begin(_Args(), None, None)
    for step in range(3):
        meter.count(take_counts(collator([{"input_ids": [1, 2]}])))
        meter.on_step_end(_Args(), None, None)
        if step == 0:
            meter.on_evaluate(_Args(), None, None)  # runs after step 1, inside step 2's interval
    assert len(meter.steps) == 2


def test_flops_per_token_of_llama_3_2_1b_matches_its_parameter_count():
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    )
    # 1.236e9 parameters (Llama-3.2-1B, tied embeddings), less the 16 x 2 x 2048 norm weights + final norm.
    matmul_params = 1_235_814_400 - (2 * 16 + 1) * 2048
    attention = 12 * 16 * 2048 * 2048
    assert flops_per_token(config, 2048) == 6 * matmul_params + attention


def test_ratios_are_per_pair_with_median_and_spread():
    mine = [{"tokens_per_second": 300.0}, {"tokens_per_second": 200.0}, {"tokens_per_second": 330.0}]
    theirs = [{"tokens_per_second": 100.0}, {"tokens_per_second": 100.0}, {"tokens_per_second": 110.0}]
    ratio = benchmark.ratios(mine, theirs)["tokens_per_second"]
    assert ratio == {"median": 3.0, "min": 2.0, "max": 3.0}


def test_loss_at_equal_tokens_uses_the_tokens_both_runs_saw():
    pair = {
        "trellis": {"figures": {}, "loss_curve": [[100, 5.0], [200, 4.0], [300, 3.0], [400, 2.0]]},
        "baseline": {"figures": {}, "loss_curve": [[50, 6.0], [100, 5.5], [150, 4.5], [200, 4.2]]},
    }
    benchmark.add_equal_token_loss(pair)
    # Both saw 200 tokens; each run's mean loss over its logs in the last 20 % of them, (160, 200].
    assert pair["trellis"]["figures"]["loss_at_equal_tokens"] == 4.0
    assert pair["baseline"]["figures"]["loss_at_equal_tokens"] == 4.2


def test_baseline_resets_only_the_speed_keys_the_recipe_changed():
    from trellis.stages import stage_types

    recipe = {
        "packing": True,
        "activation_checkpointing": False,
        "loss_type": "nll",
        "unchunked_loss_max_mib": 64,
        "learning_rate": 1e-3,
        "optim": "adamw_torch_fused",
        "attn_implementation": "sdpa",
    }
    changed = benchmark.baseline_overrides(stage_types("sft"), recipe)
    # TRL's SFT default: activation checkpointing on (its gradient_checkpointing alias), chunked NLL
    # in 256-token chunks.
    assert changed == {
        "packing": False,
        "activation_checkpointing": True,
        "loss_type": "chunked_nll",
        "unchunked_loss_max_mib": 0.0,
    }


def test_a_loss_type_that_changes_the_loss_is_no_speed_setting():
    from trl import DPOConfig

    from trellis.data.arguments import ScriptArguments
    from trellis.train.arguments import ModelArguments

    changed = benchmark.baseline_overrides(
        (ScriptArguments, DPOConfig, ModelArguments), {"loss_type": ["ipo"]}
    )
    assert changed == {}


def test_benchmark_of_a_tiny_run_counts_every_token_and_compares_pairs(workdir, tmp_path):
    import json

    from conftest import run_script

    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(
        f"dataset_path: {tmp_path / 'synthetic'}\n"
        f"model_config: {workdir / 'recipes' / 'tiny' / 'model.json'}\n"
        "output_dir: unused\nper_device_train_batch_size: 4\nlearning_rate: 1.0e-3\n"
        "optim: adamw_torch\n"  # a speed key away from the default (adamw_torch_fused): the baseline resets it
        "dataloader_num_workers: 1\n"  # batches (and their token counts) built in another process
        "use_cpu: true\nbf16: false\nseed: 0\n"
    )
    report = tmp_path / "benchmark.json"
    result = run_script(
        [
            "benchmark.py",
            *("--config", str(recipe), "--stage", "pretrain", "--synthetic_data", "300,32,64"),
            *("--steps", "6", "--repeats", "1", "--vs", "baseline"),
            *("--work_dir", str(tmp_path / "runs"), "--json", str(report)),
        ],
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        'the trainer\'s defaults for {"optim": "adamw_torch_fused", "dataloader_num_workers": 0}'
        in result.stdout
    )
    assert "| tokens_per_second (higher is better) |" in result.stdout
    measured = json.loads(report.read_text())
    for name in ("trellis", "baseline"):
        (figures,) = measured["runs"][name]
        # 6 steps, the first 3 not measured; each step is 4 full blocks of 32 tokens, no padding.
        assert figures["measured_steps"] == 3
        assert figures["measured_tokens"] == 3 * 4 * 32
        assert figures["padding_efficiency"] == 1.0
        assert figures["peak_rss_gib"] > 0.1
    (mine,), (theirs,) = measured["runs"]["trellis"], measured["runs"]["baseline"]
    ratio = measured["ratios"]["tokens_per_second"]
    assert ratio["median"] == pytest.approx(mine["tokens_per_second"] / theirs["tokens_per_second"])


def test_preference_batches_count_the_tokens_their_attention_mask_keeps():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = CountingCollator(DataCollatorForPreference(pad_token_id=0))
    batch = take_counts(collator([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}]))
    # Processed: prompt + chosen and prompt + rejected, padded to 5 each; real: 3 + 5.
    assert (batch.real, batch.processed, batch.row_length) == (8, 10, 5)
