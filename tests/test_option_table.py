"""The one option table (mtpd.daemon.options.GenerationOptions) and everything that
follows it: the gRPC message, the SDK's Options, the CLI's flags, the OpenAI bodies and
the workers' SamplingParams. A new option that one of them misses fails here."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from mtpd.cli import _build_parser
from mtpd.client.commands import request_options
from mtpd.client.messages import Options, generation_options
from mtpd.daemon.openai_bodies import ChatCompletionRequest, CompletionRequest
from mtpd.daemon.options import GenerationOptions, OutputFormat, flagged_options
from mtpd.model.sampling_params import SamplingParams
from mtpd.rpc import sampling_from_wire, sampling_to_wire
from mtpd.v1 import inference_pb2 as api
from mtpd.v1 import worker_pb2 as pb

# A value other than the default for every option.
SAMPLE = GenerationOptions(
    max_tokens=7,
    temperature=0.5,
    top_p=0.875,
    top_k=5,
    min_p=0.125,
    repetition_penalty=1.25,
    seed=3,
    stop=("x", "yz"),
    draft_tokens=2,
    ignore_eos=True,
    presence_penalty=0.5,
    frequency_penalty=0.25,
    logit_bias={13: -100.0},
    logprobs=True,
    top_logprobs=2,
    structured_output=OutputFormat("regex", "[a-z]+"),
    n=2,
)
NAMES = [f.name for f in dataclasses.fields(GenerationOptions)]


def test_the_sample_sets_every_option_off_its_default():
    default = GenerationOptions()
    assert [n for n in NAMES if getattr(SAMPLE, n) == getattr(default, n)] == []


def test_the_grpc_message_and_the_sdk_name_the_same_options():
    assert [f.name for f in api.GenerationOptions.DESCRIPTOR.fields] == NAMES
    assert list(typing.get_type_hints(Options)) == NAMES
    assert GenerationOptions.from_proto(SAMPLE.to_proto()) == SAMPLE


def test_the_sdk_options_reach_the_table():
    options: Options = {n: getattr(SAMPLE, n) for n in NAMES if n != "structured_output"}
    sent = GenerationOptions.from_proto(
        generation_options({**options, "structured_output": {"regex": "[a-z]+"}})
    )
    assert sent == dataclasses.replace(SAMPLE, structured_output=OutputFormat("regex", "[a-z]+"))


def test_every_flag_reaches_the_table():
    args = [
        "generate", "p", "--max-tokens", "7", "--temperature", "0.5", "--top-p", "0.875",
        "--top-k", "5", "--min-p", "0.125", "--repetition-penalty", "1.25", "--seed", "3",
        "--stop", "x", "--stop", "yz", "--draft-tokens", "2", "--ignore-eos",
        "--presence-penalty", "0.5", "--frequency-penalty", "0.25", "--logit-bias",
        '{"13": -100}', "--logprobs", "--top-logprobs", "2", "--regex", "[a-z]+", "-n", "2",
    ]  # fmt: skip
    parsed = _build_parser()[0].parse_args(args)
    given = GenerationOptions.from_proto(generation_options(request_options(parsed)))
    assert given == SAMPLE
    # Every option but the structured output (one flag per kind) has a flag of its own.
    assert [f.name for f in flagged_options()] == [n for n in NAMES if n != "structured_output"]
    # And none given: every option absent, for the server's defaults.
    bare = request_options(_build_parser()[0].parse_args(["generate", "p"]))
    assert bare == {}


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (["--draft-tokens", "17"], "--draft-tokens: must be in 0..16 or auto, got 17"),
        (["--logit-bias", "[1]"], "--logit-bias: '[1]' is not a JSON object of token ids"),
    ],
)
def test_a_bad_flag_value_names_the_problem(bad, said, capsys):
    with pytest.raises(SystemExit):
        _build_parser()[0].parse_args(["generate", "p", *bad])
    assert said in capsys.readouterr().err


def test_the_openai_bodies_reach_the_table():
    common = {
        "model": "m",
        "temperature": 0.5,
        "top_p": 0.875,
        "top_k": 5,
        "min_p": 0.125,
        "repetition_penalty": 1.25,
        "seed": 3,
        "stop": ["x", "yz"],
        "draft_tokens": 2,
        "ignore_eos": True,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {"13": -100.0},
        "structured_outputs": {"regex": "[a-z]+"},
        "n": 2,
    }
    chat = ChatCompletionRequest.model_validate(
        {
            **common,
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": True,
            "top_logprobs": 2,
        }
    )
    want = dataclasses.replace(
        SAMPLE, structured_output=OutputFormat("regex", "[a-z]+", "structured_outputs")
    )
    assert chat.options(7) == want
    completion = CompletionRequest.model_validate({**common, "prompt": "hi", "logprobs": 2})
    assert completion.options(7) == want


def test_the_workers_sampling_params_are_the_tables():
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    assert [f.name for f in pb.SamplingParams.DESCRIPTOR.fields] == names
    assert set(names) <= set(NAMES)
    default = GenerationOptions()
    assert all(getattr(SamplingParams(), n) == getattr(default, n) for n in names)
    assert sampling_from_wire(sampling_to_wire(SAMPLE.sampling())) == SAMPLE.sampling()
    assert all(getattr(SAMPLE.sampling(), n) == getattr(SAMPLE, n) for n in names)
