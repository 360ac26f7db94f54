"""Distillation of a teacher into a student, in one of two modes:
- logit: the student trained towards the teacher's next-token distributions on chat data's answers or on
  every token of plain text, with TRL's GKDTrainer (forward or reverse KL, or generalized Jensen-Shannon;
  on chat data optionally on the student's samples);
- cot (chain of thought): the student trained on the teacher's worked answers (the generate stage's
  output), with TRL's SFTTrainer; `answers_only` keeps only the final answers, the baseline.

    accelerate launch [--config_file accelerate_configs/ddp.yaml] scripts/distill.py \
        --config recipes/tiny/distill.yaml [--any_recipe_key value ...]

Reads the recipe strictly, loads the data (converted to `messages`) and the student; in logit mode checks
that the teacher shares the student's vocabulary (from its config, before its weights load) and loads the
teacher; evaluates the student, trains (resuming from the last checkpoint in output_dir), evaluates again,
and writes the student's model directory plus trellis_run.json to output_dir. Typical students: a pruned
model (scripts/prune.py) recovering from the model it was pruned from; a small model learning a large one's
reasoning (recipes/tiny/distill_cot.yaml).
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    script_args, training_args, model_args = parse_recipe("distill")

    import dataclasses

    from trellis.data import chat, sources
    from trellis.train import distillation, models
    from trellis.train.run import save_final_model, start_training_run, train_and_evaluate

    with start_training_run("distill", script_args, training_args, model_args) as record:
        tokenizer = models.load_tokenizer(model_args, training_args.trust_remote_code)
        dataset = sources.load_train_eval(script_args, seed=training_args.seed)
        record.set_input("datasets", sources.fingerprints(dataset))
        model = models.load_model(model_args, tokenizer, training_args)
        chat.apply_chat_template(model, tokenizer, model_args.chat_template)

        if training_args.mode == "cot":
            from trellis.train.sft import sft_trainer

            if training_args.answers_only:
                dataset = distillation.final_answers_only(dataset, training_args.answer_marker)
            trainer = sft_trainer(model, tokenizer, training_args, model_args, dataset, script_args)
        else:
            distillation.check_teacher(training_args, model.config.get_text_config().vocab_size)
            teacher_args = dataclasses.replace(
                model_args, model_name_or_path=training_args.teacher_model_name_or_path, model_config=None
            )
            dataset, collator = distillation.text_collator(training_args, dataset, tokenizer)
            teacher = models.load_model(
                teacher_args, tokenizer, trust_remote_code=training_args.trust_remote_code
            )
            trainer = distillation.GKDTrainer(
                model=model,
                teacher_model=teacher,
                args=training_args,
                data_collator=collator,
                train_dataset=dataset["train"],
                eval_dataset=dataset.get("test"),
                processing_class=tokenizer,
                peft_config=models.peft_config(model_args),
            )
        train_and_evaluate(trainer, record, script_args.eval_before_training)
        save_final_model(trainer, model_args)


if __name__ == "__main__":
    with exit_on_error():
        main()
