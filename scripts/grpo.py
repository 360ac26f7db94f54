"""Online RL with TRL's GRPOTrainer against a trained reward model: the policy learns to earn its score.

    accelerate launch scripts/grpo.py --config recipes/tiny/grpo.yaml [--any_recipe_key value ...]

GRPO samples `num_generations` replies to each prompt and uses their rewards, relative to the
group's mean, as the advantage: no value model. The policy is `model_name_or_path` (usually the
SFT output), the reward model `reward_model_path` (the reward stage's output), checked before any
weights load like PPO's (score head, same tokenizer as the policy). TRL logs the mean reward of
the sampled replies (`reward`) and, with `beta` > 0, the KL to the reference. The mean reward of
greedy replies to the held-out prompts is recorded before and after training in trellis_run.json
(`initial.mean_reward`, `eval.mean_reward`), measured exactly as for PPO and RLOO so runs compare.

RLOO (REINFORCE leave-one-out: each reply's baseline is the mean reward of the other replies to the same
prompt) runs this same flow with TRL's RLOOTrainer: `--stage rloo`, or a recipe file named rloo*.yaml:

    accelerate launch scripts/grpo.py --config recipes/tiny/rloo.yaml
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe, stage_from_command_line


def main() -> None:
    stage = stage_from_command_line("grpo")
    script_args, training_args, model_args = parse_recipe(stage)

    from trl import GRPOTrainer, RLOOTrainer

    from trellis.data import chat, sources
    from trellis.train import alignment, models
    from trellis.train.run import save_final_model, start_training_run

    with start_training_run(stage, script_args, training_args, model_args) as record:
        tokenizer = models.load_tokenizer(model_args, training_args.trust_remote_code, padding_side="left")
        alignment.check_padding(tokenizer)
        alignment.check_reward_model(script_args.reward_model_path, tokenizer)
        record.set_input("reward_model", script_args.reward_model_path)

        dataset = sources.load_train_eval(script_args, seed=training_args.seed, task="prompts")
        record.set_input("datasets", sources.fingerprints(dataset))
        policy = models.load_model(model_args, tokenizer, training_args)
        chat.apply_chat_template(policy, tokenizer, model_args.chat_template)
        reward_model = alignment.load_scoring_model(
            script_args.reward_model_path, model_args.dtype, training_args.trust_remote_code
        )

        trainer_class = {"grpo": GRPOTrainer, "rloo": RLOOTrainer}[stage]  # the same arguments
        trainer = trainer_class(
            model=policy,
            reward_funcs=reward_model,
            args=training_args,
            train_dataset=dataset["train"],
            eval_dataset=dataset.get("test"),
            processing_class=tokenizer,
            reward_processing_classes=tokenizer,
            peft_config=models.peft_config(model_args),
        )
        held_out = alignment.tokenize_prompts(dataset["test"], tokenizer) if "test" in dataset else None
        alignment.train_with_mean_reward(
            trainer,
            record,
            reward_model,
            held_out,
            training_args.max_completion_length,
            script_args.eval_before_training,
        )
        save_final_model(trainer, model_args)


if __name__ == "__main__":
    with exit_on_error():
        main()
