"""The SFT stage end to end, as users run it: the model must learn, stop at the end of its turn, and resume."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from alignment_metrics import greedy_replies
from conftest import run_script, start_script, wait_for_file, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from trellis.core.run_record import read_record

ACCELERATE_CPU = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    "accelerate_configs/cpu.yaml",
]


def answer_form(target: str) -> re.Pattern:
    """The target answer with its final word (the fact) left open: 'Kalo lives in \\w+.'"""
    return re.compile(re.escape(target.rsplit(" ", 1)[0]) + r" \w+\.$")


def answer(model, tokenizer, question: str) -> tuple[str, bool]:
    """Greedy reply to one question, and whether the model ended its turn by itself."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    new = output[0, prompt["input_ids"].shape[1] :]
    stopped = tokenizer.eos_token_id in new.tolist()
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped


def questions(workdir: Path, split: str) -> list[tuple[str, str]]:
    rows = [
        json.loads(line) for line in (workdir / "data/tiny/sft" / f"{split}.jsonl").read_text().splitlines()
    ]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


@pytest.mark.slow
def test_tiny_sft_recipe_learns_and_stops(workdir, tmp_path, seed, record_property):
    out = tmp_path / "sft"
    result = run_script(
        ["sft.py", "--config", "recipes/tiny/sft.yaml", "--output_dir", str(out), "--seed", str(seed)],
        cwd=workdir,
        launcher=ACCELERATE_CPU,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    record = read_record(str(out))
    assert record["status"] == "complete"
    initial, final = record["metrics"]["initial"], record["metrics"]["eval"]
    # Held-out conversations: the untrained model is near uniform (ln 640 = 6.46 nats per token).
    assert initial["eval_loss"] > 5.5 and final["eval_loss"] < 0.25 * initial["eval_loss"]
    assert final["eval_mean_token_accuracy"] > 0.6 > initial["eval_mean_token_accuracy"] + 0.5
    assert record["inputs"]["datasets"]["train"] and record["packages"]["trl"].startswith("1.12")

    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(out.glob("*.bin")), "only safetensors, no pickles"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    )

    # From scratch, SFT teaches the answer form, not the facts (pretraining's job): every reply must
    # end its turn, and its first line name the subject of the question in the right sentence form,
    # on seen and held-out questions alike (the untrained model gets none). And it learns the flaw the
    # tiny world plants for preference learning: replies to casual questions ("Hey, ...") go on after
    # the answer, on a new line, as most casual demonstrations do ("Hey, ...", "Quick one: ...").
    for split in ("train", "test"):
        pairs = questions(workdir, split)[:30]
        replies = greedy_replies(model, tokenizer, [question for question, _ in pairs])
        ended = sum(stopped for _, stopped in replies)  # <|im_end|> within 48 tokens
        well_formed = sum(
            bool(answer_form(target.split("\n")[0]).match(reply.split("\n")[0]))
            for (reply, _), (_, target) in zip(replies, pairs, strict=True)
        )
        casual = [
            reply
            for (reply, _), (question, _) in zip(replies, pairs, strict=True)
            if question.startswith(("Hey", "Quick one"))
        ]
        rambling = sum("\n" in reply for reply in casual)
        record_property(f"{split}_ended_of_30", ended)
        record_property(f"{split}_well_formed_of_30", well_formed)
        record_property(f"{split}_casual_rambling_share", rambling / len(casual))
        # Measured, seeds 0-4, 1-2 threads (docs/test_bounds.md): train 30 of 30 ended and well formed on
        # every seed; test 26-30 of 30 of each (seed 1 rambles on past 48 tokens 4 times); casual replies
        # going on after the answer: 0.86-1.0 of them. The untrained model gets no reply well formed.
        assert ended >= 24, (split, replies)
        assert well_formed >= 24, (split, replies)
        assert rambling >= 0.75 * len(casual), (split, casual)


@pytest.fixture(scope="module")
def base_model(workdir, tmp_path_factory) -> Path:
    """A small pretrained base on disk for the adapter runs: a short causal-LM run on the tiny corpus."""
    from transformers import set_seed

    from trellis.train.models import config_from_recipe

    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "data/tiny/tokenizer")
    model = AutoModelForCausalLM.from_config(
        config_from_recipe(str(workdir / "recipes/tiny/model.json"), tokenizer)
    )
    docs = [
        json.loads(line)["text"]
        for line in (workdir / "data/tiny/corpus/train.jsonl").read_text().splitlines()
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = tokenizer(docs[step * 16 : (step + 1) * 16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


ADAPTER_RECIPE = """\
model_name_or_path: {base}
dtype: float32
use_peft: true
lora_r: 16
lora_alpha: 32
lora_dropout: 0.0
lora_target_modules: all-linear
datasets:
  - path: data/tiny/sft/train.jsonl
eval_datasets:
  - path: data/tiny/sft/test.jsonl
output_dir: {out}
assistant_only_loss: true
max_length: 128
per_device_train_batch_size: 16
learning_rate: 5.0e-3
max_steps: {steps}
logging_steps: 10
save_steps: 1000
eval_strategy: 'no'
bf16: false
use_cpu: true
activation_checkpointing: false
report_to: none
"""


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "qlora-merged"])
def test_adapter_sft(workdir, tmp_path, base_model, variant):
    out = tmp_path / variant
    text = ADAPTER_RECIPE.format(base=base_model, out=out, steps=60)
    if variant == "qlora-merged":
        text += "load_in_4bit: true\nbnb_4bit_quant_type: nf4\nmerge_adapters: true\n"
    recipe = write_recipe(tmp_path / f"sft_{variant}.yaml", text)
    result = run_script(["sft.py", "--config", str(recipe)], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]

    record = read_record(str(out))
    assert record["status"] == "complete"
    assert record["metrics"]["eval"]["eval_loss"] < 0.5 * record["metrics"]["initial"]["eval_loss"]
    names = {p.name for p in out.iterdir()}
    if variant == "lora":  # adapters only; transformers loads base + adapter from the directory
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
        } <= names and "model.safetensors" not in names
    else:  # merged full weights; the adapters are kept aside
        assert "model.safetensors" in names and "adapter_config.json" not in names
        assert (out / "adapter" / "adapter_model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters()) or variant == "lora"
    tokenizer = AutoTokenizer.from_pretrained(out)
    reply, _ = answer(model, tokenizer, questions(workdir, "train")[0][0])
    assert reply  # it loads and generates


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(workdir, tmp_path):
    overrides = ["--max_steps", "90", "--save_steps", "30", "--eval_steps", "30", "--logging_steps", "10"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    command = ["sft.py", "--config", "recipes/tiny/sft.yaml", *overrides]

    process = start_script([*command, "--output_dir", str(killed)], cwd=workdir)
    wait_for_file(killed / "checkpoint-30" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_record(str(killed))["status"] == "running", "a killed run must not look complete"
    assert not (killed / "model.safetensors").exists()

    resumed = run_script([*command, "--output_dir", str(killed)], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = read_record(str(killed))
    assert record["status"] == "complete" and record["resumed_from"] in ("checkpoint-30", "checkpoint-60")
    assert "Resuming from" in resumed.stdout + resumed.stderr
    # The initial evaluation of the interrupted run is kept, not redone on the half-trained model.
    assert record["metrics"]["initial"]["eval_loss"] > 5.5

    full = run_script(
        [*command, "--output_dir", str(reference)],
        cwd=workdir,
    )
    assert full.returncode == 0, full.stderr[-3000:]
    # Same data order, optimizer and scheduler state: the resumed run ends where an uninterrupted one does.
    final_loss = read_record(str(killed))["metrics"]["eval"]["eval_loss"]
    assert final_loss == pytest.approx(read_record(str(reference))["metrics"]["eval"]["eval_loss"], abs=1e-4)
