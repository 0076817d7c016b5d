"""Real models' chat templates render, and encode, exactly as transformers'
`apply_chat_template` does: the same text (or both refuse) for each template, each
conversation shape the server passes (system turns, tools, OpenAI tool calls with dict
arguments and their answers, reasoning, keys set to None), with and without the
generation prompt, and with the templates' keywords (`enable_thinking`, `date_string`,
...); and the same token ids from a small tokenizer whose added tokens are the templates'
markup. The templates are the models' own (tests/data/chat_templates/README.md)."""

from __future__ import annotations

import copy
import datetime
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import chat_template_utils

import mtpd.model.chat_template as chat_template_module
from mtpd.model.chat_template import ChatTemplateError, ChatTemplates
from mtpd.model.tokenizer import Tokenizer

TEMPLATES_DIR = Path(__file__).parent / "data" / "chat_templates"

# file stem -> (bos token, eos token, the template keywords each case is run with)
TEMPLATES: dict[str, tuple[str | None, str, list[dict[str, Any]]]] = {
    "Qwen-Qwen2.5-7B-Instruct": (None, "<|im_end|>", [{}]),
    "Qwen-Qwen3-0.6B": (
        None,
        "<|im_end|>",
        [{}, {"enable_thinking": False}, {"enable_thinking": True}],
    ),
    "Qwen3-Coder": (None, "<|im_end|>", [{}]),
    "Qwen3.5-4B": (None, "<|im_end|>", [{}, {"enable_thinking": False}]),
    "meta-llama-Llama-3.1-8B-Instruct": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        [{}, {"date_string": "06 Dec 2025", "tools_in_user_message": False}],
    ),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>", [{}]),
}

# The templates' markup: control tokens (special) and the tool and reasoning tags, which
# Qwen's and Hermes' tokenizers add as tokens that are not special.
CONTROL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
TAG_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<tools>",
    "</tools>",
    "<think>",
    "</think>",
]


def template_source(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text()


# ---------------------------------------------------------------------------------------
# Conversations

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city, in °C or °F.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. Zürich"},
                    "unit": {
                        "type": "string",
                        "enum": ["celsius", "fahrenheit"],
                        "description": "Temperature unit",
                    },
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for"},
                    "limit": {"type": "integer", "description": "How many results"},
                    "fresh": {"type": "boolean", "description": "Only recent pages"},
                    "tags": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Filters",
                    },
                },
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
USER = {"role": "user", "content": "What is the capital of France?"}
ANSWER = {"role": "assistant", "content": "Paris."}
USER_2 = {"role": "user", "content": "And of Switzerland? Zürich, 東京 🌧  \n"}
WEATHER_Q = {"role": "user", "content": "What's the weather in Paris?"}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}
CALL_2 = {
    "id": "call_2",
    "type": "function",
    "function": {"name": "search", "arguments": {"query": "Paris events", "limit": 3}},
}
TOOL_ANSWER = {
    "role": "tool",
    "tool_call_id": "call_1",
    "content": '{"temp_c": 18, "sky": "cloudy"}',
}
TOOL_ANSWER_2 = {"role": "tool", "tool_call_id": "call_2", "content": "1. Fête de la musique"}
FINAL = {"role": "assistant", "content": "It is 18 °C and cloudy in Paris."}
THOUGHT = "The user asks for France's capital.\nThat is Paris."


def calling(content: Any, *calls: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "tool_calls": list(calls), **extra}


# id -> (messages, tools)
CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "user": ([USER], None),
    "system_user": ([SYSTEM, USER], None),
    "multi_turn": ([SYSTEM, USER, ANSWER, USER_2], None),
    "multi_turn_no_system": ([USER, ANSWER, USER_2], None),
    "tools": ([WEATHER_Q], TOOLS),
    "system_tools": ([SYSTEM, WEATHER_Q], TOOLS),
    "tool_call_content_none": ([WEATHER_Q, calling(None, CALL), TOOL_ANSWER, FINAL], TOOLS),
    "tool_call_content_empty": ([WEATHER_Q, calling("", CALL), TOOL_ANSWER, FINAL], TOOLS),
    "tool_call_content_text": (
        [SYSTEM, WEATHER_Q, calling("Let me check.", CALL), TOOL_ANSWER, FINAL],
        TOOLS,
    ),
    # The usual inference step: the tool has answered, the model speaks next.
    "tool_call_pending": ([SYSTEM, WEATHER_Q, calling(None, CALL), TOOL_ANSWER], TOOLS),
    "tool_call_then_user": (
        [SYSTEM, WEATHER_Q, calling(None, CALL), TOOL_ANSWER, FINAL, USER_2],
        TOOLS,
    ),
    "two_tool_calls": (
        [WEATHER_Q, calling(None, CALL, CALL_2), TOOL_ANSWER, TOOL_ANSWER_2, FINAL],
        TOOLS,
    ),
    "tool_call_nested_arguments": (
        [
            WEATHER_Q,
            calling(
                None,
                {
                    "id": "call_3",
                    "type": "function",
                    "function": {
                        "name": "search",
                        "arguments": {
                            "query": "météo",
                            "limit": 2,
                            "fresh": True,
                            "tags": ["weather", "fr"],
                            "extra": {"a": None, "b": 1.5},
                        },
                    },
                },
            ),
            {"role": "tool", "tool_call_id": "call_3", "content": "sunny"},
        ],
        TOOLS,
    ),
    # OpenAI's own shape (the server passes dicts): templates print it, re-encode it, or
    # refuse it.
    "tool_call_string_arguments": (
        [
            WEATHER_Q,
            calling(
                "", {**CALL, "function": {**CALL["function"], "arguments": '{"city": "Paris"}'}}
            ),
            TOOL_ANSWER,
        ],
        TOOLS,
    ),
    "reasoning": ([USER, {**ANSWER, "reasoning_content": THOUGHT}], None),
    "reasoning_history": ([USER, {**ANSWER, "reasoning_content": THOUGHT}, USER_2], None),
    "reasoning_named_thinking": ([USER, {**ANSWER, "thinking": THOUGHT}], None),
    "reasoning_named_reasoning": ([USER, {**ANSWER, "reasoning": THOUGHT}], None),
    "reasoning_tool_call": (
        [WEATHER_Q, calling(None, CALL, reasoning_content="I need the weather."), TOOL_ANSWER],
        TOOLS,
    ),
    # Keys set to None, as OpenAI clients send them: dropped before the template sees them.
    "none_valued_keys": (
        [
            {**SYSTEM, "name": None},
            {**USER, "name": None},
            {**ANSWER, "tool_calls": None, "reasoning_content": None},
            USER_2,
        ],
        None,
    ),
    "system_not_first": ([USER, SYSTEM, USER_2], None),
    "system_only": ([SYSTEM], None),
}

# The (template, case) pairs transformers refuses (for every keyword variant and
# generation-prompt setting); mtpd must refuse them too. Listed so that an oracle that
# suddenly refuses everything (a broken test setup) cannot pass as "both raise".
TRANSFORMERS_REFUSES: set[tuple[str, str]] = {
    # Qwen3 reads an assistant's content unguarded: a tool call's None content (its key
    # dropped) is undefined there.
    *(
        ("Qwen-Qwen3-0.6B", case)
        for case in (
            "tool_call_content_none",
            "tool_call_pending",
            "tool_call_then_user",
            "two_tool_calls",
            "tool_call_nested_arguments",
            "reasoning_tool_call",
        )
    ),
    # `arguments|items` on a string: jinja's TypeError.
    ("Qwen3-Coder", "tool_call_string_arguments"),
    ("Qwen3.5-4B", "tool_call_string_arguments"),
    ("Qwen3.5-4B", "system_not_first"),  # raise_exception
    ("Qwen3.5-4B", "system_only"),  # raise_exception: no user query
    ("meta-llama-Llama-3.1-8B-Instruct", "two_tool_calls"),  # raise_exception
    # Hermes' tool_use template loops over `tools` (a TypeError on None): it is only
    # chosen for requests with tools.
    *(
        ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", case)
        for case, (_, tools) in CASES.items()
        if tools is None
    ),
}


def params() -> list[Any]:
    out = []
    for name, (_, _, variants) in TEMPLATES.items():
        for case in CASES:
            for kwargs in variants:
                for add_generation_prompt in (True, False):
                    kw = "-".join(f"{k}={val}" for k, val in kwargs.items()) or "plain"
                    out.append(
                        pytest.param(
                            name,
                            case,
                            kwargs,
                            add_generation_prompt,
                            id=f"{name}-{case}-{kw}-{'gen' if add_generation_prompt else 'nogen'}",
                        )
                    )
    return out


# ---------------------------------------------------------------------------------------
# The tokenizers


@cache
def base_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE trained in milliseconds on the templates' own text and the
    conversations, with the templates' markup as added tokens."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [template_source(name) for name in TEMPLATES]
    corpus += [str(m.get("content")) for messages, _ in CASES.values() for m in messages]
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    # As Llama 3's tokenizer.json does: a chat is encoded without it (the template writes
    # its bos), so neither side may add a second one.
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def fresh_copy() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(base_tokenizer().to_str())


@cache
def mtpd_tokenizer(name: str) -> Tokenizer:
    bos, eos, _ = TEMPLATES[name]
    tok = fresh_copy()
    bos_id = tok.token_to_id(bos) if bos else None
    return Tokenizer(tok, template_source(name), bos_id, [tok.token_to_id(eos)])


@cache
def hf_tokenizer(name: str) -> PreTrainedTokenizerFast:
    bos, eos, _ = TEMPLATES[name]
    return PreTrainedTokenizerFast(tokenizer_object=fresh_copy(), bos_token=bos, eos_token=eos)


def transformers_chat(
    name: str, case: str, kwargs: dict[str, Any], add_generation_prompt: bool, tokenize: bool
) -> Any:
    """transformers' rendering (text or ids), or the exception it raised."""
    messages, tools = CASES[case]
    try:
        out = hf_tokenizer(name).apply_chat_template(
            copy.deepcopy(messages),
            tools=copy.deepcopy(tools),
            chat_template=template_source(name),
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
            **kwargs,
        )
    except Exception as e:
        return e
    return out["input_ids"] if tokenize else out


# ---------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize(("name", "case", "kwargs", "add_generation_prompt"), params())
def test_rendered_text_matches_transformers(name, case, kwargs, add_generation_prompt):
    messages, tools = CASES[case]
    expected = transformers_chat(name, case, kwargs, add_generation_prompt, tokenize=False)
    tok = mtpd_tokenizer(name)

    def render() -> str:
        return tok.render_chat(
            copy.deepcopy(messages), add_generation_prompt, copy.deepcopy(tools), kwargs
        )

    if isinstance(expected, Exception):
        assert (name, case) in TRANSFORMERS_REFUSES, f"transformers raised {expected!r}"
        with pytest.raises(ChatTemplateError):
            render()
    else:
        assert (name, case) not in TRANSFORMERS_REFUSES, "transformers renders it"
        assert render() == expected


@pytest.mark.parametrize(("name", "case", "kwargs", "add_generation_prompt"), params())
def test_token_ids_match_transformers(name, case, kwargs, add_generation_prompt):
    messages, tools = CASES[case]
    expected = transformers_chat(name, case, kwargs, add_generation_prompt, tokenize=True)
    tok = mtpd_tokenizer(name)

    def encode() -> tuple[str, list[int]]:
        return tok.encode_chat(
            copy.deepcopy(messages),
            add_generation_prompt=add_generation_prompt,
            tools=copy.deepcopy(tools),
            template_kwargs=kwargs,
        )

    if isinstance(expected, Exception):
        assert (name, case) in TRANSFORMERS_REFUSES, f"transformers raised {expected!r}"
        with pytest.raises(ChatTemplateError):
            encode()
        return
    text, ids = encode()
    assert ids == expected
    assert text == transformers_chat(name, case, kwargs, add_generation_prompt, tokenize=False)
    # The markup is encoded as its tokens, not spelled out byte by byte.
    control = {base_tokenizer().token_to_id(t) for t in CONTROL_TOKENS}
    assert control & set(ids)


def test_the_tokenizer_has_the_templates_markup_as_single_tokens():
    tok = base_tokenizer()
    for token in CONTROL_TOKENS + TAG_TOKENS:
        assert tok.encode(token, add_special_tokens=False).tokens == [token]
    assert tok.encode("hi").tokens[0] == "<|begin_of_text|>"
    assert tok.get_vocab_size() < 1000


# ---------------------------------------------------------------------------------------
# Named templates and strftime_now

DEFAULT = "default:{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}"
TOOL_USE = (
    "tool_use:{{ tools | map(attribute='function.name') | join(',') }}|{{ messages[-1].content }}"
)
MESSAGES = [{"role": "user", "content": "hi"}]


def render_named(templates: ChatTemplates, tools: list[dict[str, Any]] | None) -> str:
    return templates.render(
        MESSAGES, add_generation_prompt=True, tools=tools, documents=None, variables={}
    )


def transformers_named(named: dict[str, str], tools: list[dict[str, Any]] | None) -> str:
    hf = PreTrainedTokenizerFast(tokenizer_object=fresh_copy())
    hf.chat_template = named
    return hf.apply_chat_template(MESSAGES, tools=tools, add_generation_prompt=True, tokenize=False)


def test_named_templates_take_tool_use_with_tools_and_default_otherwise():
    named = {"default": DEFAULT, "tool_use": TOOL_USE}
    templates = ChatTemplates(named)
    assert render_named(templates, TOOLS) == "tool_use:get_weather,search,get_time|hi"
    assert render_named(templates, None) == "default:user=hi;"
    for tools in (TOOLS, None):
        assert render_named(templates, tools) == transformers_named(named, tools)
    # Without a tool_use template, tools render with the default one.
    assert render_named(ChatTemplates({"default": DEFAULT, "rag": TOOL_USE}), TOOLS) == (
        "default:user=hi;"
    )
    # A single template under any name is the template (mtpd's rule: transformers takes
    # it only by the rule above, and refuses a lone non-default one without tools).
    assert render_named(ChatTemplates({"tool_use": TOOL_USE}), TOOLS) == (
        "tool_use:get_weather,search,get_time|hi"
    )


def test_named_templates_without_a_default_are_refused():
    named = {"tool_use": TOOL_USE, "rag": DEFAULT}
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        render_named(ChatTemplates(named), None)
    with pytest.raises(ValueError, match="no default"):
        transformers_named(named, None)
    # With tools the tool_use one is chosen, in both.
    assert render_named(ChatTemplates(named), TOOLS) == transformers_named(named, TOOLS)
    with pytest.raises(ChatTemplateError):
        ChatTemplates({})


def test_an_empty_tool_list_takes_the_template_transformers_takes():
    named = {"default": DEFAULT, "tool_use": "tool_use:{{ tools | length }}"}
    assert transformers_named(named, []) == "tool_use:0"
    assert render_named(ChatTemplates(named), []) == "tool_use:0"


class _FrozenDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 12, 6, 9, 30)


def test_strftime_now_renders_as_in_transformers(monkeypatch):
    """Llama 3.2's and 3.3's templates date their system turn with strftime_now."""
    monkeypatch.setattr(chat_template_module, "datetime", _FrozenDatetime)
    monkeypatch.setattr(chat_template_utils, "datetime", _FrozenDatetime)
    source = "{{ bos_token }}Today Date: {{ strftime_now('%d %b %Y') }}\n{{ messages[0].content }}"
    tok = Tokenizer(fresh_copy(), source, fresh_copy().token_to_id("<|begin_of_text|>"), [0])
    hf = PreTrainedTokenizerFast(tokenizer_object=fresh_copy(), bos_token="<|begin_of_text|>")
    expected = hf.apply_chat_template(MESSAGES, chat_template=source, tokenize=False)
    assert expected == "<|begin_of_text|>Today Date: 06 Dec 2025\nhi"
    assert tok.render_chat(MESSAGES) == expected


@pytest.mark.parametrize("layout", ["jinja files", "tokenizer_config list"])
def test_a_checkpoints_named_templates_are_found(tmp_path, layout):
    """Where transformers saves named templates, whichever of its two layouts."""
    import torch
    from safetensors.torch import save_file

    from mtpd.model.checkpoint import HFCheckpoint

    named = {"default": DEFAULT, "tool_use": "tool_use:{{ tools | length }}"}
    (tmp_path / "config.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    if layout == "jinja files":
        (tmp_path / "chat_template.jinja").write_text(named["default"])
        (tmp_path / "additional_chat_templates").mkdir()
        (tmp_path / "additional_chat_templates/tool_use.jinja").write_text(named["tool_use"])
    else:
        listed = [{"name": k, "template": v} for k, v in named.items()]
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": listed}))
    assert HFCheckpoint(tmp_path).chat_template == named
