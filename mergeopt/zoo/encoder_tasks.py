"""The encoder zoo's synthetic language and its four classification tasks.

A sentence is a bag of words in random order: nouns of one topic (with one noun of another
topic as a distractor), adjectives of one sentiment (an antonym pair list: ``good``/``bad``...)
and function words. The tasks are analogues of AG News, IMDB, MNLI and MRPC:

- ``topic`` (4 labels): the topic most of the sentence's nouns belong to;
- ``sentiment`` (2): the polarity most of its adjectives have (0 negative, 1 positive);
- ``entailment`` (3, a sentence pair): the hypothesis takes three of the premise's content
  words (0 entailment), puts a content word the premise lacks among two of them (1 neutral),
  or negates two of them (2 contradiction);
- ``paraphrase`` (2, a pair): the second text is the first reshuffled (1), or a sentence on
  another topic (0).

The base is pretrained on the tasks' texts (masked LM, and the tasks' labels from the [CLS]
vector through probes it then drops: ``encoder._pretrain``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

TOPICS: dict[str, tuple[str, ...]] = {
    "world": ("nation", "army", "leader", "border", "treaty", "minister", "capital", "vote"),
    "sports": ("ball", "team", "coach", "goal", "match", "league", "player", "score"),
    "business": ("market", "stock", "bank", "profit", "trade", "company", "price", "deal"),
    "science": ("atom", "cell", "gene", "planet", "laser", "theory", "data", "lab"),
}
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("good", "bad"),
    ("great", "awful"),
    ("happy", "sad"),
    ("bright", "dull"),
    ("strong", "weak"),
    ("calm", "angry"),
    ("rich", "poor"),
    ("kind", "cruel"),
)
"""(positive, negative) adjective pairs."""
FUNCTION_WORDS = ("the", "a", "of", "and", "in", "with", "to", "is", "was", "this", "on", "very")
NEGATIONS = ("not", "never", "no")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NOUNS = tuple(noun for nouns in TOPICS.values() for noun in nouns)
POSITIVE = tuple(pair[0] for pair in ANTONYMS)
NEGATIVE = tuple(pair[1] for pair in ANTONYMS)
ANTONYM = {a: b for pair in ANTONYMS for a, b in (pair, pair[::-1])}
VOCABULARY = (*SPECIAL_TOKENS, *NOUNS, *POSITIVE, *NEGATIVE, *FUNCTION_WORDS, *NEGATIONS)
LABEL_COUNTS = {"topic": 4, "sentiment": 2, "entailment": 3, "paraphrase": 2}
"""The tasks and their label counts (the experts' head sizes)."""


@dataclass(frozen=True)
class Sentence:
    topic: int
    polarity: int  # 0 negative, 1 positive
    words: tuple[str, ...]

    @property
    def content(self) -> tuple[str, ...]:
        return tuple(w for w in self.words if w not in FUNCTION_WORDS)

    @property
    def text(self) -> str:
        return " ".join(self.words)


def sentence(rng: random.Random) -> Sentence:
    """Three nouns of a topic and one of another, two adjectives of a polarity and one of the
    other, three function words, shuffled."""
    topic = rng.randrange(len(TOPICS))
    topics = list(TOPICS.values())
    other = rng.choice([t for t in range(len(TOPICS)) if t != topic])
    polarity = rng.randrange(2)
    major, minor = (POSITIVE, NEGATIVE) if polarity else (NEGATIVE, POSITIVE)
    adjectives = rng.sample(major, 2)
    words = [
        *rng.sample(topics[topic], 3),
        rng.choice(topics[other]),
        *adjectives,
        rng.choice([w for w in minor if ANTONYM[w] not in adjectives]),
        *rng.sample(FUNCTION_WORDS, 3),
    ]
    rng.shuffle(words)
    return Sentence(topic=topic, polarity=polarity, words=tuple(words))


def _shuffled(rng: random.Random, words: tuple[str, ...] | list[str]) -> list[str]:
    result = list(words)
    rng.shuffle(result)
    return result


def topic_record(rng: random.Random) -> dict[str, object]:
    s = sentence(rng)
    return {"text": s.text, "label": s.topic}


def sentiment_record(rng: random.Random) -> dict[str, object]:
    s = sentence(rng)
    return {"text": s.text, "label": s.polarity}


def entailment_record(rng: random.Random) -> dict[str, object]:
    s = sentence(rng)
    label = rng.randrange(3)
    content = list(s.content)
    if label == 0:
        hypothesis = rng.sample(content, 3)
    elif label == 1:
        outside = [w for w in (*NOUNS, *POSITIVE, *NEGATIVE) if w not in s.words]
        hypothesis = [*rng.sample(content, 2), rng.choice(outside)]
    else:  # negated, MNLI's best-known cue for a contradiction
        hypothesis = [rng.choice(NEGATIONS), *rng.sample(content, 2)]
    return {"text": s.text, "text_pair": " ".join(_shuffled(rng, hypothesis)), "label": label}


def paraphrase_record(rng: random.Random) -> dict[str, object]:
    s = sentence(rng)
    label = rng.randrange(2)
    words = list(s.words)
    if label == 0:
        other = sentence(rng)
        while other.topic == s.topic:
            other = sentence(rng)
        words = list(other.words)
    return {"text": s.text, "text_pair": " ".join(_shuffled(rng, words)), "label": label}


TASK_RECORDS: dict[str, Callable[[random.Random], dict[str, object]]] = {
    "topic": topic_record,
    "sentiment": sentiment_record,
    "entailment": entailment_record,
    "paraphrase": paraphrase_record,
}
