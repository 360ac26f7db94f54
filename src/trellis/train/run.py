"""The parts every training stage shares: logging, resuming, training with before/after evaluation, saving."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from transformers import TrainerCallback

from trellis.core.hub import model_card, upload_model, vllm_usage
from trellis.core.recipe import looks_like_local_path
from trellis.core.run_record import RunRecord, checkpoints_by_step, read_record
from trellis.core.tables import markdown_table, number
from trellis.data.bad_records import check_lengths, reporting_bad_records
from trellis.train import throughput
from trellis.train.models import merge_adapters
from trellis.train.parallelism import saved_as_plain_model

logger = logging.getLogger("trellis")


def setup_logging(training_args=None) -> None:
    """Progress lines on the main process; the libraries at the training arguments' log level (or
    warnings only, for stages without training arguments)."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        force=True,
    )
    if training_args is None:
        from accelerate import PartialState

        level, is_main_process = logging.WARNING, PartialState().is_main_process
    else:
        level, is_main_process = training_args.get_process_log_level(), training_args.should_log
    # Trellis's own progress lines show on the main process even when the libraries stay quiet.
    logging.getLogger("trellis").setLevel(logging.INFO if is_main_process else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


@contextmanager
def start_training_run(stage: str, script_args, training_args, model_args) -> Iterator[RunRecord]:
    """What every training stage starts and ends with: logging, the seed, its run record, and the
    process group closed once the stage is done (gloo aborted at interpreter exit when left open:
    "terminate called without an active exception"). A stage that finished closes it once every process
    has (a process closing while another still wound down sometimes aborted the same way); one that
    failed closes it at once, since the others may never come."""
    from transformers import set_seed

    setup_logging(training_args)
    set_seed(training_args.seed)
    if "tensorboard" in (training_args.report_to or []):
        # The TensorBoard callback opens its writer at the first log; for the evaluation before training that
        # comes before it reads output_dir, and it would write to ./runs. Name the directory up front.
        os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(training_args.output_dir, "runs")
    configs = {"script": script_args, "model": model_args, "training": training_args}

    def record_bad_records(report: dict) -> None:
        record.data["bad_records"] = report
        record.save()

    finished = False
    try:
        with (
            RunRecord(stage, training_args.output_dir, configs, training_args.process_index == 0) as record,
            reporting_bad_records(record_bad_records),
        ):
            yield record
        finished = True
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if finished:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def resume_checkpoint(training_args) -> str | None:
    """The checkpoint a rerun continues from: the recipe's, else the newest complete one."""
    found = checkpoints_by_step(training_args.output_dir)
    return training_args.resume_from_checkpoint or (found[-1] if found else None)


class _FirstEvaluation(TrainerCallback):
    """Keeps the metrics of the first evaluation of a run (the one `eval_on_start` runs)."""

    def __init__(self):
        self.metrics = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.metrics is None:
            self.metrics = dict(metrics)


def train_and_evaluate(trainer, record: RunRecord, eval_before_training: bool = True) -> None:
    """Evaluate the starting model, train (resuming from the last checkpoint), evaluate again.

    The starting model's metrics are kept in the run record, so every stage shows what it changed
    on held-out data.
    """
    args = trainer.args
    bad_records = record.data.get("bad_records")
    if bad_records:  # what the trainer drops as too long counts too, and stops the stage before training
        try:
            check_lengths(trainer, bad_records)
        finally:
            record.save()
    checkpoint = checkpoint_to_resume(trainer, record)
    initial = None
    has_eval = trainer.eval_dataset is not None
    evaluate_first = has_eval and eval_before_training and not checkpoint  # (resumed: already recorded)
    if evaluate_first and (trainer.accelerator.is_fsdp2 or trainer.is_deepspeed_enabled):
        # FSDP2 and DeepSpeed wrap the model together with its optimizer, which the Trainer creates only
        # in train() (an evaluate() before it breaks training): evaluate there, just before the first step.
        logger.info("Evaluating the model before its first training step")
        initial = _FirstEvaluation()
        trainer.add_callback(initial)
        args.eval_on_start = True
    elif evaluate_first:
        logger.info("Evaluating the model before training")
        record.set_metrics("initial", trainer.evaluate(metric_key_prefix="eval"))

    meter = throughput.attach(trainer)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if initial is not None:
        record.set_metrics("initial", initial.metrics)
        trainer.remove_callback(initial)
        args.eval_on_start = False
    record.set_metrics("train", result.metrics)
    record.data["loss_curve"] = meter.loss_curve
    speed = meter.summary()
    if speed:
        record.set_metrics("throughput", speed)
        logger.info(
            "Throughput: %.0f tokens/s (non-padding), padding efficiency %.2f, %.3f s/step%s",
            speed["tokens_per_second"],
            speed["padding_efficiency"],
            speed["step_seconds"],
            f", MFU {speed['mfu']:.1%}" if "mfu" in speed else "",
        )
    if has_eval:
        record.set_metrics("eval", trainer.evaluate(metric_key_prefix="eval"))
    log_change(record, "eval_loss")


def checkpoint_to_resume(trainer, record: RunRecord) -> str | None:
    """The run's last checkpoint in output_dir (named in the run record), or None for a fresh start."""
    checkpoint = resume_checkpoint(trainer.args)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
        record.data["resumed_from"] = os.path.basename(checkpoint)
    return checkpoint


def log_change(record: RunRecord, metric: str) -> None:
    """Log a held-out metric before and after training, when both were measured."""
    before, after = (record.data["metrics"].get(name, {}).get(metric) for name in ("initial", "eval"))
    if before is not None and after is not None:
        logger.info("Held-out %s: %.4f before training, %.4f after", metric, before, after)


def save_model_directory(trainer, output_dir: str, final: bool = False) -> None:
    """Write the trainer's model as a directory `from_pretrained` loads: safetensors weights, config,
    tokenizer, and no pickles. Call it on every process: sharded weights are gathered.

    With FSDP the full weights are gathered onto the main process, which writes them (the Trainer's
    save_model writes no weights at all with a sharded state dict). DeepSpeed ZeRO-3 weights are
    gathered by the Trainer (`zero3_save_16bit_model: true`). The `final` model is also uploaded to the
    Hub (trellis.core.hub) when the recipe says push_to_hub.
    """
    if trainer.is_fsdp_enabled:
        state_dict = trainer.accelerator.get_state_dict(
            trainer.model
        )  # collective; empty off the main process
        with saved_as_plain_model(trainer.accelerator.unwrap_model(trainer.model)):
            trainer._save(output_dir, state_dict=_cloned_keeping_ties(state_dict, trainer.model))
    else:
        trainer.save_model(output_dir, _internal_call=True)  # (the Trainer's own push is not ours)
    if trainer.accelerator.is_main_process:
        # The Trainer also pickles its arguments; the run record holds them, and we ship no pickles.
        pickled_args = os.path.join(output_dir, "training_args.bin")
        if os.path.exists(pickled_args):
            os.remove(pickled_args)
        if final and trainer.args.push_to_hub:
            push_final_model(trainer.args, output_dir)


def push_final_model(args, output_dir: str, api=None) -> dict:
    """Upload a training stage's final model to `hub_model_id` (default: the output directory's name), with
    a card naming the stage, its base model and its held-out metrics. Private unless the recipe sets
    `hub_private_repo: false`."""
    from huggingface_hub import ModelCardData

    record = read_record(output_dir) or {}
    stage = record.get("stage", "training")
    base = ((record.get("config") or {}).get("model") or {}).get("model_name_or_path")
    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(output_dir))
    data = ModelCardData(tags=["trellis", stage], library_name="transformers")
    if base and not looks_like_local_path(base):
        data.base_model = base
    metrics = (record.get("metrics") or {}).get("eval", {})
    sections = {
        "Held-out metrics": markdown_table(["metric", "value"], [[k, number(v)] for k, v in metrics.items()]),
        "Run it": vllm_usage(repo_id),
    }
    summary = (
        f"Trained by the Trellis `{stage}` stage from `{base}`."
        if base
        else f"Trained by the Trellis `{stage}` stage."
    )
    if not metrics:
        del sections["Held-out metrics"]
    card = model_card(data, repo_id.split("/")[-1], sections, summary)
    private = args.hub_private_repo is not False
    return upload_model(
        output_dir, repo_id, str(card), private, args.hub_revision, f"Trellis {stage} stage", api=api
    )


def _cloned_keeping_ties(state_dict: dict, model) -> dict:
    """The gathered weights, cloned (safetensors cannot write their storages as they come: "invalid python
    storage"), tied parameters sharing one clone so that save_pretrained writes them once, as without FSDP."""
    first_name: dict[int, str] = {}  # a tied LM head is the input embedding's parameter under a second name
    source = {
        name: first_name.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)
    }
    clones = {name: tensor.clone() for name, tensor in state_dict.items() if source.get(name, name) == name}
    return {name: clones[source.get(name, name)] for name in state_dict if source.get(name, name) in clones}


def save_final_model(trainer, model_args, model_class=None, **config_overrides) -> None:
    """Write the final model (and tokenizer) to output_dir so that `from_pretrained` loads it.

    With LoRA and `merge_adapters`, the adapters are merged into full weights (see models.merge_adapters);
    `model_class` and `config_overrides` say how the base reloads (default: AutoModelForCausalLM as saved).
    """
    output_dir = trainer.args.output_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "policy", model)  # PPO trains policy and value model together; the policy ships
    tokenizer = trainer.processing_class
    # Generation stops at the tokenizer's EOS (the chat template's end-of-turn after SFT).
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.use_cache = True
    model.config.use_cache = True
    save_model_directory(trainer, output_dir, final=True)
    if trainer.accelerator.is_main_process and model_args.use_peft and model_args.merge_adapters:
        merge_adapters(
            output_dir, model_args, tokenizer, trainer.args.trust_remote_code, model_class, **config_overrides
        )
    trainer.accelerator.wait_for_everyone()
    logger.info("Saved the final model to %s", output_dir)
