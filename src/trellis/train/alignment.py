"""What the alignment stages share: reward models, their checks, prompts, and measuring reward.

A reward model is an `AutoModelForSequenceClassification` with one output (num_labels=1) that
reads the policy's tokens. PPO passes the policy's token ids straight to it, so a reward model
with another vocabulary would score garbage without any error; `check_reward_model` stops such a
recipe (and a causal LM without a score head) before any weights load.
"""

from __future__ import annotations

import logging
import os

from trellis.core.errors import TrellisError
from trellis.train.models import load_model

logger = logging.getLogger(__name__)


class AlignmentError(TrellisError):
    """The models of an alignment stage do not fit together."""


def load_reward_model(model_args, tokenizer, training_args):
    """A reward model to train: `model_name_or_path` (e.g. the SFT output) with a fresh one-output score head."""
    from transformers import AutoModelForSequenceClassification

    model = load_model(
        model_args, tokenizer, training_args, model_class=AutoModelForSequenceClassification, num_labels=1
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return model


def reward_peft_config(model_args):
    """LoRA for a reward model: the task type makes peft train and save the new score head in full."""
    from trellis.train.models import peft_config

    config = peft_config(model_args)
    if config is not None:
        config.task_type = "SEQ_CLS"
    return config


def match_score_head_to_activations(model, dtype: str | None) -> None:
    """QLoRA reward models: give the trained score head the dtype of the activations it reads.

    TRL casts every trainable weight of a quantized model to bfloat16 (the QLoRA recipe). LoRA layers
    cast their input to match, but the score head is trained in full (peft's modules_to_save) and
    would get hidden states in the compute dtype (the recipe's `dtype`), failing with a dtype mismatch.
    """
    from trellis.train.models import torch_dtype

    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        return
    compute_dtype = torch_dtype(dtype)
    compute_dtype = None if compute_dtype in (None, "auto") else compute_dtype
    for name, param in model.named_parameters():
        if param.requires_grad and ".score." in f".{name}" and compute_dtype is not None:
            param.data = param.data.to(compute_dtype)


def check_reward_model(path: str, policy_tokenizer, key: str = "reward_model_path") -> None:
    """Fail fast unless `path` is a one-output sequence-classification model on the policy's vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    fix = "train one with scripts/reward.py (with `merge_adapters: true` if it uses LoRA) and point to its output_dir"
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json")
    ):
        raise AlignmentError(
            f"{key}: {path!r} holds LoRA adapters only; a reward model must be a full model: {fix}"
        )
    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise AlignmentError(
            f"{key}: {path!r} is not a reward model: its architecture is {', '.join(architectures) or 'unknown'}, "
            f"a causal LM without a score head (a reward model is an AutoModelForSequenceClassification "
            f"with num_labels=1); {fix}"
        )
    if config.num_labels != 1:
        raise AlignmentError(
            f"{key}: {path!r} is a classifier with {config.num_labels} labels; a reward model has one "
            f"output (num_labels=1); {fix}"
        )
    reward_vocab, policy_vocab = AutoTokenizer.from_pretrained(path).get_vocab(), policy_tokenizer.get_vocab()
    if reward_vocab != policy_vocab:
        differing = sorted(set(reward_vocab.items()) ^ set(policy_vocab.items()), key=str)[:3]
        raise AlignmentError(
            f"{key}: the tokenizer of {path!r} does not match the policy's ({len(reward_vocab)} vs "
            f"{len(policy_vocab)} tokens; e.g. {differing}): the reward model reads the policy's token ids, "
            f"so it must be trained from the same tokenizer; {fix} from the policy's SFT model"
        )


def load_scoring_model(path: str, dtype: str | None, trust_remote_code: bool = False):
    """A trained reward model (or a value model initialised from one), checked by `check_reward_model`."""
    from transformers import AutoModelForSequenceClassification

    from trellis.train.models import torch_dtype

    return AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, num_labels=1
    )


def tokenize_prompts(dataset, tokenizer):
    """Conversational prompts -> `input_ids` ending in the assistant's turn opener, as PPO generates from."""

    def tokenize(example):
        prompt = example["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return {"input_ids": ids["input_ids"]}

    return dataset.map(tokenize, remove_columns=dataset.column_names, desc="Tokenizing prompts")


def check_padding(tokenizer) -> None:
    """Online RL marks padding by the pad token id, so a pad token that is also EOS would hide every end of turn."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise AlignmentError(
            f"online RL (PPO, GRPO, RLOO) needs a pad token distinct from the end-of-turn token "
            f"{tokenizer.eos_token!r}: replies are scored at their last non-pad token, so a pad id that is also "
            "the end of turn would erase it. Fix: add a pad token to the tokenizer "
            "(tokenizer.add_special_tokens({'pad_token': '<|pad|>'})) and save it with the SFT model"
        )


def mean_reward(policy, reward_model, tokenizer, prompts, response_length: int, batch_size: int = 32) -> dict:
    """Greedy replies of `policy` to tokenized `prompts`, scored by `reward_model`: mean score and EOS rate.

    Replies are cut after the first end-of-turn token, exactly as PPO scores them during training.
    """
    import torch
    from trl.experimental.utils import first_true_indices, get_reward

    was_training = policy.training
    policy.eval()
    scores, ended = [], []
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer.pad(
            {"input_ids": prompts[start : start + batch_size]["input_ids"]},
            padding=True,
            padding_side="left",  # generation continues each prompt at the right edge
            return_tensors="pt",
        ).to(policy.device)
        with torch.no_grad():
            output = policy.generate(
                **batch,
                max_new_tokens=response_length,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            context = batch["input_ids"].shape[1]
            response = output[:, context:]
            after_eos = torch.arange(response.shape[1], device=response.device) > first_true_indices(
                response == eos
            ).unsqueeze(1)
            response = response.masked_fill(after_eos, pad)
            _, score, _ = get_reward(reward_model, torch.cat([batch["input_ids"], response], 1), pad, context)
        scores += score.tolist()
        ended += (response == eos).any(1).tolist()
    policy.train(was_training)
    return {"mean_reward": sum(scores) / len(scores), "eos_rate": sum(ended) / len(ended)}


def train_with_mean_reward(
    trainer, record, reward_model, held_out, response_length: int, eval_before: bool
) -> None:
    """Train an online-RL trainer (resuming from the last checkpoint) with the held-out mean reward before and after.

    The measure is `mean_reward` for every online stage (PPO, GRPO, RLOO), so their run records compare.
    """
    from trellis.train import throughput
    from trellis.train.run import checkpoint_to_resume, log_change

    model = trainer.accelerator.unwrap_model(trainer.model)
    policy = getattr(model, "policy", model)  # PPO trains policy and value model together

    def measure() -> dict:
        return mean_reward(policy, reward_model, trainer.processing_class, held_out, response_length)

    checkpoint = checkpoint_to_resume(trainer, record)
    if not checkpoint and held_out is not None and eval_before:
        record.set_metrics("initial", measure())
    time_split = throughput.GenerationTimeSplit(policy)  # logged per update, totals in the record
    trainer.add_callback(time_split)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    logged = [entry for entry in trainer.state.log_history if "train_runtime" not in entry]
    record.set_metrics("train", {**(logged[-1] if logged else {}), **(result.metrics if result else {})})
    record.data["log_history"] = (
        logged  # the whole run's curves: the Trainer saves its state only in checkpoints
    )
    record.set_metrics("time_split", time_split.summary())
    if held_out is not None:
        record.set_metrics("eval", measure())
    log_change(record, "mean_reward")
