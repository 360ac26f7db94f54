"""The model-family recipes (recipes/<family-size>/): each one trains a tiny copy of its family.

For every family, a randomly initialised model of the same architecture (a scaled-down copy of the
real config) with a tokenizer carrying the family's special tokens and official chat template stands
in for the Hub model, and every stage recipe of the family runs one or two steps on CPU, in process,
chained as a user would run them (data -> pretrain; sft -> reward, dpo -> ppo; eval; quantize). The
recipes are read as shipped; only what cannot run here is overridden: the model and data paths, CPU and
fp32 instead of bf16, tiny batches and step counts (TRAIN and each stage's dictionary below). A broken
recipe, template, EOS or pad token fails the run, and SFT's preflight (trellis.chat.check_eos_in_loss_mask)
must find the family's end-of-turn token in the loss mask. Each family's pipeline.yaml must validate, every
stage recipe with its overrides, and chain these recipes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_in_process
from families import (
    FAMILIES,
    HEADROOM,
    REPO,
    Family,
    family,
    family_table,
    layout_table,
    memory_row,
    memory_table,
    recipe_files,
)
from family_models import TOKENS, official_template, reference_template, write_tiny_family_model
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from trellis.compress import calibration, results, variants
from trellis.compress.arguments import QuantizeArguments
from trellis.core.run_record import read_record
from trellis.data.chat import PreflightError
from trellis.pipeline.spec import load_pipeline
from trellis.stages import STAGES, parse_recipe

FIRST_OF_FAMILY = {f.family: f for f in reversed(FAMILIES)}
TRAIN = {
    "use_cpu": True,
    "bf16": False,
    "dtype": "float32",
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "per_device_eval_batch_size": 16,
    "report_to": "none",
    "dataloader_num_workers": 0,
    "save_strategy": "no",
    "push_to_hub": False,
}
# The stage tests show what training changes on held-out data; here it is enough that every stage runs.
CHAT_STAGE = {**TRAIN, "eval_before_training": False}
MESSAGES = {"path": "data/tiny/sft/train.jsonl", "weight": 0.1}
PAIRS = {"path": "data/tiny/preferences/train.jsonl", "weight": 0.1}
PROMPTS = {"path": "data/tiny/prompts/train.jsonl", "weight": 0.1}


def held_out(source: dict) -> dict:
    return {"path": source["path"].replace("train", "test"), "weight": 0.1}


def run_stage(script: str, recipe: Path, overrides: dict, tmp: Path) -> dict:
    """Run scripts/<script>.py in process on the recipe with `overrides` applied; return its run record."""
    values = yaml.safe_load(recipe.read_text())
    values.update(overrides)
    derived = tmp / f"{recipe.parent.name}-{recipe.stem}.yaml"
    derived.write_text(yaml.safe_dump(values))
    run_in_process(script, ["--config", str(derived)])
    record = read_record(values["output_dir"])
    assert record["status"] == "complete", record
    return record


@pytest.fixture(scope="module")
def corpus_texts(workdir) -> list[str]:
    lines = (workdir / "data" / "tiny" / "corpus" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:1000]]


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_family_template_renders_like_the_official_one_and_trains_the_end_of_turn(fam: Family, corpus_texts):
    """The training template a family's recipes use renders exactly what the family's official template
    renders, and its assistant mask covers the end-of-turn token (what assistant_only_loss trains)."""
    from family_models import build_tokenizer

    tokenizer = build_tokenizer(fam.family, corpus_texts[:200])
    recipe = yaml.safe_load((REPO / "recipes" / fam.name / "sft.yaml").read_text())
    template = (REPO / recipe["chat_template"]).read_text() if "chat_template" in recipe else None
    if template is None:  # Qwen2.5: the tokenizer's own, which TRL swaps for its marked copy
        template = get_training_chat_template(tokenizer)
    chat = [
        {"role": "user", "content": "Where does Ada live?"},
        {"role": "assistant", "content": "Ada lives in Oslo."},
        {"role": "user", "content": "And her pet?"},
        {"role": "assistant", "content": "A cat."},
    ]
    assert has_generation_markers(template)
    assert tokenizer.apply_chat_template(chat, tokenize=False, chat_template=template) == (
        tokenizer.apply_chat_template(chat, tokenize=False, chat_template=reference_template(fam.family))
    )
    rendered = tokenizer.apply_chat_template(
        chat, chat_template=template, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True) if m]
    end_of_turn = tokenizer.convert_tokens_to_ids(TOKENS[fam.family]["end_of_turn"])
    assert trained.count(end_of_turn) == 2, tokenizer.decode(trained)  # both replies end, and are trained


def test_official_templates_lack_generation_markers():
    """Why the recipes (or TRL) supply training templates: no family's official template marks replies."""
    for name in TOKENS:
        assert "generation" not in official_template(name).replace("add_generation_prompt", "")


# Keys whose values a tiny run replaces (paths, data, sizes) or that only tune the optimisation: a recipe
# that differs from one already trained in nothing else cannot fail differently on a tiny model.
NOT_EXERCISED = {
    "model_name_or_path", "tokenizer_name_or_path", "reward_model_path", "dataset_path", "output_dir",
    "checkpoints", "datasets", "eval_datasets", "hub_model_id", "learning_rate", "num_train_epochs",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "warmup_steps", "max_length", "block_size", "beta", "lora_r", "lora_alpha", "total_episodes",
    "eval_steps", "save_steps", "logging_steps", "ema_decay", "ema_start_step", "tasks", "limit",
    "batch_size", "calibration_datasets", "calibration_samples", "calibration_max_length", "perplexity",
    "generation_tokens", "min_quality_retention",
}  # fmt: skip
# A recipe's stage: its name's prefix. pipeline.yaml chains the others (test_family_pipeline_...).
ORDER = ("data", "pretrain", "sft", "prune", "distill", "reward", "dpo", "ppo", "eval", "quantize", "export")


def load_recipes(fam: Family) -> dict[str, dict]:
    stages = [name for name in recipe_files(fam) if name != "pipeline"]
    names = sorted(stages, key=lambda name: (ORDER.index(name.split("_")[0]), name))
    return {
        name: yaml.safe_load((REPO / "recipes" / fam.name / f"{name}.yaml").read_text()) for name in names
    }


def signature(fam: Family, name: str, values: dict) -> tuple:
    return fam.family, name, yaml.safe_dump({k: v for k, v in values.items() if k not in NOT_EXERCISED})


def recipes_to_train(fam: Family) -> list[str]:
    """The family's recipes that an earlier size of the family has not covered, plus the ones whose
    outputs they read (SFT before DPO, reward before PPO, ...), in stage order."""
    earlier = FAMILIES[: FAMILIES.index(fam)]
    covered = {
        signature(f, n, v) for f in earlier if f.family == fam.family for n, v in load_recipes(f).items()
    }
    recipes = load_recipes(fam)
    needed = {name for name, values in recipes.items() if signature(fam, name, values) not in covered}
    producers = {values["output_dir"]: name for name, values in recipes.items()}
    for name in reversed(recipes):
        if name in needed:
            needed |= {producers[path] for path in stage_inputs(recipes[name]) if path in producers}
    return [name for name in recipes if name in needed]


MODEL_PATHS = ("model_name_or_path", "teacher_model_name_or_path", "reward_model_path", "dataset_path")


def stage_inputs(values: dict) -> list[str]:
    paths = [values.get(key) for key in MODEL_PATHS]
    return [path for path in paths + [c.get("path") for c in values.get("checkpoints", [])] if path]


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_family_recipes_train_a_tiny_copy_of_the_family(
    fam: Family, workdir, corpus_texts, tmp_path, monkeypatch
):
    monkeypatch.chdir(workdir)  # recipes name their templates relative to the checkout
    # GPTQ packs the tiny weights in Python: compiling GPTQModel's C++ packer takes a minute (as recipes/tiny).
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
    base = write_tiny_family_model(fam, tmp_path / "base", corpus_texts)
    end_of_turn = TOKENS[fam.family]["end_of_turn"]
    outputs = f"outputs/{fam.name}/"

    def local(path: str) -> str:
        """The recipes' own wiring (outputs/<family-size>/<stage>) moved into tmp_path; the Hub base -> tiny."""
        return str(tmp_path / path[len(outputs) :]) if path.startswith(outputs) else str(base)

    recipes = load_recipes(fam)
    trained = recipes_to_train(fam)
    for name in trained:
        values, stage = recipes[name], name.split("_")[0]
        paths = {key: local(values[key]) for key in (*MODEL_PATHS, "output_dir") if key in values}
        if stage == "data":
            tiny_filters = yaml.safe_load((REPO / "recipes" / "tiny" / "data.yaml").read_text())
            overrides = {
                **{key: tiny_filters[key] for key in tiny_filters if key.startswith(("min_", "max_"))},
                "datasets": [{"path": "data/tiny/corpus/train.jsonl", "max_documents": 300}],
                "decontamination_datasets": [{"path": "data/tiny/eval/qa.jsonl"}],
                "tokenizer_name_or_path": str(base),
                "block_size": 64,
                "validation_fraction": 0.1,
                "num_proc": 1,
            }
        elif stage == "prune":  # the recipe's cuts, scaled to the tiny copy's sizes
            tiny = json.loads((base / "config.json").read_text())
            cuts = ("num_hidden_layers", "intermediate_size", "num_key_value_heads")
            overrides = {
                **{key: max(1, tiny[key] * values[key] // fam.config[key]) for key in cuts if key in values},
                "calibration_datasets": [MESSAGES],
                "calibration_samples": 8,
                "calibration_max_length": 64,
                "perplexity": [{"label": "tiny", "path": "data/tiny/corpus/validation.jsonl", "limit": 8}],
                "dtype": "float32",
            }
        elif stage == "pretrain":  # EMA is cheap to keep; checkpoint averaging is tests/test_pretrain.py's
            overrides = {**TRAIN, "ema_start_step": 0, "average_last_checkpoints": 0}
        elif stage == "eval":
            overrides = {
                "checkpoints": [{**c, "path": local(c["path"])} for c in values["checkpoints"]],
                "tasks": ["tiny_qa_form"],
                "limit": 4,
                "batch_size": 4,
                "dtype": "float32",
                "gen_kwargs": {"max_gen_toks": 8},
            }
        elif stage == "quantize":  # the shipped variants and settings, calibrated on the tiny chats as
            # rendered by the family's template; lm-eval with that template is the eval stage's check above
            wikitext = {**values["perplexity"][0], "name": None, "max_length": 64, "limit": 8}
            overrides = {
                "calibration_datasets": [MESSAGES],
                "calibration_samples": 8,
                "calibration_max_length": 64,
                "perplexity": [{**wikitext, "path": "data/tiny/corpus/validation.jsonl"}],
                "tasks": [],
                "batch_size": 8,
                "generation_tokens": 4,
            }
        elif stage == "export":  # the shipped types, checked on a few tiny chats in the family's template
            overrides = {"check_datasets": [MESSAGES], "check_samples": 4, "check_max_length": 64}
        else:
            source = {"sft": MESSAGES, "distill": MESSAGES, "reward": PAIRS, "dpo": PAIRS, "ppo": PROMPTS}[
                stage
            ]
            overrides = {**CHAT_STAGE, "datasets": [source], "eval_datasets": [held_out(source)]}
        if stage == "distill":  # on-policy batches (the student writes answers) run, briefly
            overrides.update(max_new_tokens=8)
        if stage == "ppo":
            del overrides["max_steps"]
            overrides.update(
                total_episodes=2,
                local_rollout_forward_batch_size=2,
                response_length=8,
                num_sample_generations=0,
            )
        record = run_stage(
            STAGES[stage].script.removesuffix(".py"),
            REPO / "recipes" / fam.name / f"{name}.yaml",
            {**overrides, **paths},
            tmp_path,
        )
        if stage == "sft":
            saved = json.loads((Path(paths["output_dir"]) / "tokenizer_config.json").read_text())
            assert saved["eos_token"] == end_of_turn, f"{name}: the SFT model must stop at {end_of_turn}"
            assert saved.get("pad_token") not in (None, end_of_turn), (
                f"{name}: PPO needs a pad distinct from EOS"
            )
        if stage == "pretrain":
            assert {"eval", "eval_ema"} <= set(record["metrics"])
        if stage == "prune":
            assert record["metrics"]["pruned"]["parameter_share"] < 1
        if stage == "eval":
            assert set(record["metrics"]) >= {c["name"] for c in values["checkpoints"]}
        if stage == "quantize":  # every variant made, and GPTQ with the recipe's settings
            calibration_starts_with_one_bos(record, Path(paths["model_name_or_path"]))
            out = Path(paths["output_dir"])
            report = json.loads((out / results.REPORT_JSON).read_text())
            assert list(report["checkpoints"]) == ["original", *(v["name"] for v in values["variants"])]
            for variant in (v for v in values["variants"] if v["method"] == "gptq"):
                saved = json.loads((out / variant["name"] / "config.json").read_text())["quantization_config"]
                assert {k: saved[k] for k in ("bits", "group_size", "desc_act")} == {
                    k: variant[k] for k in ("bits", "group_size", "desc_act")
                }

        if stage == "export":  # llama.cpp reads every file as transformers does: tokens and logits
            for gguf_type, row in record["metrics"].items():
                if gguf_type in values["types"]:
                    assert row["tokenization_agreement"] == 1.0, gguf_type
            assert record["metrics"]["f16"]["max_abs_logit_difference"] < 0.05

    if fam is FIRST_OF_FAMILY[fam.family]:
        assert set(trained) == set(recipes)  # the first size of a family trains every recipe
        if fam.family != "mistral":  # its base EOS is its end of turn; the others' preflight must object
            bad = {**CHAT_STAGE, "datasets": [MESSAGES], "eval_datasets": [], "eval_strategy": "no"}
            bad.update(model_name_or_path=str(base), output_dir=str(tmp_path / "bad"))
            with pytest.raises(PreflightError, match="not in the loss mask"):
                run_stage("sft", REPO / "recipes" / fam.name / "sft.yaml", {**bad, "eos_token": TOKENS[fam.family]["eos_token"]}, tmp_path)  # fmt: skip


def calibration_starts_with_one_bos(record: dict, model: Path) -> None:
    """GPTQ calibrates on the conversations as the model sees them: a tokenizer that prepends BOS (Llama 3,
    Gemma, Mistral) must not add it again to a template that writes it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    args = QuantizeArguments(**record["config"]["quantize"])
    for sample in calibration.calibration_data(args, tokenizer):
        ids = sample["input_ids"][0].tolist()
        assert ids[:2] != [tokenizer.bos_token_id] * 2, tokenizer.convert_ids_to_tokens(ids[:3])


def test_each_family_size_trains_what_its_first_size_did_not_cover():
    """Sizes of a family differ mostly in tuning numbers; whatever else differs is trained again."""
    assert recipes_to_train(family("smollm2-360m")) == []  # 135M's recipes with other learning rates
    assert recipes_to_train(family("llama-3.1-8b")) == ["sft_qlora", "reward", "dpo", "ppo"]  # QLoRA/LoRA


def test_every_family_has_its_stage_recipes():
    for fam in FAMILIES:
        files = set(recipe_files(fam))
        assert {"reward", "dpo", "ppo", "eval", "quantize", "pipeline"} <= files, fam.name
        assert any(f.startswith("sft") for f in files), fam.name
        small = fam.name.rsplit("-", 1)[1] in ("135m", "360m", "0.5b", "1b", "1.5b", "1.7b")
        assert small == ({"data", "pretrain"} <= files), fam.name  # continued pretraining up to 1.7B


# Parameter counts the model cards publish, in billions: the configs in tests/families.py are the real ones.
PUBLISHED_BILLIONS = {
    "llama-3.2-1b": 1.24,
    "llama-3.1-8b": 8.03,
    "qwen2.5-0.5b": 0.49,
    "qwen2.5-1.5b": 1.54,
    "smollm2-135m": 0.13,
    "smollm2-360m": 0.36,
    "smollm2-1.7b": 1.71,
    "mistral-7b": 7.25,
    "gemma-2-2b": 2.61,
}


def test_readme_tables_are_generated_from_the_real_family_configs():
    table = memory_table()
    for name, billions in PUBLISHED_BILLIONS.items():
        assert f"| {name} (seq {family(name).max_length}) | {billions:.2f} B |" in table
    readme = (REPO / "README.md").read_text()
    assert family_table() in readme
    assert table in readme
    assert layout_table() in readme


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_quantize_group_sizes_fit_the_real_model(fam: Family, tmp_path):
    """The tiny copies' widths are multiples of 128, so any group size up to 128 runs on them; whether a
    recipe's GPTQ group size divides the real model's layer widths is checked here, on the family's real
    config (on the meta device: no weights), by the check scripts/quantize.py runs before quantizing."""
    from transformers import AutoConfig

    values = dict(fam.config)
    AutoConfig.for_model(values.pop("model_type"), **values).save_pretrained(tmp_path)
    recipe = REPO / "recipes" / fam.name / "quantize.yaml"
    argv = ["--config", str(recipe), "--model_name_or_path", str(tmp_path)]
    (args,) = parse_recipe("quantize", argv, check_paths=False)
    widths = variants.quantized_layer_widths(args.model_name_or_path, args.trust_remote_code)
    assert {fam.config["hidden_size"], fam.config["intermediate_size"]} <= set(widths.values())
    assert any(variant.method == "gptq" for variant in args.variants)
    variants.check_group_sizes(variants.sources(args)[0], widths)
    if any(width % 128 for width in widths.values()):  # SmolLM2 135M/360M (576, 960): the check can fail
        args.variants = [dataclasses.replace(v, group_size=128) for v in args.variants if v.method == "gptq"]
        with pytest.raises(variants.QuantizationError, match="does not divide"):
            variants.check_group_sizes(variants.sources(args)[0], widths)


def num_processes(accelerate_config: str) -> int:
    config = yaml.safe_load(Path(accelerate_config).read_text())
    return int(config.get("num_processes", 1)) * int(config.get("num_machines", 1))


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_family_pipeline_chains_the_family_recipes(fam: Family, workdir, monkeypatch):
    """pipeline.yaml validates (every stage recipe with its overrides, references and keys, as `trellis
    run` checks it before the first stage) and chains the family's own recipes in order."""
    monkeypatch.chdir(workdir)
    pipeline = load_pipeline(str(REPO / "recipes" / fam.name / "pipeline.yaml"))
    pretrains = "pretrain" in recipe_files(fam)
    assert pipeline.names == [
        *(["data", "pretrain"] if pretrains else []),
        *["sft", "reward", "ppo", "dpo", "eval", "quantize", "publish"],
    ]
    reads = {stage.name: set(stage.depends_on) for stage in pipeline.stages}
    assert reads == {
        **({"data": set(), "pretrain": {"data"}} if pretrains else {}),
        "sft": {"pretrain"} if pretrains else set(),
        "reward": {"sft"},
        "ppo": {"sft", "reward"},
        "dpo": {"sft"},
        "eval": {"sft", "dpo", "ppo"},
        "quantize": {"sft"},
        "publish": {"sft", "eval"},
    }
    recipes = load_recipes(fam)
    for stage in pipeline.stages[:-1]:
        assert Path(stage.recipe).parent == Path("recipes") / fam.name, stage.recipe
    # The SFT stage writes what the family's later recipes read; eval compares base, SFT, DPO and PPO.
    assert pipeline.stage("sft").output_dir == recipes["dpo"]["model_name_or_path"]
    assert pipeline.stage("sft").output_dir == recipes["quantize"]["model_name_or_path"]
    checkpoints = pipeline.stage("eval").resolved["checkpoints"]
    assert [c["name"] for c in checkpoints] == ["base", "sft", "dpo", "ppo"]
    assert checkpoints[0] == recipes["eval"]["checkpoints"][0]  # the Hub base, with its chat template
    assert pipeline.stage("publish").publish["dry_run"] is True  # nothing is uploaded by default

    # Accelerate configs: quantization runs in one process; SFT fits a 24 GiB GPU by the README memory table.
    assert num_processes(pipeline.stage("quantize").accelerate_config) == 1
    sft, row = pipeline.stage("sft"), memory_row(fam)
    if sft.resolved.get("load_in_4bit"):
        need = row.qlora
    elif sft.resolved.get("use_peft"):
        need = row.lora
    elif num_processes(sft.accelerate_config) == 1:
        need = row.full_1gpu
    else:  # sharded over 8 GPUs; DeepSpeed keeps fp32 master weights and AdamW states: count twice
        need = row.full_fsdp8 * (2 if "zero" in sft.accelerate_config else 1)
    assert need <= 24 * HEADROOM, (sft.accelerate_config, need)
