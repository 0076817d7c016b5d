"""The training prompt set, built offline: no instruction data set installs without a
download, so prompts are composed from topics and task types, and the model writes more
itself. The evaluation prompts (data/eval_prompts.txt) are written separately, on topics
that never appear here, so evaluation measures generalisation, not recall."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from mtpd.model.errors import ModelLoadError
from mtpd.model.sampling_params import SamplingParams
from mtpd.model.tokenizer import Tokenizer
from mtpd.train.collect import continue_prompts
from mtpd.train.engine import Engine

TOPICS = """
the water cycle; volcanoes; black holes; photosynthesis; the Roman Empire; the French Revolution;
ancient Egypt; the printing press; electricity; magnets; the human heart; the immune system;
vaccines; DNA; evolution; dinosaurs; honeybees; coral reefs; rainforests; deserts; glaciers;
earthquakes; hurricanes; climate change; solar power; wind turbines; nuclear energy; batteries;
electric cars; trains; airplanes; rockets; the Moon; Mars; Jupiter; the Sun; comets; telescopes;
microscopes; bacteria; viruses; sleep; dreams; memory; exercise; nutrition; vitamins; coffee;
tea; chocolate; bread baking; cheese; pizza; rice; gardening; composting; houseplants; dogs;
cats; horses; owls; whales; octopuses; penguins; elephants; wolves; butterflies; ants; spiders;
sharks; the ocean tides; rivers; mountains; islands; maps; compasses; the Silk Road; Vikings;
samurai; castles; pyramids; the Great Wall of China; the Renaissance; Leonardo da Vinci;
Shakespeare; poetry; novels; libraries; museums; music theory; the piano; the guitar; jazz;
classical music; painting; photography; film making; theater; dance; chess; football; basketball;
tennis; swimming; running a marathon; cycling; mountain climbing; camping; sailing; fishing;
personal budgeting; saving money; interest rates; inflation; the stock market; small businesses;
job interviews; writing a resume; public speaking; teamwork; time management; learning a language;
studying for exams; teaching children to read; friendship; kindness; curiosity; recycling;
plastic pollution; clean water; cities; bridges; skyscrapers; roads; the internet; email;
smartphones; computers; programming; algorithms; databases; encryption; passwords; robots;
artificial intelligence; video games; 3D printing; weather forecasting; rainbows; snow;
thunderstorms; the seasons; calendars; clocks; money; banks; post offices; newspapers; radio;
television; cooking pasta; making soup; breakfast; birthdays; holidays; travel packing; airports;
hotels; trains in Europe; volunteering; first aid; fire safety; bicycles repair; knitting;
woodworking; pottery; origami; puzzles; riddles; mathematics; fractions; prime numbers; geometry;
probability; statistics; physics; gravity; light; sound; heat; chemistry; atoms; acids and bases;
the periodic table; metals; glass; paper; cotton; wool
"""

TASKS = [
    "Explain {t} to a ten-year-old.",
    "What is {t}?",
    "Give me three interesting facts about {t}.",
    "Write a short story that involves {t}.",
    "Write a short poem about {t}.",
    "List five key points about {t}.",
    "Summarize the most important ideas about {t} in one paragraph.",
    "What are the advantages and disadvantages of {t}?",
    "Write a haiku about {t}.",
    "How would you teach a beginner about {t}?",
    "Describe {t} in simple words.",
    "Why is {t} important?",
    "Write a short dialogue between two friends talking about {t}.",
    "What are common misconceptions about {t}?",
    "Create a quiz with three questions about {t}.",
    "Write a product description for something related to {t}.",
    "Give step-by-step instructions for a simple project about {t}.",
    "Compare {t} with something similar and explain the differences.",
    "Write a short blog post introduction about {t}.",
    "What questions do people often ask about {t}? Answer two of them.",
    "Tell me a fun fact about {t} and explain why it is true.",
    "Write a letter to a friend describing {t}.",
    "What is the history of {t}?",
    "Give me a list of tips related to {t}.",
    "Explain {t} using an analogy.",
    "Write a news headline and a short article about {t}.",
    "What would happen if {t} did not exist?",
    "Describe a typical day for someone who works with {t}.",
    "Write a Python function that could be useful for someone studying {t}, with comments.",
    "Write a short speech about {t}.",
]

CODE_PROMPTS = [
    "Write a Python function that {t}.",
    "Explain how to write a program that {t}.",
    "Write a JavaScript function that {t}.",
    "Write a SQL query that {t}.",
]

CODE_TASKS = """
reverses a string; checks if a number is prime; counts the vowels in a sentence; finds the largest
number in a list; sorts a list of names; computes a factorial; converts Celsius to Fahrenheit;
reads a file and counts its lines; removes duplicates from a list; checks if a word is a palindrome;
merges two sorted lists; computes the average of a list; finds the second smallest number;
capitalizes every word in a sentence; validates an email address; generates the Fibonacci
sequence; counts word frequencies in a text; flattens a nested list; computes the greatest common
divisor; converts a number to binary; finds all even numbers in a list; returns the customers
who ordered more than twice; computes the median of a list; checks whether brackets are balanced
"""


def _split(block: str) -> list[str]:
    return [t.strip() for t in block.replace("\n", " ").split(";") if t.strip()]


def training_prompts(seed: int = 0) -> list[str]:
    """Every topic x task combination, shuffled deterministically by `seed`."""
    prompts = [task.format(t=topic) for topic in _split(TOPICS) for task in TASKS]
    prompts += [task.format(t=t) for t in _split(CODE_TASKS) for task in CODE_PROMPTS]
    random.Random(seed).shuffle(prompts)
    return prompts


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def user_turn_cue(tok: Tokenizer) -> list[int]:
    """The rendered chat up to where a user's words start: what cues the model to write
    a user's message ([] when the template puts nothing there)."""
    return tok.encode(tok.render_chat([{"role": "user", "content": "\0"}]).split("\0")[0])


# How a user's request commonly starts. Left to itself after the user-turn cue, a small
# model mostly writes long, rambling messages (stories, pasted text); started on one of
# these it writes the short questions and tasks that most chat traffic is.
OPENERS = (
    "How", "Why", "What", "Explain", "Describe", "Write a", "Give me", "Can you",
    "Tell me", "List", "Compare", "Summarize", "Is it", "When", "Which", "Should I",
    "Help me", "I need", "Create a", "Suggest", "Who", "Where", "Please", "Translate",
)  # fmt: skip


def self_written_prompts(
    engine: Engine,
    n: int,
    cache: Path,
    *,
    exclude: Collection[str],
    seed: int,
    batch: int = 32,
    max_tokens: int = 64,
    openers: Sequence[str] = ("",),
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """`n` user messages the model writes itself: given the chat template up to the start
    of a user turn, an instruction-tuned model samples what a user would ask (the
    "Magpie" method). Far more varied than composed prompts, which is what a head needs
    to generalise. Row r starts from `openers[r % len(openers)]` (the text the model
    continues, kept as the prompt's start). Prompts in `exclude` (the evaluation set)
    and repeats are dropped. Kept in `cache` (JSON, with how many rows were sampled for
    which seed), so a rerun reuses them and an interrupted run resumes at the next row;
    at most 4n rows are sampled."""
    done, rows = _read_written(cache, seed)
    if len(done) >= n:
        return done[:n]
    tok = engine.tokenizer
    head = user_turn_cue(tok)
    if not head:
        raise ModelLoadError(
            "the chat template puts nothing before the user's words, so the model has no "
            "cue to write prompts from; use --self-prompts 0"
        )
    seen = {_normal(p) for p in exclude} | {_normal(p) for p in done}
    opened = [tok.encode(opener) for opener in openers]
    while len(done) < n and rows < 4 * n:
        params = [
            SamplingParams(temperature=1.0, top_p=0.98, seed=seed * 1_000_003 + rows + i)
            for i in range(batch)
        ]
        starts = [(rows + i) % len(openers) for i in range(batch)]
        rows += batch
        cues = [head + opened[k] for k in starts]
        records = continue_prompts(engine, cues, max_tokens, params)
        for k, record in zip(starts, records, strict=True):
            # Decoded with the opening, not after it: a decoder that strips a leading space
            # (SentencePiece's) would otherwise glue "How" to "do I ...".
            words = [t for t in record.tokens[len(head) :] if t not in tok.eos_ids]
            text = tok.decode(words).strip()
            if len(words) > len(opened[k]) and _normal(text) not in seen:
                seen.add(_normal(text))
                done.append(text)
        # Replaced whole, so an interrupted write cannot leave a file that will not parse.
        partial = cache.with_suffix(".tmp")
        partial.write_text(json.dumps({"seed": seed, "rows_sampled": rows, "prompts": done}))
        partial.replace(cache)
        if progress:
            progress(min(len(done), n), n)
    return done[:n]


def _read_written(cache: Path, seed: int) -> tuple[list[str], int]:
    """The prompts written so far and the rows to go on from: none for another seed, or
    for the first format (a bare list, which did not record its rows)."""
    if not cache.exists():
        return [], 0
    data = json.loads(cache.read_text())
    if isinstance(data, list):
        return data, 0
    return data["prompts"], data["rows_sampled"] if data["seed"] == seed else 0
