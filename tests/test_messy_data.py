"""Real-world data: records no converter can use are dropped, counted per reason and reported (file, line,
example); a stage stops before training only when a source holds more of them than the recipe allows.

The records are generated in the shapes of OpenAI messages, Alpaca, ShareGPT, Anthropic HH and UltraFeedback
(binarized), with defects planted at known lines.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from conftest import REPO, run_script, write_recipe

from trellis.core.run_record import read_record
from trellis.data.arguments import DatasetSource
from trellis.data.bad_records import DataError
from trellis.data.sources import read_source

# Arithmetic questions in the tiny world's words, so the tiny tokenizer reads them in real stage runs.
QA = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(10) for b in range(10)]
REFUSAL = "I will not tell you that."
LONG_QUESTION = " ".join(["What is 1 plus 2?"] * 60)  # far over the tiny recipes' max_length 128


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def messages(q: str, a: str) -> dict:
    return {"messages": _turns(("user", q), ("assistant", a))}


def alpaca(q: str, a: str) -> dict:
    return {"instruction": q, "input": "", "output": a}


def sharegpt(q: str, a: str) -> dict:
    return {"id": q, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def hh(q: str, a: str, rejected: str = REFUSAL) -> dict:
    return {
        "chosen": f"\n\nHuman: {q}\n\nAssistant: {a}",
        "rejected": f"\n\nHuman: {q}\n\nAssistant: {rejected}",
    }


def ultrafeedback(q: str, a: str, rejected: str = REFUSAL) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized: a text prompt beside whole dialogues, the chosen one twice."""
    chosen = _turns(("user", q), ("assistant", a))
    return {
        "prompt": q,
        "prompt_id": f"id {q}",
        "chosen": chosen,
        "rejected": _turns(("user", q), ("assistant", rejected)),
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }


NOT_UTF8 = b'{"messages": [{"role": "user", "content": "What is 1 plus \xff?"}]}'
Q, A = QA[12]
# Format -> the stage task it is read for -> defects: (raw line, reason).
DEFECTS = {
    "messages": (
        "messages",
        [
            (NOT_UTF8, "not_utf8"),
            (json.dumps(messages(Q, A))[:50], "bad_json"),
            (json.dumps(messages(Q, "  ")), "empty_turn"),
            (json.dumps({"messages": [{"content": Q}, {"role": "assistant", "content": A}]}), "missing_role"),
            (json.dumps({"messages": _turns(("user", Q))}), "no_reply"),
            (json.dumps([Q, A]), "bad_json"),
        ],
    ),
    "alpaca": (
        "messages",
        [
            (json.dumps({"instruction": Q, "input": ""}), "missing_field"),
            (json.dumps(alpaca(Q, "")), "empty_turn"),
            (json.dumps(alpaca(Q, A) | {"instruction": [Q]}), "wrong_type"),
        ],
    ),
    "sharegpt": (
        "messages",
        [
            (
                json.dumps(
                    {"conversations": [{"from": "narrator", "value": Q}, {"from": "gpt", "value": A}]}
                ),
                "missing_role",
            ),
            (json.dumps({"conversations": Q}), "wrong_type"),
            (NOT_UTF8, "not_utf8"),
        ],
    ),
    "hh": (
        "preference",
        [
            (json.dumps({"chosen": Q, "rejected": A}), "bad_transcript"),
            (json.dumps(hh(Q, A) | {"rejected": hh(QA[13][0], REFUSAL)["rejected"]}), "dialogues_differ"),
            (json.dumps({"chosen": hh(Q, A)["chosen"]}), "missing_field"),
            (json.dumps(hh(Q, A, rejected=A)), "same_answers"),
        ],
    ),
    "ultrafeedback": (
        "preference",
        [
            (
                json.dumps(
                    ultrafeedback(Q, A) | {"rejected": _turns(("user", QA[13][0]), ("assistant", REFUSAL))}
                ),
                "dialogues_differ",
            ),
            (json.dumps(ultrafeedback(Q, A, rejected=A)), "same_answers"),
            (json.dumps(ultrafeedback(Q, A, rejected="")), "empty_turn"),
            (json.dumps(ultrafeedback(Q, A) | {"chosen": A}), "wrong_type"),
            (json.dumps(ultrafeedback(Q, A) | {"rejected": None}), "missing_field"),
        ],
    ),
}
MAKERS = {
    "messages": messages,
    "alpaca": alpaca,
    "sharegpt": sharegpt,
    "hh": hh,
    "ultrafeedback": ultrafeedback,
}


def write_planted(path: Path, fmt: str, good: int, extra: tuple[dict, ...] = ()) -> dict[str, list[int]]:
    """`good` records of a format with its DEFECTS spread among them; returns reason -> planted line numbers."""
    lines = [json.dumps(MAKERS[fmt](*QA[i % len(QA)])).encode() for i in range(good)]
    lines += [json.dumps(record).encode() for record in extra]
    defects = [(raw if isinstance(raw, bytes) else raw.encode(), reason) for raw, reason in DEFECTS[fmt][1]]
    for number, (raw, _) in enumerate(defects):
        lines.insert(3 + 7 * number, raw)  # between good records, not first (the first decides the format)
    planted: dict[str, list[int]] = {}
    for raw, reason in defects:
        planted.setdefault(reason, []).append(lines.index(raw) + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return planted


@pytest.mark.parametrize("fmt", list(DEFECTS))
def test_each_format_drops_and_counts_its_bad_records(tmp_path, fmt, caplog):
    task, defects = DEFECTS[fmt]
    path = tmp_path / f"{fmt}.jsonl"
    planted = write_planted(path, fmt, good=60)
    with caplog.at_level(logging.WARNING, logger="trellis.data"):
        dataset, report = read_source(DatasetSource(path=str(path)), task, max_bad_fraction=0.5)

    assert len(dataset) == report.kept == 60 and report.read == 60 + len(defects)
    assert {reason: bad["count"] for reason, bad in report.dropped.items()} == {
        reason: len(lines) for reason, lines in planted.items()
    }
    for reason, bad in report.dropped.items():
        assert bad["file"] == str(path) and bad["line"] == planted[reason][0]
        assert bad["problem"] and bad["example"]
    if "not_utf8" in planted:  # the example shows the undecodable line as it is
        assert "\\xff" in report.dropped["not_utf8"]["example"]
    # What is kept is what TRL reads: for pairs, the shared dialogue as prompt and one reply each.
    if task == "preference":
        assert sorted(dataset.column_names) == ["chosen", "prompt", "rejected"]
        assert {len(row["chosen"]) for row in dataset} == {1} and dataset[0]["prompt"][-1]["role"] == "user"
    else:
        assert dataset.column_names == ["messages"]
    assert f"{len(defects)} of {report.read} records" in caplog.text
    assert all(f"{path}:{lines[0]}: " in caplog.text for lines in planted.values())


def test_past_the_fraction_the_error_names_file_line_and_example(tmp_path):
    path = tmp_path / "chat.jsonl"
    planted = write_planted(path, "messages", good=200)  # 6 bad of 206: 2.9%
    with pytest.raises(DataError) as error:
        read_source(DatasetSource(path=str(path)), "messages", max_bad_fraction=0.01)
    message = str(error.value)
    assert "6 of 206 records (2.9%) cannot be used, more than max_bad_record_fraction 0.01" in message
    for reason, lines in planted.items():
        assert re.search(
            rf"- {reason} \(.*\): {len(lines)}, first at {re.escape(str(path))}:{lines[0]}: ", message
        )
    assert "What is 1 plus \\xff?" in message and "max_bad_record_fraction" in message.splitlines()[-1]
    assert len(read_source(DatasetSource(path=str(path)), "messages", max_bad_fraction=0.03)[0]) == 200


def test_recipe_level_mistakes_stay_errors(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    write_planted(path, "alpaca", good=20)
    with pytest.raises(DataError, match="trains on preference pairs"):
        read_source(DatasetSource(path=str(path)), "preference", 0.01)
    with pytest.raises(DataError, match="not in sharegpt format: missing field 'conversations'"):
        read_source(DatasetSource(path=str(path), format="sharegpt"), "messages", 0.01)
    path.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['rejected'\]"):
        read_source(DatasetSource(path=str(path), format="preference"), "preference", 0.01)


def _recipe(base: str, path: Path, sources: list[Path], **keys) -> Path:
    """recipes/tiny/<base>.yaml with other training sources and keys."""
    text = (REPO / "recipes" / "tiny" / f"{base}.yaml").read_text()
    listed = "".join(f"  - path: {source}\n" for source in sources)
    text = re.sub(r"datasets:\n  - path: \S+\n", f"datasets:\n{listed}", text, count=1)
    return write_recipe(path, text + "".join(f"{key}: {value}\n" for key, value in keys.items()))


def _counts(record: dict) -> dict[str, dict[str, int]]:
    return {
        Path(source["source"]).stem: {reason: bad["count"] for reason, bad in source["dropped"].items()}
        for source in record["bad_records"]["sources"]
        if source["split"] == "train"
    }


def _planted_counts(planted: dict[str, list[int]]) -> dict[str, int]:
    return {reason: len(lines) for reason, lines in planted.items()}


def test_stages_train_on_messy_data_and_stop_past_the_fraction(workdir, tmp_path):
    """SFT on messages + Alpaca + ShareGPT + HH, and DPO on UltraFeedback + HH, each source with planted defects
    and one record too long for max_length: both train (a few steps) and record what they dropped; DPO
    with the default fraction stops before loading anything."""
    data = tmp_path / "data"
    sft_planted = {
        fmt: write_planted(
            data / f"{fmt}.jsonl",
            fmt,
            good=60,
            extra=(messages(LONG_QUESTION, A),) if fmt == "messages" else (),
        )
        for fmt in ("messages", "alpaca", "sharegpt")
    }
    hh_sft = data / "hh_sft.jsonl"
    hh_sft.write_text(
        "".join(json.dumps(hh(*qa)) + "\n" for qa in QA[:60]) + json.dumps({"chosen": "hi"}) + "\n"
    )
    steps = ("--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1")
    sft_out = tmp_path / "sft"
    sources = [data / f"{fmt}.jsonl" for fmt in sft_planted] + [hh_sft]
    recipe = _recipe("sft", tmp_path / "sft.yaml", sources, max_bad_record_fraction=0.1)
    result = run_script(
        ["sft.py", "--config", str(recipe), "--output_dir", str(sft_out), *steps], cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(str(sft_out))
    assert record["status"] == "complete" and record["bad_records"]["max_fraction"] == 0.1
    assert _counts(record) == {
        **{fmt: _planted_counts(planted) for fmt, planted in sft_planted.items()},
        "hh_sft": {"bad_transcript": 1},
    }
    # The over-long question leaves no answer token within max_length: SFT drops it, and says so.
    assert record["bad_records"]["rows"]["train"] == 4 * 60 + 1
    too_long = record["bad_records"]["too_long"]
    assert too_long["train"]["dropped_too_long"] == 1 and too_long["test"]["dropped_too_long"] == 0
    assert too_long["train"]["at_max_length"] == 0  # the tiny answers are far shorter
    assert "cannot be used; dropped them" in result.stdout + result.stderr

    uf, hh_pairs = data / "ultrafeedback.jsonl", data / "hh.jsonl"
    dpo_planted = {
        "ultrafeedback": write_planted(uf, "ultrafeedback", good=60),
        "hh": write_planted(hh_pairs, "hh", good=60, extra=(hh(LONG_QUESTION, A),)),
    }
    dpo_out = tmp_path / "dpo"
    recipe = _recipe("dpo", tmp_path / "dpo.yaml", [uf, hh_pairs])
    steps = ("--model_name_or_path", str(sft_out), *steps)
    result = run_script(
        ["dpo.py", "--config", str(recipe), "--output_dir", str(dpo_out), *steps], cwd=workdir
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"{uf}: 5 of 65 records (7.7%) cannot be used, more than max_bad_record_fraction 0.01"
        in result.stderr
    )
    line = dpo_planted["ultrafeedback"]["dialogues_differ"][0]
    assert (
        f"dialogues_differ (chosen and rejected dialogues differ before the last turn): 1, first at {uf}:{line}"
        in (result.stderr)
    )
    assert "Traceback" not in result.stderr
    record = read_record(str(dpo_out))  # the failed run's record holds the counts too
    assert record["status"] == "failed" and _counts(record) == {
        "ultrafeedback": _planted_counts(dpo_planted["ultrafeedback"])
    }
    assert sorted(p.name for p in dpo_out.iterdir()) == [
        "trellis_run.json"
    ]  # no model loaded, nothing trained

    result = run_script(
        [
            "dpo.py",
            "--config",
            str(recipe),
            "--output_dir",
            str(dpo_out),
            "--max_bad_record_fraction",
            "0.1",
            *steps,
        ],
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(str(dpo_out))
    assert record["status"] == "complete"
    assert _counts(record) == {fmt: _planted_counts(planted) for fmt, planted in dpo_planted.items()}
    # The pair whose prompt alone fills max_length is dropped by DPO, and the collator truncates it no more.
    assert record["bad_records"]["too_long"]["train"] == {
        "records": 121,
        "dropped_too_long": 1,
        "truncated": 0,
    }

    # A max_length that leaves no room for any answer: DPO would drop every pair; it stops before training.
    short = tmp_path / "dpo_short"
    result = run_script(
        ["dpo.py", "--config", str(recipe), "--output_dir", str(short), "--max_bad_record_fraction", "0.1"]
        + [*steps, "--max_length", "8"],
        cwd=workdir,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "train: the trainer drops 121 of 121 records (100.0%) as too long for max_length 8" in result.stderr
    )
    assert not list(short.glob("checkpoint-*")) and not (short / "model.safetensors").exists()
    record = read_record(str(short))
    assert (
        record["status"] == "failed" and record["bad_records"]["too_long"]["train"]["dropped_too_long"] == 121
    )


def test_json_array_files_are_read_record_by_record(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([messages(Q, A), messages(Q, ""), messages(*QA[3])], indent=2))
    dataset, report = read_source(DatasetSource(path=str(path)), "messages", max_bad_fraction=0.5)
    assert len(dataset) == 2 and report.dropped["empty_turn"] | {"example": None} == {
        "count": 1,
        "file": str(path),
        "record": 1,
        "problem": "messages turn 2 (assistant) is empty",
        "example": None,
    }
    path.write_text(json.dumps([messages(Q, A)])[:-1])
    with pytest.raises(DataError, match="chats.json: not a readable JSON array .*; write it as JSON lines"):
        read_source(DatasetSource(path=str(path)), "messages", max_bad_fraction=0.5)


def test_hub_style_sources_are_checked_in_arrow(tmp_path):
    """Parquet (as Hub datasets come): the same checks, positions as record indices, the rest kept in Arrow."""
    import datasets

    rows = [ultrafeedback(*QA[i]) for i in range(40)]
    planted = {"dialogues_differ": 5, "same_answers": 12, "empty_turn": 20, "missing_field": 33}
    broken = {reason: json.loads(raw) for raw, reason in DEFECTS["ultrafeedback"][1] if reason in planted}
    for reason, index in planted.items():
        rows[index] = broken[reason]
    path = tmp_path / "ultrafeedback.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    dataset, report = read_source(DatasetSource(path=str(path)), "preference", max_bad_fraction=0.2)
    assert {reason: (bad["count"], bad["record"]) for reason, bad in report.dropped.items()} == {
        reason: (1, index) for reason, index in planted.items()
    }
    assert len(dataset) == 36 and sorted(dataset.column_names) == ["chosen", "prompt", "rejected"]
    assert dataset[0]["prompt"] == [{"role": "user", "content": QA[0][0]}]
    assert dataset[0]["chosen"] == [{"role": "assistant", "content": QA[0][1]}]
    with pytest.raises(DataError, match=r"4 of 40 records \(10.0%\) cannot be used"):
        read_source(DatasetSource(path=str(path)), "preference", max_bad_fraction=0.05)
