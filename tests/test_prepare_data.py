"""The data stage end to end: the tiny default, its output contract (a Llama trains on it), packing,
caching, planted problems in a corpus, and bad input that must fail cleanly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import yaml
from conftest import REPO, run_script, write_recipe
from transformers import AutoTokenizer

from trellis.core.run_record import read_record
from trellis.data import datatrove_report
from trellis.data.packing import load_packed, pack_blocks, tokenize_and_pack
from trellis.data.sources import DataError

TINY_RECIPE = "recipes/tiny/data.yaml"


def tiny_recipe_with(path: Path, **changes) -> Path:
    """recipes/tiny/data.yaml with some keys changed (lists of sources cannot be set on the command line)."""
    recipe = yaml.safe_load((REPO / TINY_RECIPE).read_text())
    recipe.update(changes)
    return write_recipe(path, yaml.safe_dump(recipe))


def test_tiny_recipe_writes_the_pretraining_contract(tiny_data_output):
    record = read_record(str(tiny_data_output))
    assert record["status"] == "complete" and record["inputs"]["fingerprint"]
    packed, tokenizer = load_packed(str(tiny_data_output))
    assert set(packed) == {"train", "validation"} and packed["train"].column_names == ["input_ids"]
    block_size = 128
    assert all(len(row) == block_size for split in packed.values() for row in split["input_ids"])
    assert len(packed["train"]) > 10 * len(packed["validation"]) > 0
    # Documents are joined by EOS: decoding a block shows the tiny world's sentences between EOS tokens.
    first = packed["train"][0]["input_ids"]
    assert tokenizer.eos_token_id in first
    text = tokenizer.decode(first[: first.index(tokenizer.eos_token_id)])
    assert text.strip().endswith(".") and len(text) > 20

    report = json.loads((tiny_data_output / "data_report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == [
        "load",
        "clean",
        "filter",
        "exact_dedup",
        "decontaminate",
        "near_dedup",
        "split",
        "tokenizer",
        "tokenize_and_pack",
    ]
    assert steps["load"]["documents_out"] == 3000
    assert all(s["seconds"] >= 0 for s in steps.values())
    # The tiny corpus is clean: the filters keep at least 95% of it (a recipe tuned to it).
    assert steps["filter"]["documents_out"] >= 0.95 * 3000
    # The trained tokenizer compresses held-out text well beyond one byte per token.
    assert report["tokenizer"]["trained"] and report["tokenizer"]["bytes_per_token"] > 2.5
    assert (tiny_data_output / "data_report.md").read_text().startswith("# Data report")
    assert report["packed"]["train"]["padding_tokens"] < block_size


@pytest.mark.slow
def test_a_tiny_llama_learns_from_the_packed_output(tiny_data_output, seed, record_property):
    """The contract as the pretraining stage uses it: causal-LM training lowers held-out loss."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model gains nothing from threads, and loses much on a busy machine
    packed, tokenizer = load_packed(str(tiny_data_output))
    values = json.loads((REPO / "recipes/tiny/model.json").read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config)
    train, validation = (
        torch.from_numpy(packed[s].with_format("numpy")[:]["input_ids"]) for s in ("train", "validation")
    )

    def heldout_loss() -> float:
        with torch.no_grad():
            return model(input_ids=validation, labels=validation).loss.item()

    before = heldout_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        batch = train[torch.randint(len(train), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = heldout_loss()
    torch.set_num_threads(threads)
    record_property("heldout_loss_drop_nats", before - after)
    assert math.isclose(before, math.log(len(tokenizer)), rel_tol=0.1)  # untrained: uniform guess
    # BOUND prepare-data-learns: drop 3.240 / 3.575 / 4.125 nats (seeds 0-4; one thread, set above), from
    # ln(640) = 6.46: 4x its spread. Token frequencies alone (a unigram model) give 2.33, so this bound shows
    # that the blocks train, not that the model uses context.
    assert after < before - 2.0, (before, after)


@pytest.mark.slow
def test_rerun_reuses_the_result_and_any_change_recomputes(workdir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = (workdir / "data/tiny/corpus/train.jsonl").read_text().splitlines()[:400]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    recipe = tiny_recipe_with(tmp_path / "data.yaml", datasets=[{"path": str(corpus)}], output_dir=str(out))
    args = ["prepare_data.py", "--config", str(recipe)]
    first = run_script(args, cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    record = read_record(str(out))

    again = run_script(args, cwd=workdir)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert read_record(str(out))["started_at"] == record["started_at"]

    changed_recipe = run_script([*args, "--block_size", "64"], cwd=workdir)
    assert changed_recipe.returncode == 0 and "up to date" not in changed_recipe.stdout
    assert len(load_packed(str(out))[0]["train"][0]["input_ids"]) == 64
    fingerprint = read_record(str(out))["inputs"]["fingerprint"]

    corpus.write_text(corpus.read_text() + '{"text": "A brand new document about the lighthouse keeper."}\n')
    changed_input = run_script([*args, "--block_size", "64"], cwd=workdir)
    assert changed_input.returncode == 0 and "up to date" not in changed_input.stdout
    assert read_record(str(out))["inputs"]["fingerprint"] != fingerprint
    assert read_record(str(out))["inputs"]["documents"] == 401


PLANTED_RECIPE = """\
datasets:
  - path: {corpus}
    text_field: body
decontamination_datasets:
  - path: data/tiny/eval/qa.jsonl
output_dir: {out}
num_proc: 1
min_chars: 20
min_mean_word_length: 2.0
min_alpha_word_fraction: 0.5
min_stop_words: null
max_top_ngram_fraction: {{2: 0.4, 3: 0.4, 4: 0.4}}
max_duplicate_ngram_fraction: {{5: 0.3}}
decontamination_ngram: 6
tokenizer_name_or_path: data/tiny/tokenizer
block_size: 64
validation_fraction: 20
"""


@pytest.mark.slow
def test_planted_problems_are_removed_and_reported(workdir, tmp_path):
    base = [json.loads(line)["text"] for line in (workdir / "data/tiny/corpus/train.jsonl").open()][:300]
    questions = [json.loads(line)["question"] for line in (workdir / "data/tiny/eval/qa.jsonl").open()]
    question = next(q for q in questions if len(q.split()) >= 7)  # 6-grams need a question this long
    words = question.rstrip("?").split()
    planted = {
        "leak": f"Quiz time. {question} Think about it before you answer.",
        "near_miss": f"Quiz time. {' '.join(words[:3])} really {' '.join(words[3:])}? Think about it.",
        "pii": "Write to the keeper of the lighthouse at keeper@harbour.example.org and the ship will wait.",
        "blocked": "The best free porn of the day is here and the rest of the page is long.",
        "exact_dup": base[0].upper(),
        "near_dup": max(base, key=len) + " Dura has a pet frog.",
        "mojibake": "The caf\u00c3\u00a9 of the harbour is open in the morning and the evening.",
    }
    corpus = tmp_path / "corpus.jsonl.gz"
    import gzip

    with gzip.open(corpus, "wt") as handle:
        for text in [*base, *planted.values()]:
            handle.write(json.dumps({"body": text}) + "\n")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "data.yaml", PLANTED_RECIPE.format(corpus=corpus, out=out))
    result = run_script(["prepare_data.py", "--config", str(recipe)], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((out / "data_report.json").read_text())
    assert report["decontamination"]["removed"] == 1 and question in report["decontamination"]["examples"][0]
    assert report["filters"]["harmful content: blocklist"]["examples"] == [planted["blocked"]]
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["clean"]["pii_redacted"] == 1
    assert steps["exact_dedup"]["documents_in"] - steps["exact_dedup"]["documents_out"] >= 1
    assert any(
        planted["near_dup"] in example
        for cluster in report["near_duplicates"]["examples"]
        for example in cluster
    )

    packed, tokenizer = load_packed(str(out))
    text = "".join(tokenizer.decode(row) for split in packed.values() for row in split["input_ids"])
    assert "keeper@harbour" not in text and "<EMAIL>" in text
    assert "really" in text  # the near-miss of the eval question is kept
    assert "café" in text and "Ã" not in text
    assert base[0].upper() not in text  # the exact duplicate (up to case) is gone
    base_tokenizer = AutoTokenizer.from_pretrained(workdir / "data" / "tiny" / "tokenizer")
    assert report["tokenizer"]["trained"] is False and tokenizer.get_vocab() == base_tokenizer.get_vocab()


def test_packing_keeps_every_token_of_every_document_exactly_once():
    from trellis.data.tokenizer import train_bpe_tokenizer

    documents = [f"document {i} " + "word " * (i % 37) for i in range(300)]
    tokenizer = train_bpe_tokenizer(documents, 300)
    expected = [t for doc in documents for t in [*tokenizer(doc)["input_ids"], tokenizer.eos_token_id]]
    dataset = datasets.Dataset.from_dict({"text": documents})
    for num_proc in (None, 2):
        packed, stats = tokenize_and_pack(
            datasets.DatasetDict(train=dataset),
            tokenizer,
            50,
            {"num_proc": num_proc, "batched": True, "batch_size": 16},
        )
        flat = [t for row in packed["train"]["input_ids"] for t in row]
        padding = stats["train"]["padding_tokens"]
        assert all(len(row) == 50 for row in packed["train"]["input_ids"])
        assert flat[: len(flat) - padding] == expected
        assert flat[len(flat) - padding :] == [tokenizer.pad_token_id] * padding and padding < 50
    blocks, padding = pack_blocks([[1, 2, 3], [4], [5, 6]], 3, 0)
    assert blocks.tolist() == [[1, 2, 3], [4, 5, 6]] and padding == 0


# --- bad input ---------------------------------------------------------------------------------------


def _run(workdir, tmp_path, datasets, *overrides):
    out = tmp_path / "out"
    recipe = tiny_recipe_with(tmp_path / "data.yaml", datasets=datasets, output_dir=str(out))
    return run_script(["prepare_data.py", "--config", str(recipe), *overrides], cwd=workdir), out


def test_missing_file_fails_before_anything_is_written(workdir, tmp_path):
    result, out = _run(workdir, tmp_path, [{"path": "data/tiny/corpus/nope.jsonl"}])
    assert result.returncode == 2
    assert "datasets[0].path" in result.stderr and "nope.jsonl" in result.stderr
    assert not out.exists()


def test_wrong_text_field_fails_clearly_and_marks_the_record(workdir, tmp_path):
    result, out = _run(workdir, tmp_path, [{"path": "data/tiny/corpus/train.jsonl", "text_field": "body"}])
    assert result.returncode == 2
    assert (
        "no text column 'body'" in result.stderr
        and "['text']" in result.stderr
        and "text_field" in result.stderr
    )
    assert read_record(str(out))["status"] == "failed"
    assert not (out / "packed").exists()


def test_empty_corpus_after_filtering_fails_and_leaves_nothing_that_looks_complete(workdir, tmp_path):
    small = [{"path": "data/tiny/corpus/validation.jsonl"}]
    good, out = _run(workdir, tmp_path, small, "--validation_fraction", "0.1")
    assert good.returncode == 0 and (out / "packed").exists()
    bad, out = _run(workdir, tmp_path, small, "--validation_fraction", "0.1", "--min_chars", "100000")
    assert bad.returncode == 2
    assert (
        "no documents left after step 'filter'" in bad.stderr
        and "length: too few characters: 300" in bad.stderr
    )
    assert read_record(str(out))["status"] == "failed"
    assert not (out / "packed").exists() and not (out / "data_report.json").exists()
    with pytest.raises(DataError, match="not a complete data-stage output"):
        load_packed(str(out))


@pytest.mark.slow
def test_benchmark_script_arithmetic(workdir, tmp_path):
    """A smoke test at 0.3 MB: the real benchmark (>= 100 MB) is run by hand (docs/benchmarks.md)."""
    result = run_script(
        [
            "benchmark_data.py",
            "--megabytes",
            "0.3",
            "--num_proc",
            "1",
            "--work_dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "b.json"),
        ],
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "b.json").read_text())
    assert figures["corpus_mb"] >= 0.3
    for row in figures["steps"]:
        assert math.isclose(
            row["mb_per_s_per_core"] * row["seconds"] * row["cores"], row["mb_in"], rel_tol=1e-3
        )
    for engine in ("datasets", "datatrove"):
        steps = {row["step"] for row in figures["steps"] if row["engine"] == engine}
        assert {"clean", "near_dedup", "end_to_end"} <= steps
        assert figures["engines"][engine]["peak_rss_mb"] > 0
    assert "tokenization_alone" in {row["step"] for row in figures["steps"]}
    assert "MB/s per core" in result.stdout
    # each datatrove run's largest task, the figure that shows what grows with the corpus
    assert sorted(figures["engines"]["datatrove"]["peak_task_rss_mb"]) == sorted(datatrove_report.RUNS)


def test_streaming_source_reads_max_documents_of_its_text_field(tmp_path):
    from trellis.data.arguments import DataArguments
    from trellis.data.corpus import load_corpus

    source = tmp_path / "pages.jsonl"
    source.write_text("".join(json.dumps({"url": f"u{i}", "body": f"page {i}"}) + "\n" for i in range(50)))
    spec = {"path": str(source), "text_field": "body", "streaming": True, "max_documents": 20}
    loaded = load_corpus(DataArguments(output_dir=str(tmp_path), datasets=[spec]))
    assert (
        loaded.column_names == ["text"] and loaded["text"][:2] == ["page 0", "page 1"] and len(loaded) == 20
    )
    with pytest.raises(DataError, match="no text column 'content'.*'body', 'url'"):
        load_corpus(DataArguments(output_dir=str(tmp_path), datasets=[{**spec, "text_field": "content"}]))
