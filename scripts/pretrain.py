"""Causal-LM pretraining (from scratch or continued) on the data stage's packed blocks, with transformers' Trainer.

    accelerate launch [--config_file accelerate_configs/fsdp.yaml] scripts/pretrain.py \
        --config recipes/tiny/pretrain.yaml [--any_recipe_key value ...]

Reads the recipe strictly, prints the memory estimate and the effective distributed setup, trains
with warmup + cosine by default (resuming from the last checkpoint in output_dir), stops on NaN or
loss spikes before the bad update, and writes the model plus, if asked, its EMA and checkpoint-average
variants; raw, EMA and averaged weights are all evaluated on the validation split and recorded.
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    pretrain_args, training_args, model_args = parse_recipe("pretrain")

    from trellis.data.packing import load_packed
    from trellis.data.sources import fingerprints
    from trellis.train import models, pretraining
    from trellis.train.distributed import check_distributed_setup, shard_layout
    from trellis.train.memory import estimate_for_model
    from trellis.train.run import (
        logger,
        resume_checkpoint,
        save_final_model,
        start_training_run,
        train_and_evaluate,
    )

    with start_training_run("pretrain", pretrain_args, training_args, model_args) as record:
        packed, tokenizer = load_packed(pretrain_args.dataset_path)  # the tokenizer the data was packed with
        record.set_input("datasets", fingerprints(packed))
        model = models.load_model(model_args, tokenizer, training_args)

        ema = None
        if pretrain_args.ema_decay:
            ema = pretraining.EMACallback(
                pretrain_args.ema_decay,
                pretrain_args.ema_start_step,
                pretrain_args.ema_update_every,
                resume_from=resume_checkpoint(training_args),
            )
        trainer = pretraining.GuardedTrainer(
            model=model,
            args=training_args,
            train_dataset=packed["train"],
            eval_dataset=packed["validation"],
            data_collator=pretraining.BlockCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=[ema] if ema else None,
            loss_spike_factor=pretrain_args.loss_spike_factor,
        )
        check_distributed_setup(trainer.accelerator, training_args)
        estimate = estimate_for_model(
            model, training_args, len(packed["train"][0]["input_ids"]), trainer.accelerator
        )
        logger.info(estimate.table())
        record.data["memory_estimate_gib"] = estimate.as_gib()

        train_and_evaluate(trainer, record)
        record.data["shard_layout"] = shard_layout(trainer.accelerator, trainer.model)
        save_final_model(trainer, model_args)

        # The alternatives to the last raw weights, each saved and evaluated; the user keeps whichever is best.
        pretraining.evaluate_weight_variants(trainer, record, ema, pretrain_args.average_last_checkpoints)


if __name__ == "__main__":
    with exit_on_error():
        main()
