"""Regenerate the bundled sample data: `python data/sample/generate.py` (deterministic, no downloads).

Rows are composed from small hand-written sentence pools with a seeded RNG, so the files are reproducible byte for
byte and small (the folder stays well under 2 MB). They exist to exercise every data format and to train the tiny
test tokenizer; the content is plausible English, not knowledge.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = [
    "The river",
    "A small village",
    "The old library",
    "Our research team",
    "The night train",
    "A careful gardener",
    "The city council",
    "An apprentice baker",
    "The mountain road",
    "A quiet engineer",
    "The harbor master",
    "The school orchestra",
    "A travelling merchant",
    "The weather station",
    "A retired teacher",
    "The museum guide",
    "The compiler",
    "A patient nurse",
    "The lighthouse keeper",
    "Every spring the valley",
]
VERBS = [
    "slowly changed",
    "carefully measured",
    "quietly described",
    "openly questioned",
    "patiently rebuilt",
    "briefly explained",
    "finally understood",
    "often ignored",
    "gradually improved",
    "suddenly remembered",
    "proudly presented",
    "barely noticed",
    "eagerly tested",
    "steadily recorded",
    "politely declined",
]
OBJECTS = [
    "the shape of the coastline",
    "a forgotten recipe for bread",
    "the cost of the new bridge",
    "the habits of migrating birds",
    "the rules of an old card game",
    "the sound of the morning bells",
    "a map drawn by hand",
    "the temperature of the lake",
    "the history of the town square",
    "a letter written decades ago",
    "the schedule of the ferries",
    "the growth of the young trees",
    "a simple method for sorting numbers",
    "the colors of the autumn market",
    "the weight of the harvest",
]
CLAUSES = [
    "because nobody else had the time",
    "while the rain kept falling",
    "before the winter arrived",
    "after a long and careful discussion",
    "although the evidence was thin",
    "as the sun went down",
    "so that the children could learn it",
    "without asking for any reward",
    "despite the noise from the street",
    "when the last visitor had left",
    "even though the budget was small",
    "until every detail was right",
]
STANDALONE = [
    "Nobody expected the results to be so clear.",
    "It took three weeks to finish the first draft.",
    "Some of the notes were written in pencil and had faded.",
    "The discussion continued late into the evening.",
    "A second attempt produced almost the same numbers.",
    "Visitors came from the neighbouring towns to see it.",
    "Most of the work happened in a cramped back room.",
    "The old methods turned out to be surprisingly reliable.",
    "Several questions remained open at the end of the year.",
    "Everyone agreed that the first version was too complicated.",
    "The simplest explanation was, as usual, the right one.",
    "A small mistake in the first step caused most of the trouble.",
    "They wrote everything down so that others could repeat it.",
    "The final report was short, clear and a little surprising.",
]
TOPICS = [
    "bread baking",
    "bird migration",
    "tide tables",
    "sorting algorithms",
    "vegetable gardens",
    "train timetables",
    "old maps",
    "bridge building",
    "weather forecasts",
    "library catalogues",
    "bicycle repair",
    "tea brewing",
    "river fishing",
    "star charts",
    "public parks",
    "choir rehearsals",
    "paper making",
    "solar panels",
]
ADJECTIVES = ["useful", "difficult", "pleasant", "slow", "careful", "simple", "surprising", "important", "quiet"]
GREETINGS = ["Hi!", "Hello.", "Good morning.", "Hey there.", "Quick question.", ""]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in a few sentences.",
    "You are a friendly tutor who explains things step by step.",
    "You answer questions about everyday topics clearly and honestly.",
]
FOLLOW_UPS = [
    "Can you say more about that?",
    "Why does that matter?",
    "Could you give an example?",
    "What would you do first?",
    "Is there a simpler way?",
    "Thanks. What is the most common mistake?",
]


def sentence(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(STANDALONE)
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.6:
        words += f" {rng.choice(CLAUSES)}"
    return words + "."


def prose(rng: random.Random, min_words: int, max_words: int) -> str:
    target = rng.randint(min_words, max_words)
    sentences: list[str] = []
    while sum(len(s.split()) for s in sentences) < target:
        sentences.append(sentence(rng))
    paragraphs, i = [], 0
    while i < len(sentences):
        step = rng.randint(3, 6)
        paragraphs.append(" ".join(sentences[i : i + step]))
        i += step
    return "\n\n".join(paragraphs)


def answer(rng: random.Random, topic: str, min_words: int = 15, max_words: int = 120) -> str:
    opening = (
        f"{topic.capitalize()} is {rng.choice(ADJECTIVES)} once you know where to start.",
        f"Good question about {topic}.",
        f"In short, {topic} depends on patience more than on tools.",
    )[rng.randrange(3)]
    return opening + " " + prose(rng, min_words, max_words).replace("\n\n", " ")


def text_rows(rng: random.Random, n: int) -> list[dict]:
    # A long tail of lengths: most rows short, some long, so packing has something to do.
    return [{"text": prose(rng, 20, 400 if rng.random() < 0.3 else 120)} for _ in range(n)]


def instruction_row(rng: random.Random) -> dict:
    topic = rng.choice(TOPICS)
    kind = rng.randrange(5)
    if kind == 0:
        passage = prose(rng, 30, 90).replace("\n\n", " ")
        first = passage.split(". ")[0].rstrip(".")
        return {"instruction": "Summarize the following text in one sentence.", "input": passage, "output": first + "."}
    if kind == 1:
        words = rng.sample(OBJECTS, 3)
        return {
            "instruction": "Sort these items alphabetically.",
            "input": "; ".join(words),
            "output": "; ".join(sorted(words)),
        }
    if kind == 2:
        phrase = rng.choice(OBJECTS)
        return {"instruction": "Rewrite the phrase in upper case.", "input": phrase, "output": phrase.upper()}
    if kind == 3:
        return {
            "instruction": f"Give three tips about {topic}.",
            "input": "",
            "output": "\n".join(f"{i + 1}. {sentence(rng)}" for i in range(3)),
        }
    return {"instruction": f"Explain {topic} to a beginner.", "input": "", "output": answer(rng, topic, 10, 80)}


def conversation(rng: random.Random) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.4:
        turns.append(("system", rng.choice(SYSTEM_PROMPTS)))
    topic = rng.choice(TOPICS)
    greeting = rng.choice(GREETINGS)
    first = f"{greeting} What should I know about {topic}?".strip()
    turns += [("user", first), ("assistant", answer(rng, topic, 5, 50 if rng.random() < 0.7 else 150))]
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        turns += [("user", rng.choice(FOLLOW_UPS)), ("assistant", answer(rng, topic, 5, 60))]
    return turns


def write_jsonl(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    # One RNG per file so editing one generator never changes the other files.
    write_jsonl("text.jsonl", text_rows(random.Random(1), 400))
    write_jsonl("instruction.jsonl", [instruction_row(random.Random(2000 + i)) for i in range(200)])
    rng = random.Random(3)
    chats = [{"messages": [{"role": r, "content": c} for r, c in conversation(rng)]} for _ in range(300)]
    write_jsonl("chat.jsonl", chats)
    rng = random.Random(4)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    shares = [
        {"conversations": [{"from": names[r], "value": c} for r, c in conversation(rng) if r != "system"]}
        for _ in range(50)
    ]
    write_jsonl("chat_sharegpt.jsonl", shares)


if __name__ == "__main__":
    main()
