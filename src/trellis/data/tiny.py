"""The tiny default: a generated world small enough to learn on a CPU in minutes, with held-out checks.

A seeded world of people (each with a city, a favourite colour and a pet) gives:
- a pretraining corpus of templated sentences stating every fact, mixed with small sums (and held-out
  documents for perplexity);
- SFT conversations asking about the facts; the facts are split, so held-out questions ask about facts
  the SFT data never shows (a model can only answer them from what pretraining taught it);
- preference pairs: the correct, concise, well-ended answer against a rambling, hedging or rude one;
- prompts for online RL, and an exact-match question/answer set for evaluation;
- two-step questions ("What is (3 + 4) * 2?") with worked rationales, one step a line, for a teacher's
  SFT and chain-of-thought distillation; held-out questions are digit triples no training file has.

SFT leaves a flaw for preference learning to fix: every fact is asked two plain ways and two casual ways
("Hey, ...", "Quick one: ..."), and the SFT demonstrations answer 80% of the casual questions (40% of
all) with the right sentence followed, on a new line, by rambling or hedging that runs past the RL
stages' 16-token budget. A greedy SFT model does the same on held-out casual questions; the preference
pairs, and the reward model trained on them, always prefer the concise answer that ends its turn. The
eval task tiny_qa_clean (the whole reply is the answer, then the end of the turn) measures the fix
without the reward model; tiny_qa (the first line only) checks that the facts survive it.
Every stage thus has a metric on held-out data that it should move. Same seed, same files.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from trellis.data.chat import CHATML_TOKENS
from trellis.data.tokenizer import train_bpe_tokenizer

logger = logging.getLogger(__name__)

TOKENIZER_VOCAB_SIZE = 1024


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]  # ways the corpus states the fact
    questions: tuple[str, ...]  # ways a user asks about it
    casual_questions: tuple[str, ...]  # casual ways, which the SFT demonstrations answer with a flaw

    @property
    def answer(self) -> str:
        """The one well-formed answer: the corpus's first way of stating the fact, after a fixed lead."""
        return f"{ANSWER_LEAD} {self.statements[0]}"


ATTRIBUTES = (
    Attribute(
        "city",
        ("Oslo", "Lima", "Cairo", "Quito", "Perth", "Dakar", "Hanoi", "Rome"),
        (
            "{person} lives in {value}.",
            "The home of {person} is in {value}.",
            "{person} has a house in {value}.",
        ),
        ("Where does {person} live?", "In which city does {person} live?"),
        ("Hey, do you know where {person} lives?", "Quick one: where does {person} live?"),
    ),
    Attribute(
        "color",
        ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
        (
            "{person} likes the color {value}.",
            "The favorite color of {person} is {value}.",
            "{person} always wears {value}.",
        ),
        ("What color does {person} like?", "What is the favorite color of {person}?"),
        ("Hey, do you know what color {person} likes?", "Quick one: what color does {person} like?"),
    ),
    Attribute(
        "pet",
        ("cat", "dog", "fox", "owl", "frog", "horse", "goat", "parrot"),
        (
            "{person} has a pet {value}.",
            "The pet of {person} is a {value}.",
            "{person} takes care of a {value}.",
        ),
        ("What pet does {person} have?", "Which animal does {person} keep?"),
        ("Hey, do you know what pet {person} has?", "Quick one: what pet does {person} have?"),
    ),
)
SUM_STATEMENTS = ("{a} plus {b} is {c}.", "{a} + {b} = {c}.", "If you add {a} and {b} you get {c}.")
# Answers start with a fixed lead so that the person's name is mid-sentence, the same token as in the
# question and in the corpus (a byte-level BPE spells " Safi" and "Safi" as different tokens; a tiny model
# copies the first reliably, not the second), and the rest is the corpus's own statement of the fact.
ANSWER_LEAD = "Answer:"
RUDE_ANSWERS = ("I will not tell you that.", "Ask someone else.", "That is a boring question.")
# What a flawed reply adds after the answer, on a new line: 15-17 tokens of the tiny tokenizer, so the
# whole reply runs past the RL stages' 16-token budget. Short and fixed, so SFT learns the flaw without
# spending its capacity on chatter; fact-free, since the data stage decontaminates the corpus against
# the SFT test split by 6-grams (restating a fact as the corpus does would delete it from pretraining).
HEDGE = "But I am not sure."
RAMBLE = "And that is all there is to it."
_SYLLABLES = ("ka", "lo", "mi", "ra", "zu", "te", "no", "vi", "sa", "pe", "du", "fi", "go", "ha", "ri", "be")


# Two-step questions: a sum, then a product. Measured with a student of a quarter of the teacher's size,
# sums of three or four digits needed no reasoning (answers alone taught it more than rationales did,
# 0.875 vs 0.775 held-out exact match): a sum is the same whatever the order, one attention average
# away. (a + b) * c is not; trained on answers alone the student reached 0.375, on rationales 0.795.
TWO_STEP_QUESTIONS = ("What is ({a} + {b}) * {c}?", "Add {a} and {b}, then multiply by {c}.")


@dataclass(frozen=True)
class TwoStepQuestion:
    a: int
    b: int
    c: int
    form: int  # which of TWO_STEP_QUESTIONS asks it

    @property
    def question(self) -> str:
        return TWO_STEP_QUESTIONS[self.form].format(a=self.a, b=self.b, c=self.c)

    @property
    def value(self) -> str:
        return str((self.a + self.b) * self.c)

    @property
    def answer(self) -> str:
        return f"{ANSWER_LEAD} {self.value}."

    @property
    def rationale(self) -> str:
        """One step a line, then the answer."""
        total = self.a + self.b
        return f"{self.a} + {self.b} = {total}.\n{total} * {self.c} = {self.value}.\n{self.answer}"


def two_step_questions(seed: int, held_out: int = 200) -> tuple[list, list]:
    """(training questions, held-out questions): every digit triple once, asked one of two ways; held-out
    triples appear in no training file (their own generator: the other tiny files do not depend on it)."""
    rng = random.Random(seed + 2)
    triples = list(itertools.product(range(10), repeat=3))
    rng.shuffle(triples)
    questions = [TwoStepQuestion(*triple, rng.randrange(len(TWO_STEP_QUESTIONS))) for triple in triples]
    return questions[held_out:], questions[:held_out]


@dataclass(frozen=True)
class Fact:
    prompt: str  # a question
    answer: str  # the well-formed answer sentence
    value: str  # the fact itself (what exact match checks)
    rambling: str  # the answer, then RAMBLE on a new line
    hedging: str  # the answer, then HEDGE on a new line
    casual: bool  # asked casually: the SFT demonstration is `rambling` or `hedging`, not `answer`


def _person_names(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize())
    return sorted(names)


class World:
    """People with attributes, split into seen and held-out facts (sums of single digits fill the corpus)."""

    def __init__(self, seed: int = 0, people: int = 40, held_out: float = 0.2):
        self.rng = random.Random(seed)
        self.people = {
            name: {attr.name: self.rng.choice(attr.values) for attr in ATTRIBUTES}
            for name in _person_names(self.rng, people)
        }
        keys = [(name, attr.name) for name in self.people for attr in ATTRIBUTES]
        self.rng.shuffle(keys)
        cut = int(len(keys) * held_out)
        self.held_out_keys, self.train_keys = keys[:cut], keys[cut:]

    def documents(self, count: int, rng: random.Random) -> list[str]:
        """Short documents of facts about one or two people, and a sum or two."""
        names = list(self.people)
        docs = []
        for _ in range(count):
            sentences = []
            for name in rng.sample(names, rng.choice((1, 2))):
                for attr in rng.sample(ATTRIBUTES, rng.choice((2, 3))):
                    sentences.append(
                        rng.choice(attr.statements).format(person=name, value=self.people[name][attr.name])
                    )
            for _ in range(rng.choice((0, 1, 2))):
                a, b = rng.randrange(10), rng.randrange(10)
                sentences.append(rng.choice(SUM_STATEMENTS).format(a=a, b=b, c=a + b))
            rng.shuffle(sentences)
            docs.append(" ".join(sentences))
        return docs

    def facts(self, keys: list[tuple[str, str]]) -> list[Fact]:
        """Every question form of each (person, attribute) fact in `keys`."""
        facts = []
        for name, attr_name in keys:
            attr = next(attr for attr in ATTRIBUTES if attr.name == attr_name)
            value = self.people[name][attr_name]
            correct = attr.answer.format(person=name, value=value)
            for question in (*attr.questions, *attr.casual_questions):
                facts.append(
                    Fact(
                        question.format(person=name),
                        correct,
                        value,
                        f"{correct}\n{RAMBLE}",
                        f"{correct}\n{HEDGE}",
                        question in attr.casual_questions,
                    )
                )
        return facts

    def demonstration(self, fact: Fact) -> str:
        """The SFT reply: the answer to a plain question; to a casual one, rambling (40%), hedging (40%) or
        the answer (20%). Greedy decoding follows the majority, the flaw; sampling finds the clean answer
        often enough for the online RL stages (GRPO, RLOO) to see it rewarded."""
        draw = self.rng.random()
        if not fact.casual or draw < 0.2:
            return fact.answer
        return fact.rambling if draw < 0.6 else fact.hedging

    def rejected(self, fact: Fact) -> str:
        """A worse reply: rambling (2/5), hedging (2/5) or rude (1/5). Never a wrong fact: measured, pairs
        that push a wrong value down on training questions push that value down for held-out people too
        (DPO then flipped one held-out fact in 24; without them, none)."""
        kind = self.rng.randrange(5)
        if kind < 2:
            return fact.rambling
        if kind < 4:
            return fact.hedging
        return self.rng.choice(RUDE_ANSWERS)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def write_tiny_data(output_dir: str | Path, seed: int = 0) -> Path:
    """Generate every tiny dataset and the tiny tokenizer under output_dir (about a second)."""
    out = Path(output_dir)
    world = World(seed)
    train_facts, held_out_facts = world.facts(world.train_keys), world.facts(world.held_out_keys)
    doc_rng = random.Random(seed + 1)

    corpus_train = world.documents(3000, doc_rng)
    _write_jsonl(out / "corpus" / "train.jsonl", [{"text": doc} for doc in corpus_train])
    _write_jsonl(
        out / "corpus" / "validation.jsonl", [{"text": doc} for doc in world.documents(300, doc_rng)]
    )
    for split, facts in (("train", train_facts), ("test", held_out_facts)):
        _write_jsonl(
            out / "sft" / f"{split}.jsonl",
            [{"messages": _user(f.prompt) + _assistant(world.demonstration(f))} for f in facts],
        )
        _write_jsonl(
            out / "preferences" / f"{split}.jsonl",
            [
                {
                    "prompt": _user(f.prompt),
                    "chosen": _assistant(f.answer),
                    "rejected": _assistant(world.rejected(f)),
                }
                for f in facts
            ],
        )
        _write_jsonl(out / "prompts" / f"{split}.jsonl", [{"prompt": _user(f.prompt)} for f in facts])
    _write_jsonl(
        out / "eval" / "qa.jsonl",
        [
            {"question": f.prompt, "answer": f.value, "target": f.answer, "casual": f.casual}
            for f in held_out_facts
        ],
    )

    reasoning, held_out_reasoning = two_step_questions(seed)
    for split, questions in (("train", reasoning), ("test", held_out_reasoning)):
        _write_jsonl(
            out / "reasoning" / f"{split}.jsonl",
            [{"messages": _user(q.question) + _assistant(q.rationale)} for q in questions],
        )
    # what a teacher answers for its student, with the right answer for the generate stage's checker
    _write_jsonl(
        out / "reasoning" / "prompts.jsonl",
        [{"prompt": _user(q.question), "answer": q.value} for q in reasoning],
    )
    _write_jsonl(
        out / "eval" / "multistep.jsonl",
        [{"question": q.question, "answer": q.value, "rationale": q.rationale} for q in held_out_reasoning],
    )

    tokenizer_texts = [
        *corpus_train,
        *(f"{f.prompt} {f.answer}" for f in train_facts),
        *RUDE_ANSWERS,
        HEDGE,
        RAMBLE,
    ]
    tokenizer = train_bpe_tokenizer(tokenizer_texts, TOKENIZER_VOCAB_SIZE, extra_special_tokens=CHATML_TOKENS)
    tokenizer.save_pretrained(out / "tokenizer")
    logger.info("Wrote the tiny datasets and tokenizer (%d tokens) to %s", len(tokenizer), out)
    return out
