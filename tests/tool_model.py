"""A tiny model that calls a tool: trained here (in seconds) to answer a weather question
with Qwen3's chat template by a call to `get_weather`, and the tool's answer with a
sentence, each after a short <think> block. Its replies are fixed, so a test can check
the whole tool-call round trip, reasoning included, through every API."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch
import transformers

from mtpd.model.tokenizer import Tokenizer

TEMPLATE = (Path(__file__).parent / "data/chat_templates/Qwen-Qwen3-0.6B.jinja").read_text()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added tokens that are text, not control, as in Qwen's tokenizers: decoding keeps them.
TAGS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
# Greedy decoding follows the replies by this many logits at least: float32 rounding
# in mtpd's kernels cannot change a token.
MARGIN = 2.0
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_ARGUMENTS = {"city": "Paris"}
CALL_REASONING = "The user wants the weather, so I call the tool."
CALL_REPLY = (
    f"<think>\n{CALL_REASONING}\n</think>\n\n<tool_call>\n"
    f'{{"name": "get_weather", "arguments": {json.dumps(CALL_ARGUMENTS)}}}\n</tool_call>'
)
TOOL_RESULT = "sunny, 24 C"
ANSWER_REASONING = "The tool says it is sunny."
ANSWER = "It is sunny and 24 C in Paris."
ANSWER_REPLY = f"<think>\n{ANSWER_REASONING}\n</think>\n\n{ANSWER}"


def answered(call_id: str) -> list[dict]:
    """The conversation after the call, as a client sends it back with the tool's result."""
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGUMENTS)},
    }
    return [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT},
    ]


def _template_messages(messages: list[dict]) -> list[dict]:
    """As the daemon hands them to the template: call arguments as objects, no content
    as ""."""
    out = []
    for m in messages:
        m = {**m, "content": m["content"] or ""}
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": json.loads(c["function"]["arguments"]),
                    },
                }
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def _tokenizer(texts: list[str]) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tok


def write_tool_model(out: Path, max_steps: int = 400) -> Path:
    """Train the model and save it with its tokenizer and Qwen3's template at `out`."""
    out.mkdir(parents=True, exist_ok=True)
    im_end = "<|im_end|>"
    # The prompts as the daemon renders them (the call id does not show in Qwen3's).
    probe = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), TEMPLATE, None, [])
    prompts = [
        probe.render_chat(QUESTION, tools=[WEATHER]),
        probe.render_chat(_template_messages(answered("call_0")), tools=[WEATHER]),
    ]
    replies = [CALL_REPLY + im_end, ANSWER_REPLY + im_end]
    tok = _tokenizer([p + r for p, r in zip(prompts, replies, strict=True)] * 4)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    end = tok.token_to_id(im_end)
    config = transformers.Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=end,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).float()
    examples = []
    for prompt, reply in zip(prompts, replies, strict=True):
        p, r = tok.encode(prompt).ids, tok.encode(reply).ids
        ids = torch.tensor([p + r])
        labels = torch.tensor([[-100] * len(p) + r])
        examples.append((ids, labels, len(p)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(max_steps // 20):
        for _ in range(20):
            for ids, labels, _ in examples:
                loss = model(input_ids=ids, labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        if _margin(model, examples) >= MARGIN:
            break
    else:
        raise AssertionError(f"the tool model did not learn its replies in {max_steps} steps")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def _margin(model: transformers.PreTrainedModel, examples: list) -> float:
    """The least lead of the reply's token over the runner-up at any reply position
    (negative where greedy decoding would leave the reply)."""
    least = float("inf")
    with torch.no_grad():
        for ids, _, n in examples:
            logits = model(input_ids=ids).logits[0, n - 1 : -1]
            want = logits.gather(-1, ids[0, n:, None])[:, 0]
            rival = logits.scatter(-1, ids[0, n:, None], float("-inf")).amax(-1)
            least = min(least, float((want - rival).min()))
    return least
