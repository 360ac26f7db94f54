"""TRL's PPOTrainer, resumable: a rerun continues from the last checkpoint instead of starting over.

TRL 1.12's `PPOTrainer.train()` takes no checkpoint and always starts at update 1; its checkpoints
hold the policy, optimizer, scheduler, RNG states and trainer state, but not the value model.
`ResumablePPOTrainer` keeps TRL's training loop as it is and adds only what a resume needs:

- the prompt order comes from a generator seeded by `seed`, not from the global RNG that sampling
  also draws from, so a resumed run can replay it and skip the batches already trained on;
- each checkpoint also holds the value model (`checkpoint-N/value_model/`);
- `train(resume_from_checkpoint=...)` loads policy, value model, optimizer, scheduler, RNG states
  and the trainer state (update counter, episodes, log history), then runs the remaining updates;
- sample generations run under a forked RNG, so showing samples does not shift the training stream
  (their schedule restarts with a resumed run).

It also gives the value model its own learning rate (`value_learning_rate`): TRL trains policy and
value model with one AdamW at one rate, and Adam's steps do not grow with `vf_coef`, so that key cannot
speed the value model up.

On CPU a resumed run ends with the same weights as an uninterrupted one (tests/test_ppo.py).
DeepSpeed ZeRO-3 checkpoints are not resumable this way (the value model is saved unsharded).
"""

from __future__ import annotations

import itertools
import logging
import os

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from trl.experimental.ppo import PPOTrainer
from trl.experimental.ppo.ppo_trainer import OnlineTrainerState

logger = logging.getLogger(__name__)

VALUE_MODEL_DIR = "value_model"


class _SkipBatches:
    """An endless stream of a dataloader's batches (epoch after epoch) that starts after `skip` batches."""

    def __init__(self, dataloader, skip: int):
        self.dataloader, self.skip = dataloader, skip

    def __iter__(self):
        endless = itertools.chain.from_iterable(itertools.repeat(self.dataloader))
        return itertools.islice(endless, self.skip, None)


class _RestoreProgress(TrainerCallback):
    """TRL's train() zeroes the trainer state before its loop; put the checkpoint's progress back."""

    def __init__(self, saved: OnlineTrainerState):
        self.saved = saved

    def on_train_begin(self, args, state, control, **kwargs):
        state.global_step, state.episode = self.saved.global_step, self.saved.episode
        state.max_steps, state.log_history = self.saved.max_steps, self.saved.log_history


class ResumablePPOTrainer(PPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Read by the Trainer's checkpoint loader; TRL's PPOTrainer skips Trainer.__init__, which sets it.
        self.is_fsdp_xla_v1_enabled = False
        # The same shuffled prompt stream in every run with this seed, whatever sampling draws.
        prompts = DataLoader(
            self.train_dataset,
            batch_size=self.local_dataloader_batch_size,
            shuffle=True,
            collate_fn=self.data_collator,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.args.seed),
        )
        self.dataloader = self.accelerator.prepare(prompts)

    def create_optimizer(self):
        optimizer = super().create_optimizer()
        if self.args.value_learning_rate is not None:
            # Split each of the Trainer's groups (weight decay or not) into policy and value parameters;
            # the scheduler then scales both rates alike. Nothing has stepped yet: no state to move.
            value_ids = {id(p) for p in self.model.value_model.parameters()}
            groups = list(optimizer.param_groups)
            optimizer.param_groups.clear()
            for group in groups:
                settings = {key: value for key, value in group.items() if key != "params"}
                policy = [p for p in group["params"] if id(p) not in value_ids]
                value = [p for p in group["params"] if id(p) in value_ids]
                optimizer.add_param_group({**settings, "params": policy})
                optimizer.add_param_group({**settings, "params": value, "lr": self.args.value_learning_rate})
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)  # the policy only
        if _internal_call and self.args.should_save:  # a checkpoint: resuming needs the value model too
            value_model = self.accelerator.unwrap_model(self.model).value_model
            value_model.save_pretrained(os.path.join(output_dir, VALUE_MODEL_DIR))

    def generate_completions(self, sampling: bool = False):
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            super().generate_completions(sampling)

    def _load_weights(self, checkpoint: str, module) -> None:
        wrapper, self.model = self.model, module  # the Trainer's loader checks self.model's tied weights
        try:
            self._load_from_checkpoint(checkpoint, model=module)
        finally:
            self.model = wrapper

    def train(self, resume_from_checkpoint: str | None = None):
        if resume_from_checkpoint is None:
            return super().train()
        saved = OnlineTrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
        model = self.accelerator.unwrap_model(self.model)
        self._load_weights(resume_from_checkpoint, model.policy)
        self._load_weights(os.path.join(resume_from_checkpoint, VALUE_MODEL_DIR), model.value_model)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_rng_state(resume_from_checkpoint)
        logger.info(
            "PPO resumes after update %d of %d (%d episodes done)",
            saved.global_step,
            self.args.num_total_batches,
            saved.episode,
        )
        total_updates, training_stream = self.args.num_total_batches, self.dataloader
        self.args.num_total_batches = total_updates - saved.global_step  # TRL's loop runs this many updates
        self.dataloader = _SkipBatches(training_stream, saved.global_step)
        restore = _RestoreProgress(saved)
        self.callback_handler.callbacks.insert(0, restore)  # before the progress bar reads max_steps
        try:
            return super().train()
        finally:
            self.args.num_total_batches, self.dataloader = total_updates, training_stream
            self.callback_handler.remove_callback(restore)
