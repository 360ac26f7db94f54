"""Deduplication and decontamination: near-dup quality on planted duplicates, exact hashes, leaked eval items."""

from __future__ import annotations

import itertools
import random

import numpy as np

from trellis.data.dedup import (
    MinHasher,
    eval_ngrams,
    exact_hash,
    is_contaminated,
    jaccard,
    near_duplicate_clusters,
)

THRESHOLD, NGRAM = 0.7, 5


def _document(rng: random.Random, vocabulary: list[str], weights: list[float]) -> list[str]:
    return rng.choices(vocabulary, weights, k=rng.randint(80, 300))


def _edit(rng: random.Random, words: list[str], rate: float, vocabulary: list[str]) -> list[str]:
    """Replace, insert or delete `rate` of the words at random positions."""
    words = list(words)
    for _ in range(max(1, round(rate * len(words)))):
        position = rng.randrange(len(words))
        action = rng.choice(("replace", "insert", "delete"))
        if action == "replace":
            words[position] = rng.choice(vocabulary)
        elif action == "insert":
            words.insert(position, rng.choice(vocabulary))
        elif len(words) > 1:
            del words[position]
    return words


def planted_corpus(seed: int = 0):
    """Distinct documents, near-duplicate pairs (1-6% edited) and hard negatives (15-35% edited).

    Returns the texts and the planted families (index groups derived from one original); documents
    of different families share no long n-grams, so every pair with Jaccard >= threshold is inside
    a family and is found by computing the exact Jaccard of every pair within each family.
    """
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(3000)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]  # Zipf: common words recur across docs
    texts, families = [], []
    for kind, count in (("distinct", 600), ("near", 700), ("hard", 200)):
        for _ in range(count):
            original = _document(rng, vocabulary, weights)
            family = [len(texts)]
            texts.append(" ".join(original))
            if kind != "distinct":
                rate = rng.uniform(0.01, 0.06) if kind == "near" else rng.uniform(0.15, 0.35)
                family.append(len(texts))
                texts.append(" ".join(_edit(rng, original, rate, vocabulary)))
            families.append(family)
    order = list(range(len(texts)))
    rng.shuffle(order)  # duplicates are not next to each other
    position = {old: new for new, old in enumerate(order)}
    return [texts[i] for i in order], [[position[i] for i in family] for family in families]


def test_near_dedup_recall_and_precision_on_planted_duplicates():
    texts, families = planted_corpus()
    truth = {
        pair
        for family in families
        for pair in itertools.combinations(sorted(family), 2)
        if jaccard(texts[pair[0]], texts[pair[1]], NGRAM) >= THRESHOLD
    }
    near_pairs = sum(len(f) == 2 for f in families[600:1300])
    assert 0.5 * near_pairs < len(truth) < near_pairs  # the edits straddle the threshold: a real test

    hasher = MinHasher(num_perm=128, ngram=NGRAM, seed=0)
    signatures = np.stack([hasher.signature(t) for t in texts])
    clusters = near_duplicate_clusters(
        signatures, bands=32, rows=4, threshold=THRESHOLD, texts=texts, ngram=NGRAM
    )
    predicted = {pair for c in clusters for pair in itertools.combinations(sorted(c), 2)}

    found = len(predicted & truth)
    recall, precision = found / len(truth), found / max(len(predicted), 1)
    print(
        f"near-dup: {len(truth)} true pairs, {len(predicted)} predicted, recall {recall:.4f}, precision {precision:.4f}"
    )
    assert recall >= 0.95
    assert precision >= 0.99
    # The lowest-index document of each cluster is the one kept.
    assert all(c[0] == min(c) for c in clusters)


def test_signature_estimates_jaccard_and_is_deterministic():
    texts, families = planted_corpus(seed=1)
    hasher = MinHasher(num_perm=256, ngram=NGRAM, seed=3)
    errors = []
    for family in families[600:700]:
        a, b = (texts[i] for i in family)
        estimate = float(np.mean(hasher.signature(a) == hasher.signature(b)))
        errors.append(abs(estimate - jaccard(a, b, NGRAM)))
    assert np.mean(errors) < 0.03
    assert np.array_equal(MinHasher(256, NGRAM, 3).signature(texts[0]), hasher.signature(texts[0]))


def test_signature_only_verification_without_texts():
    texts, _ = planted_corpus(seed=2)
    texts = texts[:300]
    hasher = MinHasher(num_perm=128, ngram=NGRAM)
    signatures = np.stack([hasher.signature(t) for t in [*texts, texts[5]]])
    clusters = near_duplicate_clusters(signatures, 32, 4, THRESHOLD)
    assert [5, len(texts)] in clusters


def test_exact_hash_ignores_case_punctuation_and_whitespace_only():
    assert exact_hash("Hello,  World!\n") == exact_hash("hello world")
    assert exact_hash("Hello world") != exact_hash("Hello world again")


QUESTION = (
    "Which river flows through the ancient city that was founded by the twin brothers Romulus and Remus?"
)


def test_decontamination_removes_a_leaked_item_and_keeps_a_near_miss():
    eval_records = [
        {"question": QUESTION, "answer": "The Tiber"},
        {
            "messages": [
                {
                    "role": "user",
                    "content": "Name the largest planet of our whole solar system, please, in one word.",
                }
            ]
        },
    ]
    hashes = eval_ngrams(eval_records, n=13)
    leaked = "Quiz night! " + QUESTION.upper().replace("?", " ...") + " Answers below."
    # Shares 12 consecutive words with the question at most: not a 13-gram leak.
    words = QUESTION.split()
    near_miss = " ".join([*words[:12], "famous", *words[12:]])
    nested_leak = "Name the largest planet of our whole solar system, please, in one word: Jupiter."
    assert is_contaminated(leaked, hashes, 13)
    assert is_contaminated(nested_leak, hashes, 13)  # found inside nested chat messages too
    assert not is_contaminated(near_miss, hashes, 13)
    assert not is_contaminated("The Tiber is a river in Italy.", hashes, 13)  # short fields add no n-grams
