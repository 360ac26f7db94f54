"""Supervised fine-tuning (SFT) on chat data with TRL's SFTTrainer: full, LoRA or QLoRA.

    accelerate launch [--config_file accelerate_configs/ddp.yaml] scripts/sft.py \
        --config recipes/tiny/sft.yaml [--any_recipe_key value ...]

Reads the recipe strictly (a bad key fails before anything loads), loads the data (converted to
`messages`) and the model, checks that the end-of-turn token is trained, evaluates the starting
model, trains (resuming from the last checkpoint in output_dir), evaluates again, and writes a
model directory plus trellis_run.json to output_dir.
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    script_args, training_args, model_args = parse_recipe("sft")

    from trl import SFTTrainer

    from trellis.data import chat, sources
    from trellis.train import lm_head_loss, models
    from trellis.train.run import save_final_model, start_training_run, train_and_evaluate

    with start_training_run("sft", script_args, training_args, model_args) as record:
        dataset = sources.load_train_eval(script_args, seed=training_args.seed)
        record.set_input("datasets", sources.fingerprints(dataset))
        tokenizer = models.load_tokenizer(model_args, training_args.trust_remote_code)
        model = models.load_model(model_args, tokenizer, training_args)
        chat.apply_chat_template(model, tokenizer, model_args.chat_template)

        trainer = SFTTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset["train"],
            eval_dataset=dataset.get("test"),
            processing_class=tokenizer,
            peft_config=models.peft_config(model_args),
        )
        lm_head_loss.compute_small_logits_at_once(trainer, script_args.unchunked_loss_max_mib)
        chat.check_eos_in_loss_mask(trainer)
        train_and_evaluate(trainer, record, script_args.eval_before_training)
        save_final_model(trainer, model_args)


if __name__ == "__main__":
    with exit_on_error():
        main()
