"""Loss-token log-probabilities computed at once equal TRL's: SFT's chunked loss, metrics and gradients, and the
losses and gradients of DPO, KTO and ORPO without TRL's per-sequence loop."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import fresh_stage_model, recorded_differences, stage_trainer, tokens_per_call
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trellis.train import last_layer
from trellis.train.arguments import ModelArguments
from trellis.train.lm_head_loss import compute_small_logits_at_once, log_probs_at_once
from trellis.train.models import load_model


def _probe_batch(padding_free: bool = False) -> dict:
    """Four conversations of different lengths (padded, or packed into one row), the loss on their
    completions only."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for prompt, completion in ((9, 130), (14, 3), (5, 121), (20, 42)):
        ids = torch.randint(3, 200, (prompt + completion,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(examples)


def _trainers(workdir):
    """Two SFT trainers on copies of one tiny model: TRL's chunked loss, and the at-once variant."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "data" / "tiny" / "tokenizer")
    args = SFTConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none")
    torch.manual_seed(0)
    model_args = ModelArguments(
        model_config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}
    )
    model = load_model(model_args, tokenizer, args)
    unused = Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    chunked, at_once = (
        SFTTrainer(model=copy.deepcopy(model), args=args, train_dataset=unused, processing_class=tokenizer)
        for _ in range(2)
    )
    return chunked, at_once


def _loss_and_gradients(trainer, batch, num_items_in_batch=None):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    logged = getattr(trainer, "_metrics", {}).get("train", {})  # (ORPO logs through its own store)
    metrics = {name: values[-1] for name, values in logged.items() if values}
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}, metrics


def _head_calls(trainer) -> list:
    """Calls of the LM head module: the at-once path runs it, TRL's chunks use its weight directly."""
    calls = []
    trainer.model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_loss_tokens_logits_at_once_give_trls_loss_metrics_and_gradients(
    workdir, padding_free, checkpointing
):
    chunked, at_once = _trainers(workdir)
    if checkpointing:  # recomputed in the backward pass, the last layer runs whole
        for trainer in (chunked, at_once):
            trainer.model.gradient_checkpointing_enable({"use_reentrant": False})
    compute_small_logits_at_once(at_once, max_mib=64)
    calls = _head_calls(at_once)
    last_mlp_tokens = tokens_per_call(at_once.model.model.layers[-1].mlp)
    batch = _probe_batch(padding_free)
    num_loss_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert num_loss_tokens > 256  # TRL's chunks: more than one

    for num_items_in_batch in (
        None,
        torch.tensor(2 * num_loss_tokens),
    ):  # alone; half of an accumulated batch
        expected_loss, expected_grads, expected_metrics = _loss_and_gradients(
            chunked, batch, num_items_in_batch
        )
        loss, grads, metrics = _loss_and_gradients(at_once, batch, num_items_in_batch)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert metrics.keys() == expected_metrics.keys() >= {"entropy", "mean_token_accuracy"}
        for name, value in metrics.items():
            assert value == pytest.approx(expected_metrics[name], rel=1e-5), name
    assert len(calls) == 2
    # After its attention the last layer ran on the loss tokens alone (trellis.train.last_layer); checkpointed,
    # whole, in the forward pass and again in the backward pass.
    if checkpointing:
        assert last_mlp_tokens == [batch["input_ids"].numel()] * 4
    else:
        assert last_mlp_tokens == [num_loss_tokens] * 2


def test_logits_over_the_budget_go_through_trls_chunks(workdir):
    chunked, at_once = _trainers(workdir)
    vocab = at_once.model.get_output_embeddings().weight.shape[0]
    batch = _probe_batch()
    num_loss_tokens = int((batch["labels"][:, 1:] != -100).sum())
    compute_small_logits_at_once(at_once, max_mib=(num_loss_tokens - 1) * vocab * 4 / 2**20)
    calls = _head_calls(at_once)

    loss, _, _ = _loss_and_gradients(at_once, batch)
    assert calls == []
    assert loss == pytest.approx(_loss_and_gradients(chunked, batch)[0], rel=1e-6)


@pytest.mark.parametrize("stage", ["dpo", "kto", "orpo"])
def test_log_probs_at_once_give_trls_preference_losses_and_gradients_without_its_loop(
    workdir, seed, stage, monkeypatch, record_property
):
    from trl.trainer import utils as trl_utils

    model, tokenizer = fresh_stage_model(stage, workdir, seed)
    looped, at_once = (stage_trainer(stage, workdir, copy.deepcopy(model), tokenizer) for _ in range(2))
    log_probs_at_once(at_once, max_mib=64)
    batch = next(iter(looped.get_train_dataloader()))
    loops = []
    selective_log_softmax = trl_utils.selective_log_softmax
    monkeypatch.setattr(
        trl_utils, "selective_log_softmax", lambda *args: loops.append(1) or selective_log_softmax(*args)
    )

    expected_loss, expected_grads, _ = _loss_and_gradients(looped, copy.deepcopy(batch))
    assert loops  # the other trainer still takes TRL's loop
    loops.clear()
    loss, grads, _ = _loss_and_gradients(at_once, copy.deepcopy(batch))

    assert not loops
    loss_difference, gradient_difference = recorded_differences(
        record_property, loss, expected_loss, grads, expected_grads
    )
    # BOUND: TRL's formula term by term, one logsumexp call instead of one per row. Measured (seeds 0-2
    # x 1, 2 threads, AMD EPYC with AVX2 and with AVX-512): loss and gradient differences 0 in all 36
    # runs, bitwise equal (docs/test_bounds.md, LP).
    assert loss_difference < 1e-6
    assert gradient_difference < 1e-5


def test_a_decoder_layer_whose_code_is_not_llamas_runs_whole(workdir):
    _, at_once = _trainers(workdir)
    decoder = at_once.model.model

    class OtherLayer(type(decoder.layers[-1])):
        def forward(self, *args, **kwargs):  # the same block, but not Llama's code: not split
            return super().forward(*args, **kwargs)

    decoder.layers[-1].__class__ = OtherLayer
    last_mlp_tokens = tokens_per_call(at_once.model.model.layers[-1].mlp)
    inputs = {name: _probe_batch()[name] for name in ("input_ids", "attention_mask")}
    positions = torch.tensor([3, 50, 140, 300])

    hidden = last_layer.hidden_states_at(decoder, positions, **inputs)

    assert torch.equal(hidden, decoder(**inputs).last_hidden_state.flatten(0, 1)[positions])
    assert last_mlp_tokens == [inputs["input_ids"].numel()] * 2
