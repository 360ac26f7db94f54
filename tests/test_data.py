"""Data: format converters on realistic records, local file types, weighted mixtures, held-out splits."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest

from trellis.data.arguments import DatasetSource, ScriptArguments
from trellis.data.bad_records import DataError
from trellis.data.formats import (
    alpaca_to_messages,
    detect_format,
    hh_to_messages,
    hh_to_preference,
    parse_hh_transcript,
    sharegpt_to_messages,
)
from trellis.data.sources import convert, load_mixture, load_train_eval

ALPACA = {
    "instruction": "Give three tips for staying healthy.",
    "input": "",
    "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep.",
}
ALPACA_WITH_INPUT = {
    "instruction": "Translate the sentence into French.",
    "input": "The cat sleeps.",
    "output": "Le chat dort.",
}
SHAREGPT = {
    "id": "QWJhYvA_0",
    "conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "Summarize the plot of Hamlet in one line."},
        {"from": "gpt", "value": "A prince avenges his father's murder and everyone dies."},
        {"from": "human", "value": "Shorter."},
        {"from": "gpt", "value": "Revenge, then death."},
    ],
}
HH = {
    "chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: I'd rather not list those."
    "\n\nHuman: Why not?\n\nAssistant: They can hurt people, but I can explain where they come from.",
    "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here is a list.",
}


def test_alpaca():
    assert alpaca_to_messages(ALPACA)["messages"] == [
        {"role": "user", "content": ALPACA["instruction"]},
        {"role": "assistant", "content": ALPACA["output"]},
    ]
    user = alpaca_to_messages(ALPACA_WITH_INPUT)["messages"][0]["content"]
    assert user == "Translate the sentence into French.\n\nThe cat sleeps."


def test_sharegpt():
    messages = sharegpt_to_messages(SHAREGPT)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[-1]["content"] == "Revenge, then death."
    with pytest.raises(DataError, match="unknown speaker 'narrator'"):
        sharegpt_to_messages({"conversations": [{"from": "narrator", "value": "x"}]})


def test_anthropic_hh_transcript():
    messages = hh_to_messages(HH)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "What are some cuss words in english?"
    assert messages[3]["content"].startswith("They can hurt people")
    assert parse_hh_transcript("Human: hi\n\nAssistant: hello") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    with pytest.raises(DataError, match="not an HH transcript"):
        parse_hh_transcript("just some text")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (ALPACA, "alpaca"),
        (SHAREGPT, "sharegpt"),
        (HH, "hh"),
        ({"messages": []}, "messages"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"text": "x"}, "text"),
        ({"prompt": [], "chosen": [], "rejected": []}, "preference"),
        ({"chosen": "a", "rejected": "b"}, "preference"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "a", "completion": "b", "label": True}, "unpaired"),
    ],
)
def test_format_detection(record, expected):
    assert detect_format(list(record), record) == expected


def test_unknown_format_names_the_columns():
    with pytest.raises(DataError, match=r"columns \['answer', 'question'\]"):
        detect_format(["question", "answer"], {})


def test_convert_keeps_only_trl_columns():
    dataset = datasets.Dataset.from_list([SHAREGPT, SHAREGPT])
    converted = convert(dataset, "auto", "sharegpt-sample")
    assert converted.column_names == ["messages"] and len(converted) == 2
    with pytest.raises(DataError, match="not in alpaca format: missing field 'instruction'"):
        convert(dataset, "alpaca", "sharegpt-sample")


def _rows(n: int, tag: str) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "ok"}]}
        for i in range(n)
    ]


def test_local_file_types_and_weighted_mixture(tmp_path):
    jsonl_gz = tmp_path / "a.jsonl.gz"
    with gzip.open(jsonl_gz, "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in _rows(40, "a"))
    datasets.Dataset.from_list(_rows(10, "b")).to_parquet(str(tmp_path / "b.parquet"))
    (tmp_path / "alpaca.csv").write_text("instruction,input,output\nSay hi,,hi\nSay bye,,bye\n")

    mixture = load_mixture(
        [
            DatasetSource(path=str(jsonl_gz), weight=0.5),
            DatasetSource(path=str(tmp_path / "b.parquet"), weight=2.0),
            DatasetSource(path=str(tmp_path / "alpaca.csv")),
        ],
        seed=0,
    )
    tags = [row["messages"][0]["content"].split()[0] for row in mixture]
    assert tags.count("a") == 20 and tags.count("b") == 20
    assert tags.count("Say") == 2 and mixture.column_names == ["messages"]
    again = load_mixture([DatasetSource(path=str(jsonl_gz), weight=0.5)], seed=0)
    assert [r["messages"][0]["content"] for r in again] == [r["messages"][0]["content"] for r in mixture][:20]


def test_text_files_and_saved_datasets(tmp_path):
    (tmp_path / "corpus.txt").write_text("first line\nsecond line\n")
    assert load_mixture([DatasetSource(path=str(tmp_path / "corpus.txt"))], seed=0)["text"] == [
        "first line",
        "second line",
    ]
    datasets.DatasetDict(train=datasets.Dataset.from_list(_rows(3, "t"))).save_to_disk(
        str(tmp_path / "saved")
    )
    assert len(load_mixture([DatasetSource(path=str(tmp_path / "saved"), split="train")], seed=0)) == 3
    with pytest.raises(DataError, match="no split 'test'"):
        load_mixture([DatasetSource(path=str(tmp_path / "saved"), split="test")], seed=0)


def test_held_out_split(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(50, "x")))
    split = load_train_eval(ScriptArguments(datasets=[{"path": str(path)}], test_split_size=0.2), seed=0)
    assert len(split["train"]) == 40 and len(split["test"]) == 10
    held_out = {r["messages"][0]["content"] for r in split["test"]}
    assert held_out.isdisjoint(r["messages"][0]["content"] for r in split["train"])


def test_mixture_sources_must_share_a_format(tmp_path):
    (tmp_path / "t.txt").write_text("text\n")
    (tmp_path / "m.jsonl").write_text(json.dumps(_rows(1, "m")[0]) + "\n")
    with pytest.raises(DataError, match="share one format"):
        load_mixture(
            [DatasetSource(path=str(tmp_path / "t.txt")), DatasetSource(path=str(tmp_path / "m.jsonl"))], 0
        )


def test_hh_pairs_become_prompt_chosen_rejected():
    same_dialogue = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did...",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No.",
    }
    pair = hh_to_preference(same_dialogue)
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"]
    assert pair["chosen"] == [{"role": "assistant", "content": "Why did..."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "No."}]
    with pytest.raises(DataError, match="one dialogue with two different last Assistant replies"):
        hh_to_preference(HH)  # the two transcripts differ before their last reply


def test_stage_task_decides_the_columns():
    hh = datasets.Dataset.from_list([HH | {"chosen": HH["rejected"] + " Sorry."}])
    assert convert(hh, "auto", "hh", task="messages").column_names == ["messages"]
    assert sorted(convert(hh, "auto", "hh", task="preference").column_names) == [
        "chosen",
        "prompt",
        "rejected",
    ]
    implicit = datasets.Dataset.from_list([{"chosen": "a b", "rejected": "a c", "score": 1}])
    assert convert(implicit, "auto", "pairs", task="preference").column_names == ["chosen", "rejected"]
    with pytest.raises(DataError, match="trains on preference pairs"):
        convert(datasets.Dataset.from_list([ALPACA]), "auto", "alpaca", task="preference")
    with pytest.raises(DataError, match="trains on conversations or text"):
        convert(implicit, "auto", "pairs", task="messages")


def test_kto_reads_pairs_unpaired_and_unpaired_examples_as_they_are():
    pairs = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"q{i}"}],
                "chosen": [{"role": "assistant", "content": f"good{i}"}],
                "rejected": [{"role": "assistant", "content": f"bad{i}"}],
            }
            for i in range(2)
        ]
    )
    unpaired = convert(pairs, "auto", "pairs", task="unpaired")
    rows = sorted(
        (row["prompt"][0]["content"], row["completion"][0]["content"], row["label"]) for row in unpaired
    )
    assert rows == [
        ("q0", "bad0", False),
        ("q0", "good0", True),
        ("q1", "bad1", False),
        ("q1", "good1", True),
    ]
    # Anthropic HH transcripts: unpaired after the shared dialogue became the prompt.
    hh = convert(
        datasets.Dataset.from_list([HH | {"chosen": HH["rejected"] + " Sorry."}]), "auto", "hh", "unpaired"
    )
    assert sorted(hh.column_names) == ["completion", "label", "prompt"] and hh["label"] == [True, False]
    assert convert(unpaired, "auto", "kto", task="unpaired")["label"] == unpaired["label"]
    # Pairs with an implicit prompt (two whole dialogues): the shared turns become the prompt.
    dialogue = [{"role": "user", "content": "hi"}]
    implicit = datasets.Dataset.from_list(
        [
            {
                "chosen": [*dialogue, {"role": "assistant", "content": "hello"}],
                "rejected": [*dialogue, {"role": "assistant", "content": "go away"}],
            }
        ]
    )
    examples = convert(implicit, "auto", "pairs", task="unpaired")
    assert examples["prompt"] == [dialogue, dialogue]
    assert [row[0]["content"] for row in examples["completion"]] == ["hello", "go away"]
    with pytest.raises(
        DataError,
        match="trains on unpaired examples .* or preference pairs; set `format` to one of: unpaired, preference, hh",
    ):
        convert(datasets.Dataset.from_list([ALPACA]), "auto", "alpaca", task="unpaired")
