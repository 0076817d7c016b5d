"""Structured output through the pipeline: the masks llguidance computes against the
next characters of an enumerated language, and constrained decoding with MTP drafts
(the head's, and scripted ones the grammar forbids) equal to plain constrained decoding,
with masks from that enumeration as the oracle."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import GREEDY, solo_run
from tiny_models import write_drafting_model
from tiny_pipeline import start_pipeline

from mtpd.daemon.draft_policy import DraftPolicy
from mtpd.daemon.options import OutputFormat
from mtpd.daemon.pipeline import Pipeline
from mtpd.daemon.scheduler import Scheduler
from mtpd.daemon.structured_output import ConstraintBroken, Grammars
from mtpd.model.errors import InvalidParameter
from mtpd.model.sampling import select_token
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine
from mtpd.v1 import worker_pb2 as pb

LAYERS, VOCAB, EOS = 4, 98, 2
# A finite language (9460 words), so the allowed next characters can be enumerated.
REGEX = r"(ab|cd)[0-9]{1,2}(-[xy]{1,2}){0,2};"
PROMPT = [5, 17, 33, 2, 9, 60, 41]


def words() -> set[str]:
    tails = [""] + ["".join(p) for n in (1, 2) for p in itertools.product("xy", repeat=n)]
    dashes = [
        "".join("-" + t for t in ts)
        for n in range(3)
        for ts in itertools.product(tails[1:], repeat=n)
    ]
    numbers = [str(d) for d in range(10)] + [f"{d:02d}" for d in range(100)]
    return {h + n + d + ";" for h in ("ab", "cd") for n in numbers for d in dashes}


WORDS = words()
PREFIXES = {w[:i] for w in WORDS for i in range(len(w))}


def token(c: str) -> int:
    return ord(c) - 29  # write_char_tokenizer: 3 specials, then printable ASCII


def text(tokens: list[int]) -> str:
    return "".join(chr(t + 29) for t in tokens)


def allowed_after(prefix: str) -> set[int]:
    """The oracle: the next characters of the language's words that begin with `prefix`,
    and the end of sequence where `prefix` is a word."""
    nexts = {token(w[len(prefix)]) for w in WORDS if len(w) > len(prefix) and w.startswith(prefix)}
    return nexts | ({EOS} if prefix in WORDS else set())


def mask_sets(masks: bytes, rows: int) -> list[set[int]]:
    words_per_row = (VOCAB + 31) // 32
    bits = int.from_bytes(masks, "little")
    width = words_per_row * 32
    return [{t for t in range(VOCAB) if bits >> (r * width + t) & 1} for r in range(rows)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured") / "model"
    write_drafting_model(path, LAYERS, VOCAB)
    engine = Engine.load(path, max_context=256)
    return path, engine, Grammars(engine.tokenizer, VOCAB)


def start(path, load_mtp: bool = False) -> Pipeline:
    return start_pipeline(path, LAYERS, 2, load_mtp=load_mtp)


def test_masks_are_the_languages_next_characters(tiny):
    *_, grammars = tiny
    for word in sorted(WORDS)[::997]:
        constraint = grammars.matcher(OutputFormat("regex", REGEX))
        for i in range(len(word)):
            drafts = [token(c) for c in word[i : i + 3]]
            rows = mask_sets(constraint.masks(drafts), len(drafts) + 1)
            assert rows == [allowed_after(word[: i + j]) for j in range(len(drafts) + 1)]
            assert constraint.consume([token(word[i])]) is None
        assert constraint.complete


def test_drafts_are_cut_at_the_first_the_grammar_forbids(tiny):
    *_, grammars = tiny
    constraint = grammars.matcher(OutputFormat("regex", REGEX))
    assert constraint.allowed_drafts([token(c) for c in "ab12-x;"]) == 7
    assert constraint.allowed_drafts([token(c) for c in "ab123"]) == 4  # three digits
    assert constraint.allowed_drafts([token(c) for c in "zz"]) == 0
    assert constraint.allowed_drafts([]) == 0
    # Validating consumed nothing.
    assert mask_sets(constraint.masks([]), 1) == [allowed_after("")]
    with pytest.raises(ConstraintBroken, match="doesn't satisfy the grammar"):
        constraint.consume([token("q")])  # what a bad tail would cause


def test_markup_a_grammar_spells_is_text_and_control_tokens_are_never_allowed(tiny):
    *_, grammars = tiny
    constraint = grammars.matcher(OutputFormat("regex", "x</s>y"))
    constraint.consume([token("x")])
    assert mask_sets(constraint.masks([]), 1) == [{token("<")}]  # not the end of sequence
    with pytest.raises(InvalidParameter, match="only control tokens"):
        grammars.matcher(OutputFormat("grammar", 'start: <[1]> "a"'))


@pytest.mark.parametrize(
    ("output_format", "named"),
    [
        (OutputFormat("regex", "(("), "unclosed group"),
        (OutputFormat("grammar", "start: foo"), "unknown name"),
        (OutputFormat("json_schema", '{"type": "object", "properties": 5}'), "properties"),
        (OutputFormat("json_schema", '{"$ref": "http://example.com/s.json"}'), "not fetch"),
        (OutputFormat("regex", r"[^\s\S]"), "admits none"),  # an empty language
        (OutputFormat("grammar", 'start: a\na: a "x"'), "admits none"),  # no finite word
        (OutputFormat("json_schema", '{"$ref": "#"}'), "admits none"),
    ],
)
def test_a_format_that_does_not_compile_is_an_error_naming_the_parameter(
    tiny, output_format, named
):
    *_, grammars = tiny
    with pytest.raises(InvalidParameter, match=named) as e:
        grammars.matcher(output_format)
    assert e.value.param == "structured_output"


@pytest.mark.parametrize(
    ("kind", "spec", "named"),
    [
        ("yaml", "x", "not one of"),
        ("json_schema", "{", "not JSON"),
        ("json_schema", "[1]", "a schema is a JSON object"),
        ("json_schema", '{"a": NaN}', "NaN is not JSON"),
        ("regex", " ", "empty"),
        ("grammar", "x" * (1 << 18), "above"),
        ("json_schema", "false", "admits nothing"),
        ("regex", "a\ud800", "not valid Unicode"),
    ],
)
def test_a_malformed_format_is_refused_before_compiling(kind, spec, named):
    with pytest.raises(InvalidParameter, match=named):
        OutputFormat(kind, spec)


def constrained_run(engine: Engine, params: SamplingParams) -> list[int]:
    """Plain one-token decoding under the oracle's masks, to the end of sequence."""
    history, out = list(PROMPT), []
    try:
        logits = engine.forward("reference", 0, history)
        while True:
            allowed = torch.zeros(VOCAB, dtype=torch.bool)
            allowed[list(allowed_after(text(out)))] = True
            masked = logits.masked_fill(~allowed, -torch.inf)
            t = select_token(masked, params, len(history), torch.tensor(history), len(PROMPT))
            if t == EOS:
                return out
            out.append(t)
            history.append(t)
            logits = engine.forward("reference", len(history) - 1, [t])
    finally:
        engine.release("reference")


class WrongDrafts:
    """Drafts from the reference continuation with one position per step changed, by
    turns to a token the grammar allows there and to one it forbids."""

    def __init__(self, reference: list[int]) -> None:
        self.reference, self.steps = reference, 0

    def __call__(self, seq_id, history, proposed, k):
        g = len(history) - len(PROMPT)
        drafts = list(self.reference[g : g + k])
        self.steps += 1
        at = self.steps % (k + 1) - 1
        if 0 <= at < len(drafts):
            before = text(self.reference[: g + at])
            allowed = allowed_after(before) - {EOS, drafts[at]}
            forbidden = self.steps % 2 or not allowed
            drafts[at] = token("~") if forbidden else min(allowed)
        return drafts


SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=7)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_constrained_decoding_with_drafts_is_plain_constrained_decoding(tiny, params):
    path, engine, grammars = tiny
    reference = constrained_run(engine, params)
    assert text(reference) in WORDS
    with start(path, load_mtp=True) as pipeline:
        sent: list[pb.SequenceStep] = []
        submit = pipeline.submit

        def recording(sequences, *args, **kwargs):
            sent.extend(sequences)
            return submit(sequences, *args, **kwargs)

        pipeline.submit = recording
        runs = [(0, None, False), (3, None, False), (3, WrongDrafts(reference), False)]
        for k, source, ignore_eos in [*runs, (3, WrongDrafts(reference), True)]:
            sent.clear()
            scheduler = Scheduler(pipeline, {EOS}, policy=DraftPolicy(k), draft_source=source)
            constraint = grammars.matcher(OutputFormat("regex", REGEX))
            request = scheduler.submit(
                PROMPT, params, 64, constraint=constraint, ignore_eos=ignore_eos
            )
            result = request.result(timeout=120)
            scheduler.close()
            assert (result.token_ids, result.finish_reason) == (reference, "stop"), k
            for step in sent:
                if not step.sample:
                    continue
                # The masks of every sampled position went with the step, and no draft
                # the grammar forbids was sent.
                assert len(step.token_mask) == (step.verify + 1) * ((VOCAB + 31) // 32) * 4
                before = step.keep + len(step.token_ids) - step.verify - len(PROMPT)
                drafts = list(step.token_ids)[len(step.token_ids) - step.verify :]
                assert text(reference[:before] + drafts) in PREFIXES | WORDS
            if source is not None:
                assert sum(result.drafts.accepted) > 0
                assert any(step.verify for step in sent)


def test_a_bad_mask_refuses_its_sequence_alone(tiny):
    """Masks the daemon should never send (a wrong length, a row allowing nothing, a mask
    for a position that is not sampled) are refused on every stage alike."""
    path = tiny[0]
    row = (VOCAB + 31) // 32 * 4
    allow_all = b"\xff" * row
    greedy = pb.SamplingParams(temperature=0, top_p=1, repetition_penalty=1)
    cases = {
        "short": (allow_all[:-1], True),
        "nothing": (bytes(row), True),
        "unsampled": (allow_all, False),
        "only-a": (int(1 << token("a")).to_bytes(row, "little"), True),
    }
    with start(path) as pipeline:
        outcome = pipeline.submit(
            [
                pb.SequenceStep(seq_id=s, keep=0, token_ids=PROMPT, sample=sample, token_mask=m)
                for s, (m, sample) in cases.items()
            ],
            opened=[pb.SequenceOpen(seq_id=s, sampling=greedy) for s in cases],
        ).result(timeout=60)
    errors = {s: r.error for s, r in outcome.results.items() if r.error}
    assert set(errors) == {"short", "nothing", "unsampled"}
    assert "token_mask of" in errors["short"]
    assert "allows no token" in errors["nothing"]
    assert "without sample" in errors["unsampled"]
    assert list(outcome.results["only-a"].token_ids) == [token("a")]


def test_a_grammar_that_fails_mid_generation_ends_its_request_alone(tiny):
    """llguidance's limits stop a pathological regex (its first mask alone took ~1 s
    under the defaults) after its first token: that request ends with the grammar's
    error (a 400), the other one in its steps runs on."""
    path, engine, grammars = tiny
    want = solo_run(engine, PROMPT, 12)[0]
    constraint = grammars.matcher(OutputFormat("regex", "(a{1000}){1000}"))
    with start(path) as pipeline:
        scheduler = Scheduler(pipeline, {EOS})
        bad = scheduler.submit(PROMPT, GREEDY, 12, constraint=constraint)
        good = scheduler.submit(PROMPT, GREEDY, 12, ignore_eos=True)
        failed, fine = bad.result(timeout=60), good.result(timeout=60)
        scheduler.close()
    assert failed.finish_reason == "grammar" and "grammar failed" in failed.error
    with pytest.raises(ConstraintBroken):
        list(bad)
    assert (fine.token_ids, fine.finish_reason) == (want, "length")
