"""Direct preference optimisation with TRL's DPOTrainer: DPO, IPO, hinge, robust and TRL's other losses.

    accelerate launch scripts/dpo.py --config recipes/tiny/dpo.yaml [--any_recipe_key value ...]

The policy and, unless LoRA is on (then the base without adapters is the reference) or
`precompute_ref_log_probs` is set, a frozen copy as the reference both start from
`model_name_or_path` (usually the SFT output). `loss_type` and `beta` come from the recipe. The
held-out log-probabilities of chosen and rejected answers (`eval_logps/chosen`,
`eval_logps/rejected`) and the implicit-reward accuracy and margin are recorded before and after
training in trellis_run.json.

KTO and ORPO run this same flow with TRL's KTOTrainer and ORPOTrainer: the stage kind is `--stage kto`
(or `orpo`), or the one the recipe's file name starts with (recipes/tiny/kto.yaml):

    accelerate launch scripts/dpo.py --config recipes/tiny/kto.yaml
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe, stage_from_command_line


def _trainer_class(stage: str):
    """The TRL trainer of an offline preference stage; KTO and ORPO run through this script too."""
    if stage == "kto":
        from trl import KTOTrainer as trainer_class
    elif stage == "orpo":
        from trellis.train.orpo import ORPOTrainer as trainer_class
    else:
        from trl import DPOTrainer as trainer_class
    return trainer_class


def main() -> None:
    stage = stage_from_command_line("dpo")
    script_args, training_args, model_args = parse_recipe(stage)
    trainer_class = _trainer_class(stage)

    from trellis.data import chat, sources
    from trellis.train import lm_head_loss, models, padding_free
    from trellis.train.run import save_final_model, start_training_run, train_and_evaluate

    with start_training_run(stage, script_args, training_args, model_args) as record:
        # KTO learns from answers labelled good or bad: preference pairs are read unpaired.
        task = "unpaired" if stage == "kto" else "preference"
        dataset = sources.load_train_eval(script_args, seed=training_args.seed, task=task)
        record.set_input("datasets", sources.fingerprints(dataset))
        tokenizer = models.load_tokenizer(model_args, training_args.trust_remote_code)
        model = models.load_model(model_args, tokenizer, training_args)
        chat.apply_chat_template(model, tokenizer, model_args.chat_template)

        trainer = trainer_class(
            model=model,
            args=training_args,
            train_dataset=dataset["train"],
            eval_dataset=dataset.get("test"),
            processing_class=tokenizer,
            peft_config=models.peft_config(model_args),
        )
        lm_head_loss.log_probs_at_once(trainer, script_args.unchunked_loss_max_mib)
        if script_args.padding_free_forward:
            padding_free.pack_trainer_models(trainer)
        train_and_evaluate(trainer, record, script_args.eval_before_training)
        save_final_model(trainer, model_args)


if __name__ == "__main__":
    with exit_on_error():
        main()
