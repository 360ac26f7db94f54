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

    from trellis.data import chat, sources
    from trellis.train import models
    from trellis.train.run import save_final_model, start_training_run, train_and_evaluate
    from trellis.train.sft import sft_trainer

    with start_training_run("sft", script_args, training_args, model_args) as record:
        dataset = sources.load_train_eval(script_args, seed=training_args.seed)
        record.set_input("datasets", sources.fingerprints(dataset))
        tokenizer = models.load_tokenizer(model_args, training_args.trust_remote_code)
        model = models.load_model(model_args, tokenizer, training_args)
        chat.apply_chat_template(model, tokenizer, model_args.chat_template)

        trainer = sft_trainer(model, tokenizer, training_args, model_args, dataset, script_args)
        train_and_evaluate(trainer, record, script_args.eval_before_training)
        save_final_model(trainer, model_args)


if __name__ == "__main__":
    with exit_on_error():
        main()
