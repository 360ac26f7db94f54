"""Model-based quality scoring in the data stage: a tiny classifier trained here on generated "good" and
"junk" documents removes planted junk and keeps the good documents; the report shows the scores; a wrong
model or recipe is refused before any datatrove run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import run_script, write_recipe

from trellis.core.recipe import RecipeError
from trellis.data import datatrove_report, datatrove_stage
from trellis.data.arguments import DataArguments
from trellis.data.datatrove_blocks import QUALITY_SCORE, read_records
from trellis.data.sources import DataError
from trellis.stages import parse_recipe

GOOD, JUNK = 5.0, 0.0  # training targets, on the FineWeb-Edu classifier's 0-5 scale
THRESHOLD = 3.0  # FineWeb-Edu's
SUBJECTS = ["the river", "a glacier", "the heart", "photosynthesis", "the moon", "a volcano", "gravity"]
VERBS = ["carries", "explains", "shapes", "controls", "changes", "supports"]
OBJECTS = ["the water cycle", "the seasons", "the oxygen in the blood", "the rocks of the valley"]
REASONS = ["energy moves through it", "scientists measured it", "the climate warms", "its cells divide"]
PRODUCTS = ["watches", "pills", "casino chips", "sneakers", "ringtones", "followers"]
OFFERS = ["90% off", "a free trial", "cash back", "a bonus prize", "zero fees"]


def good_document(rng: random.Random) -> str:
    sentences = [
        f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} because "
        f"{rng.choice(REASONS)}."
        for _ in range(rng.randint(3, 6))
    ]
    return " ".join(sentences)


def junk_document(rng: random.Random) -> str:
    sentences = [
        f"Buy cheap {rng.choice(PRODUCTS)} now with {rng.choice(OFFERS)}! Click to win {rng.choice(PRODUCTS)}!!"
        for _ in range(rng.randint(3, 6))
    ]
    return " ".join(sentences)


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in texts for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(["</s>", "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # like a Llama tokenizer: an end-of-text token and no padding token (the stage must pad with EOS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")


def _tiny_config(tokenizer, num_labels: int = 1):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=None,
        num_labels=num_labels,
    )


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, seed) -> Path:
    """A Llama regression head (one logit, like the FineWeb-Edu classifier) trained for 60 steps to score
    good documents 5 and junk 0, saved with save_pretrained (safetensors), without a padding token."""
    import torch
    from transformers import LlamaForSequenceClassification

    rng = random.Random(1000 + seed)  # other documents than the corpus the test scores
    texts = [good_document(rng) for _ in range(200)] + [junk_document(rng) for _ in range(200)]
    targets = torch.tensor([GOOD] * 200 + [JUNK] * 200)
    tokenizer = _tokenizer(texts)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_tiny_config(tokenizer))
    tokenizer.pad_token, model.config.pad_token_id = tokenizer.eos_token, tokenizer.eos_token_id  # to train
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        batch = torch.randint(len(texts), (16,)).tolist()
        inputs = tokenizer(
            [texts[i] for i in batch], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        loss = torch.nn.functional.mse_loss(model(**inputs).logits[:, 0], targets[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tokenizer.pad_token, model.config.pad_token_id = None, None  # saved without, as Llama models are
    folder = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ONLY_THE_MODEL = dict(
    gopher_quality=False,
    repetition_filter=False,
    blocklist_filter=False,
    exact_dedup=False,
    near_dedup=False,
    min_chars=20,
    quality_max_length=64,
    quality_batch_size=8,
)


def test_the_model_removes_planted_junk_and_keeps_good_documents(classifier, tmp_path):
    rng = random.Random(7)
    documents = [{"id": f"good-{i}", "text": good_document(rng)} for i in range(60)]
    documents += [{"id": f"junk-{i}", "text": junk_document(rng)} for i in range(30)]
    rng.shuffle(documents)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in documents))
    recipe = {
        "datasets": [{"path": str(corpus)}],
        "output_dir": str(tmp_path / "out"),
        "num_proc": 1,
        "quality_model": str(classifier),
        "quality_threshold": THRESHOLD,
        "tokenizer_vocab_size": 300,
        "block_size": 32,
        "validation_fraction": 0.1,
        **ONLY_THE_MODEL,
    }
    config = write_recipe(tmp_path / "data.yaml", json.dumps(recipe))
    result = run_script(["prepare_data.py", "--config", str(config)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    (work,) = (tmp_path / "out" / "datatrove").iterdir()
    kept = [r for name in sorted((work / "filtered").glob("*.jsonl")) for r in read_records(str(name))]
    removed = datatrove_report.removed_records(str(work), "quality")
    good = sorted(r["metadata"][QUALITY_SCORE] for r in kept if r["id"].startswith("good"))
    junk = sorted(r["metadata"][QUALITY_SCORE] for r in removed if r["id"].startswith("junk"))
    print(f"scores: good {good[0]:.2f}..{good[-1]:.2f}, junk {junk[0]:.2f}..{junk[-1]:.2f}")
    # Measured over seeds 0-4 x 1 and 2 torch threads (same scores with either): good 5.00-5.13, junk
    # -0.06-0.19; the threshold (3) is 2.0 under the lowest good score and 2.8 over the highest junk one,
    # where those extremes move by 0.11 across seeds.
    assert sorted(r["id"] for r in removed) == sorted(
        d["id"] for d in documents if d["id"].startswith("junk")
    )
    assert sorted(r["id"] for r in kept) == sorted(d["id"] for d in documents if d["id"].startswith("good"))

    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["filters"]["quality: score_below_3"]["removed"] == 30
    step = next(s for s in report["steps"] if s["step"] == "quality_score")
    assert (step["documents_in"], step["documents_out"]) == (90, 60)
    scores = report["quality_scores"]
    assert (scores["model"], scores["threshold"], scores["scored"], scores["removed"]) == (
        str(classifier),
        3.0,
        90,
        30,
    )
    histogram = scores["histogram"]
    below = sum(count for label, count in histogram.items() if float(label[1:].split(",")[0]) < THRESHOLD)
    assert sum(histogram.values()) == 90 and below == 30
    assert all(example["score"] < THRESHOLD for example in scores["removed_just_below"])
    assert "## quality_scores" in (tmp_path / "out" / "data_report.md").read_text()


def _args(tmp_path: Path, model: str, **changes) -> DataArguments:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": good_document(random.Random(0))}) + "\n")
    return DataArguments(
        output_dir=str(tmp_path / "out"),
        datasets=[{"path": str(corpus)}],
        quality_model=model,
        **{**ONLY_THE_MODEL, **changes},
    )


def test_a_model_without_a_classification_head_is_refused_before_any_run(classifier, tmp_path):
    from transformers import LlamaForCausalLM

    language_model = tmp_path / "causal"
    LlamaForCausalLM(_tiny_config(_tokenizer(["a b"]))).save_pretrained(language_model)
    work = tmp_path / "work"
    with pytest.raises(DataError, match="not a sequence-classification model.*LlamaForCausalLM"):
        datatrove_stage.run_datatrove(_args(tmp_path, str(language_model)), str(work))
    assert not work.exists()  # nothing ran


def test_a_classifier_with_several_outputs_is_refused(tmp_path):
    from transformers import LlamaForSequenceClassification

    three_labels = tmp_path / "three"
    LlamaForSequenceClassification(_tiny_config(_tokenizer(["a b"]), num_labels=3)).save_pretrained(
        three_labels
    )
    with pytest.raises(DataError, match="has 3 outputs"):
        datatrove_stage.run_datatrove(_args(tmp_path, str(three_labels)), str(tmp_path / "work"))


def test_a_model_without_safetensors_weights_is_refused(classifier, tmp_path):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for path in classifier.iterdir():
        if path.suffix != ".safetensors":
            (no_weights / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="no .safetensors weights"):
        datatrove_stage.run_datatrove(_args(tmp_path, str(no_weights)), str(tmp_path / "work"))


@pytest.mark.parametrize(
    "line, message",
    [
        ("quality_model: ./no/such/model", "quality_model: no such local model directory"),
        (
            "quality_model: org/model\nengine: datasets",
            "quality_model: model scoring runs on the datatrove engine only",
        ),
        ("quality_model: org/model\nquality_batch_size: 0", r"quality_batch_size: must be >= 1"),
    ],
)
def test_the_recipe_is_checked_with_the_key_and_the_fix(tmp_path, line, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "x"}) + "\n")
    config = write_recipe(
        tmp_path / "data.yaml", f"datasets:\n  - path: {corpus}\noutput_dir: {tmp_path / 'out'}\n{line}\n"
    )
    with pytest.raises(RecipeError, match=message):
        parse_recipe("data", ["--config", str(config)])
