"""Short question/answer chats, generated deterministically: data to try a fine-tune with.

Why generated and not shipped or sampled from a model: the README's recipe, the real-model test and
``bench/finetune_run.py`` need a few hundred chats whose answers are right and the same on every
machine, without committing a data file or asking the model being tuned. Each answer has one fixed
style ("17 plus 25 is 42."), so a fine-tune that learnt them shows as a lower held-out loss.

    python -m lmcore.data.demo_chats chats.jsonl [N]     # N chats (default 350) as prompt/completion JSONL
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "India": "New Delhi", "China": "Beijing", "Mexico": "Mexico City",
    "Turkey": "Ankara", "Russia": "Moscow", "Hungary": "Budapest", "Belgium": "Brussels", "Cuba": "Havana",
}
OPPOSITES = {"hot": "cold", "tall": "short", "fast": "slow", "early": "late", "full": "empty", "light": "dark",
             "open": "closed", "happy": "sad", "strong": "weak", "loud": "quiet", "rich": "poor", "wet": "dry"}
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WORDS = ("apple", "river", "garden", "window", "planet", "pencil", "bridge", "candle", "forest", "rocket")


def _chat(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return {"prompt": f"What is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return {"prompt": f"What is {a} times {b}?", "completion": f"{a} times {b} is {a * b}."}
    if kind == 2:
        country = rng.choice(sorted(CAPITALS))
        return {"prompt": f"What is the capital of {country}?",
                "completion": f"The capital of {country} is {CAPITALS[country]}."}
    if kind == 3:
        word = rng.choice(sorted(OPPOSITES))
        return {"prompt": f"What is the opposite of {word}?",
                "completion": f"The opposite of {word} is {OPPOSITES[word]}."}
    if kind == 4:
        i = rng.randrange(7)
        return {"prompt": f"Which day comes after {DAYS[i]}?",
                "completion": f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."}
    word = rng.choice(WORDS)
    return {"prompt": f"How many letters are in the word {word}?",
            "completion": f"The word {word} has {len(word)} letters."}


def demo_chats(n: int = 350, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct prompt/completion chats (the same list for the same ``n`` and ``seed``)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        chat = _chat(rng)
        if chat["prompt"] not in seen:
            seen.add(chat["prompt"])
            out.append(chat)
        if len(seen) > 20 * n:  # fewer distinct questions exist than asked for
            break
    return out


def write_demo_chats(path: Path, n: int = 350, seed: int = 0) -> Path:
    """The chats as JSONL that ``lmops ingest --format chat`` reads."""
    path = Path(path)
    path.write_text("".join(json.dumps(c) + "\n" for c in demo_chats(n, seed)))
    return path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m lmcore.data.demo_chats OUT.jsonl [N]")
    print(write_demo_chats(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) == 3 else 350))
