"""The quantization stage: the tiny recipe's variants of a model that learned the tiny world, their quality
and size against the original, reload and generation, resuming, and the errors before quantizing."""

from __future__ import annotations

import configparser
import json
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import REPO, prune_in_process, run_script, write_recipe
from packaging.requirements import Requirement
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trellis.compress import results, variants
from trellis.core.recipe import RecipeError
from trellis.core.run_record import read_record
from trellis.stages import parse_recipe

# Held-out perplexity of a variant relative to the original's (docs/test_bounds.md), seeds 0-4, 1 thread,
# AMD EPYC: 4-bit (GPTQ, NF4) -0.67% to +0.35% (spread 1.02%, either sign: which of 4 and 8 bits scores
# better is noise here); 8-bit (GPTQ, bitsandbytes, torchao) -0.06% to +0.12% (spread 0.18%). Each bound is
# over 3x its spread beyond the worst run.
FOUR_BIT_PERPLEXITY_BOUND = 0.04  # BOUND quantize-4bit
EIGHT_BIT_PERPLEXITY_BOUND = 0.01  # BOUND quantize-8bit; issue 7: 8-bit within 1% of the original


def tiny_recipe(workdir: Path, model: Path, out: Path, pruned: Path) -> Path:
    """recipes/tiny/quantize.yaml with its variants as they are, on `model`, plus `pruned` (made from it) with
    two of them, with fewer calibration records, held-out texts and task examples (the test's time budget)."""
    recipe = yaml.safe_load((REPO / "recipes/tiny/quantize.yaml").read_text())
    recipe.update(
        model_name_or_path=str(model), output_dir=str(out), calibration_samples=16, generation_tokens=8
    )
    recipe["compressed_models"] = [
        {"name": "pruned", "path": str(pruned), "variants": ["gptq-4bit", "bnb-nf4"]}
    ]
    recipe.update(tasks=["tiny_preference"], limit=16)
    recipe["perplexity"][0]["limit"] = 150
    return write_recipe(
        workdir / "recipes-under-test" / "quantize.yaml", yaml.safe_dump(recipe, sort_keys=False)
    )


@pytest.fixture(scope="module")
def quantized(workdir, language_model, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny recipe, with a width-pruned model beside the original, run once under accelerate launch;
    its recipe and output_dir."""
    root = tmp_path_factory.mktemp("quantize")
    # MLPs cut from 384 to 256 channels: smaller, and GPTQ's groups of 128 still fit
    pruned = prune_in_process(workdir, language_model, root / "pruned", intermediate_size=256)
    out = root / "out"
    recipe = tiny_recipe(workdir, language_model, out, pruned)
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "accelerate_configs/cpu.yaml",
    ]
    result = run_script(["quantize.py", "--config", str(recipe)], cwd=workdir, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, out


def expected_weight_bytes(model_dir: Path, bits: int) -> int:
    """Bytes of the weights if the linear layers of the blocks take `bits` per weight and the rest
    (embeddings, norms) stays in float32, as the tiny model is stored."""
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    linear = sum(
        t.numel() for name, t in state.items() if ".layers." in name and name.endswith("proj.weight")
    )
    rest = sum(t.numel() for name, t in state.items() if name != "lm_head.weight") - linear  # lm_head is tied
    return linear * bits // 8 + rest * 4


@pytest.mark.slow
def test_tiny_recipe_variants_keep_quality_and_shrink(workdir, language_model, quantized, record_property):
    recipe, out = quantized
    report = json.loads((out / results.REPORT_JSON).read_text())
    rows = report["checkpoints"]
    quantized_original = ["gptq-4bit", "gptq-8bit", "bnb-8bit", "bnb-nf4", "torchao-int8"]
    assert list(rows) == ["original", *quantized_original, "pruned", "pruned-gptq-4bit", "pruned-bnb-nf4"]
    assert [rows[name]["model"] for name in rows] == ["original"] * 6 + ["pruned"] * 3
    perplexity = {name: row["metrics"]["tiny_corpus.perplexity"] for name, row in rows.items()}
    record_property("original_perplexity", perplexity["original"])
    for name in list(rows)[1:]:
        record_property(f"{name}_perplexity_change", perplexity[name] / perplexity["original"] - 1)
    # The model knows the corpus, so a loss is measurable: 3.91 / 4.46 / 4.58 (seeds 0-4, 1 and 2 threads;
    # untrained: ~667). Measured changes: 8-bit -0.086% / +0.001% / +0.062%, 4-bit -0.28% / +0.13% / +0.50%.
    assert perplexity["original"] < 20, perplexity
    for name in ("gptq-8bit", "bnb-8bit", "torchao-int8"):
        assert abs(perplexity[name] / perplexity["original"] - 1) < EIGHT_BIT_PERPLEXITY_BOUND, perplexity
    for name in ("gptq-4bit", "bnb-nf4"):
        assert abs(perplexity[name] / perplexity["original"] - 1) < FOUR_BIT_PERPLEXITY_BOUND, perplexity
    # Fewer bits, smaller files: every 4-bit variant is smaller than every 8-bit one, and those than the
    # original. (Which of 4 and 8 bits scores better is within the seed spread here, so it is not asserted.)
    size = {name: row["size_bytes"] for name, row in rows.items()}
    eight_bit = [size[name] for name in ("gptq-8bit", "bnb-8bit", "torchao-int8")]
    assert max(size["gptq-4bit"], size["bnb-nf4"]) < min(eight_bit) <= max(eight_bit) < size["original"], size

    # On disk: the block weights at 8 or 4 bits, plus their scales and zero points (under 12% more here).
    original_size = rows["original"]["size_bytes"]
    assert original_size == pytest.approx(expected_weight_bytes(language_model, 32), rel=0.01)
    for name, row in rows.items():
        bits = 32 if row["settings"]["method"] == "none" else row["settings"]["bits"]
        expected = expected_weight_bytes(Path(rows[row["model"]]["path"]), bits)
        assert expected <= row["size_bytes"] < 1.12 * expected, (name, row["size_bytes"], expected)
        assert row["size_ratio"] == pytest.approx(row["size_bytes"] / original_size)
    assert rows["gptq-4bit"]["size_ratio"] < 0.3 and rows["bnb-8bit"]["size_ratio"] < 0.4
    # The pruned model's variants are smaller still, each measured against the original.
    for name, unpruned in (
        ("pruned", "original"),
        ("pruned-gptq-4bit", "gptq-4bit"),
        ("pruned-bnb-nf4", "bnb-nf4"),
    ):
        assert rows[name]["size_bytes"] < rows[unpruned]["size_bytes"], name

    # The best variant: the smallest that keeps 99% of the original's perplexity.
    meeting = [n for n, r in rows.items() if n != "original" and r["quality_retention"] >= 0.99]
    assert report["best"] == min(meeting, key=lambda n: rows[n]["size_bytes"])
    assert rows[report["best"]]["meets_threshold"]
    for name, row in rows.items():
        assert row["quality_retention"] == pytest.approx(perplexity["original"] / perplexity[name])
        assert row["tokens_per_second"] > 0 and row["load_memory_bytes"] > 0
        assert 0 <= row["metrics"]["tiny_preference.acc"] <= 1

    table = (out / results.REPORT_MARKDOWN).read_text()
    assert table.startswith("# Compression of") and f"| **{report['best']}** ★ |" in table
    assert "| bnb-nf4 | original | bitsandbytes 4-bit, nf4 double-quant |" in table
    assert "| pruned | pruned | unquantized (float32) |" in table
    assert (out / results.PLOT).read_bytes()[:4] == b"\x89PNG"
    record = read_record(str(out))
    assert record["status"] == "complete" and record["best_variant"] == report["best"]
    assert record["metrics"]["bnb-8bit"]["tiny_corpus.perplexity"] == perplexity["bnb-8bit"]

    # Each variant's card states its method, settings and measured quality kept.
    card = (out / "bnb-nf4" / "README.md").read_text()
    assert "| quant_type | nf4 |" in card and "bitsandbytes" in card
    assert f"**{100 * rows['bnb-nf4']['quality_retention']:.4g}%**" in card
    card = (out / "pruned-bnb-nf4" / "README.md").read_text()
    assert f"was made smaller from `{language_model}`" in card
    assert f"**{100 * rows['pruned-bnb-nf4']['quality_retention']:.4g}%**" in card
    # GPTQ is saved in the standard (v1) format vLLM and TGI read, without the calibration records.
    gptq = json.loads((out / "gptq-4bit" / "config.json").read_text())["quantization_config"]
    assert gptq["checkpoint_format"] == "gptq" and gptq["dataset"] is None and gptq["group_size"] == 128


@pytest.mark.slow
def test_variants_reload_and_generate(workdir, quantized):
    _, out = quantized
    layer_kind = {
        "gptq-4bit": "TorchAtenLinear",  # GPTQModel's CPU kernel
        "bnb-8bit": "Linear8bitLt",
        "bnb-nf4": "Linear4bit",
        "pruned-gptq-4bit": "TorchAtenLinear",
    }
    prompt = [{"role": "user", "content": "Where does Pepe live?"}]
    for name, kind in layer_kind.items():
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tokenizer = AutoTokenizer.from_pretrained(out / name)
        assert type(model.model.layers[0].mlp.down_proj).__name__ == kind
        assert model.config.intermediate_size == (256 if name.startswith("pruned") else 384)
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert output.shape[1] > inputs["input_ids"].shape[1], name
    torchao = AutoModelForCausalLM.from_pretrained(out / "torchao-int8")
    assert type(torchao.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"


@pytest.mark.slow
def test_rerun_keeps_complete_variants_and_publishes_each(workdir, quantized, monkeypatch):
    recipe, out = quantized
    monkeypatch.chdir(workdir)  # the recipe's data paths are relative to it
    (args,) = parse_recipe("quantize", ["--config", str(recipe)])
    made = [(source, variant) for source in variants.sources(args) for variant in source.variants]
    assert all(variants.is_complete(args, source, variant) for source, variant in made)
    # Run again: every variant is kept as it is and every checkpoint's measurement is reused.
    # (each variant's model card, README.md, is rewritten from the report: the weights and config are not)
    variant_files = [
        path
        for source, variant in made
        for path in variants.variant_dir(args, source, variant).iterdir()
        if path.name != "README.md"
    ]
    written = [path.stat().st_mtime_ns for path in variant_files]
    rerun = run_script(["quantize.py", "--config", str(recipe)], cwd=workdir)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    for source, variant in made:
        assert f"{source.variant_name(variant)!r} is complete with these settings; kept" in log
    checkpoints = len(made) + len(variants.sources(args))
    assert log.count("already measured with these settings") == checkpoints, log[-3000:]
    changed_files = [p.name for p, t in zip(variant_files, written, strict=True) if p.stat().st_mtime_ns != t]
    assert changed_files == [], changed_files
    (changed,) = parse_recipe("quantize", ["--config", str(recipe), "--calibration_samples", "8"])
    original = variants.sources(changed)[0]
    assert [variants.is_complete(changed, original, v) for v in changed.variants] == [
        v.method != "gptq" for v in changed.variants
    ]
    assert not any(out.glob("*.partial"))

    (publish,) = parse_recipe(
        "quantize", ["--config", str(recipe), "--push_to_hub", "true", "--hub_model_id", "me/tiny"]
    )
    uploads = results.hub_uploads(publish)
    assert [repo for repo, _ in uploads] == [f"me/tiny-{source.variant_name(v)}" for source, v in made]
    for _, folder in uploads:  # what would be uploaded: safetensors weights, no pickles, a card
        names = {f.name for f in folder.iterdir()}
        assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= names
        assert not any(name.endswith((".bin", ".pt", ".pkl", ".pth")) for name in names)


def test_group_size_must_fit_the_layer_widths(tmp_path):
    model = tmp_path / "narrow"
    AutoConfig.for_model(
        "llama",
        hidden_size=96,
        intermediate_size=256,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=64,
    ).save_pretrained(model)
    recipe = write_recipe(
        tmp_path / "quantize.yaml",
        f"model_name_or_path: {model}\noutput_dir: {tmp_path / 'out'}\nquality_metric: x.acc\ntasks: [x]\n"
        "calibration_datasets: [{path: " + str(tmp_path / "quantize.yaml") + "}]\n"
        "variants:\n  - {name: g128, method: gptq, bits: 4}\n  - {name: nf4, method: bitsandbytes, bits: 4}\n",
    )
    (args,) = parse_recipe("quantize", ["--config", str(recipe)])
    widths = variants.quantized_layer_widths(args.model_name_or_path, args.trust_remote_code)
    assert sorted(set(widths.values())) == [96, 256]
    (original,) = variants.sources(args)
    with pytest.raises(
        variants.QuantizationError,
        match=r"'g128': group_size 128 does not divide.*Use a group size that divides them all \(32\)",
    ):
        variants.check_group_sizes(original, widths)
    args.variants[0].group_size = 32
    variants.check_group_sizes(original, widths)


def test_recipe_mistakes_are_named(tmp_path):
    head = (
        f"model_name_or_path: {tmp_path}\noutput_dir: {tmp_path / 'out'}\n"
        "perplexity: [{label: wiki, path: " + str(tmp_path) + "}]\n"
    )
    misspelled = write_recipe(
        tmp_path / "misspelled.yaml", head + "variants: [{name: a, method: gptq, bits: 4, grup_size: 64}]\n"
    )
    with pytest.raises(
        RecipeError, match=r"line 4: variants\[0\].grup_size: unknown key \(did you mean 'group_size'\?\)"
    ):
        parse_recipe("quantize", ["--config", str(misspelled)])
    recipe = write_recipe(
        tmp_path / "quantize.yaml",
        head + "quality_metric: wikk.perplexity\n"
        "variants:\n"
        "  - {name: a, method: gptq, bits: 4}\n"
        "  - {name: b, method: bitsandbytes, bits: 8, quant_type: nf4}\n"
        "  - {name: c, method: torchao, bits: 4}\n"
        "compressed_models:\n"
        "  - {name: a, path: " + str(tmp_path) + "}\n"
        "  - {name: pruned, path: " + str(tmp_path) + ", variants: [gptq]}\n"
        "  - {name: x, path: " + str(tmp_path) + "}\n"
        "  - {name: x-a, path: " + str(tmp_path) + ", variants: [b]}\n",
    )
    with pytest.raises(RecipeError) as error:
        parse_recipe("quantize", ["--config", str(recipe)])
    message = str(error.value)
    assert "variants[1].quant_type: only applies to bitsandbytes with bits: 4" in message
    assert "variants[2].bits: torchao quantizes to 8 bits, got 4" in message
    assert "calibration_datasets: GPTQ needs calibration text" in message
    assert "quality_metric: 'wikk.perplexity' is not a metric" in message and "did you mean 'wiki'" in message
    assert "compressed_models[0].name: 'a' must be unique among the models and variants" in message
    assert (
        "compressed_models[1].variants: 'gptq' is not a variant of the recipe; they are: ['a', 'b', 'c']"
        in message
    )


def test_gptq_extra_keeps_the_pinned_cpu_torch():
    """`pip install -c constraints.txt -e .[gptq]` must not pull another torch: every installed package of
    the extra (and what they require) accepts the pinned torch, and numpy as installed satisfies them all."""
    pinned = next(
        line.split("==")[1].strip()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.startswith("torch==")
    )
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extra = [Requirement(line) for line in setup["options.extras_require"]["gptq"].split("\n") if line]
    assert {r.name.lower() for r in extra} >= {"gptqmodel", "optimum"}
    seen, queue = set(), [r.name for r in extra]
    while queue:
        name = queue.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if requirement.name == "torch":
                assert pinned in requirement.specifier, f"{name} requires {requirement}, not torch {pinned}"
            elif requirement.name in ("numpy",):
                assert metadata.version("numpy") in requirement.specifier, f"{name} requires {requirement}"
            queue.append(requirement.name)
