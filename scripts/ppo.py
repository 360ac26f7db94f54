"""RLHF with TRL's PPOTrainer (trl.experimental.ppo, TRL 1.12): the policy learns to earn the reward model's score.

    accelerate launch scripts/ppo.py --config recipes/tiny/ppo.yaml [--any_recipe_key value ...]

The policy is `model_name_or_path` (usually the SFT output); the reward model is `reward_model_path`
(the reward stage's output) and the value model starts from `value_model_path`, by default the
reward model. The reference policy is a frozen copy of the policy, or, with LoRA, the policy with
its adapters switched off. The reward and value models are checked (score head, same tokenizer as
the policy) before any weights load. PPO logs mean reward (`objective/scores`), KL, entropy and
sample generations while it trains; the mean reward of greedy replies to the held-out prompts is
recorded before and after training in trellis_run.json (`initial`, `eval`). A rerun resumes from
the last checkpoint (policy, value model, optimizer, scheduler, RNG, updates done): TRL's
PPOTrainer cannot, so trellis.ppo_trainer.ResumablePPOTrainer adds it.
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    script_args, training_args, model_args = parse_recipe("ppo")

    from trellis.data import chat, sources
    from trellis.train import alignment, models
    from trellis.train.ppo_trainer import ResumablePPOTrainer
    from trellis.train.run import save_final_model, start_training_run

    with start_training_run("ppo", script_args, training_args, model_args) as record:
        # PPO generates from the right edge of each prompt: pad on the left.
        tokenizer = models.load_tokenizer(model_args, training_args.trust_remote_code, padding_side="left")
        alignment.check_padding(tokenizer)
        value_model_path = script_args.value_model_path or training_args.reward_model_path
        alignment.check_reward_model(training_args.reward_model_path, tokenizer)
        alignment.check_reward_model(value_model_path, tokenizer, key="value_model_path")
        record.set_input("reward_model", training_args.reward_model_path)
        record.set_input("value_model", value_model_path)

        dataset = sources.load_train_eval(script_args, seed=training_args.seed, task="prompts")
        record.set_input("datasets", sources.fingerprints(dataset))
        policy = models.load_model(model_args, tokenizer, training_args)
        chat.apply_chat_template(policy, tokenizer, model_args.chat_template)
        prompts = {split: alignment.tokenize_prompts(ds, tokenizer) for split, ds in dataset.items()}
        reward_model = alignment.load_scoring_model(
            training_args.reward_model_path, model_args.dtype, training_args.trust_remote_code
        )
        value_model = alignment.load_scoring_model(
            value_model_path, model_args.dtype, training_args.trust_remote_code
        )
        # With LoRA the reference is the policy with its adapters off: no second copy in memory.
        ref_model = None if model_args.use_peft else models.load_model(model_args, tokenizer, training_args)

        trainer = ResumablePPOTrainer(
            args=training_args,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_model,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=prompts["train"],
            eval_dataset=prompts.get("test"),
            peft_config=models.peft_config(model_args),
        )
        alignment.train_with_mean_reward(
            trainer,
            record,
            reward_model,
            prompts.get("test"),
            training_args.response_length,
            script_args.eval_before_training,
        )
        save_final_model(trainer, model_args)


if __name__ == "__main__":
    with exit_on_error():
        main()
