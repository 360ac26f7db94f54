"""Reward model training on preference pairs with TRL's RewardTrainer: full, LoRA or QLoRA.

    accelerate launch scripts/reward.py --config recipes/tiny/reward.yaml [--any_recipe_key value ...]

The reward model is `model_name_or_path` (usually the SFT output) with a new one-output score head
(AutoModelForSequenceClassification, num_labels=1), trained so that the chosen answer of each pair
scores above the rejected one. Held-out pairwise accuracy and mean margin (chosen minus rejected
score) are recorded before and after training in trellis_run.json (`eval_accuracy`, `eval_margin`).
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    script_args, training_args, model_args = parse_recipe("reward")

    from transformers import AutoModelForSequenceClassification
    from trl import RewardTrainer

    from trellis.data import chat, sources
    from trellis.train import alignment, models, padding_free
    from trellis.train.run import save_final_model, start_training_run, train_and_evaluate

    with start_training_run("reward", script_args, training_args, model_args) as record:
        dataset = sources.load_train_eval(script_args, seed=training_args.seed, task="preference")
        record.set_input("datasets", sources.fingerprints(dataset))
        tokenizer = models.load_tokenizer(model_args, training_args.trust_remote_code)
        model = alignment.load_reward_model(model_args, tokenizer, training_args)
        chat.apply_chat_template(model, tokenizer, model_args.chat_template)

        trainer = RewardTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset["train"],
            eval_dataset=dataset.get("test"),
            processing_class=tokenizer,
            peft_config=alignment.reward_peft_config(model_args),
        )
        alignment.match_score_head_to_activations(trainer.model, model_args.dtype)
        if script_args.padding_free_forward:
            padding_free.pack_trainer_models(trainer)
        train_and_evaluate(trainer, record, script_args.eval_before_training)
        save_final_model(trainer, model_args, AutoModelForSequenceClassification, num_labels=1)


if __name__ == "__main__":
    with exit_on_error():
        main()
