from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_IDLE: _ClassVar[WorkerState]
    WORKER_STATE_LOADING: _ClassVar[WorkerState]
    WORKER_STATE_READY: _ClassVar[WorkerState]
    WORKER_STATE_FAILED: _ClassVar[WorkerState]

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[Transport]
    TRANSPORT_DIST: _ClassVar[Transport]
    TRANSPORT_GRPC: _ClassVar[Transport]
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_IDLE: WorkerState
WORKER_STATE_LOADING: WorkerState
WORKER_STATE_READY: WorkerState
WORKER_STATE_FAILED: WorkerState
TRANSPORT_UNSPECIFIED: Transport
TRANSPORT_DIST: Transport
TRANSPORT_GRPC: Transport

class StoreRequest(_message.Message):
    __slots__ = ("op", "keys", "value", "expected", "delta", "timeout_s")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[StoreRequest.Op]
        OP_SET: _ClassVar[StoreRequest.Op]
        OP_GET: _ClassVar[StoreRequest.Op]
        OP_ADD: _ClassVar[StoreRequest.Op]
        OP_COMPARE_SET: _ClassVar[StoreRequest.Op]
        OP_WAIT: _ClassVar[StoreRequest.Op]
        OP_CHECK: _ClassVar[StoreRequest.Op]
        OP_DELETE: _ClassVar[StoreRequest.Op]
        OP_NUM_KEYS: _ClassVar[StoreRequest.Op]
    OP_UNSPECIFIED: StoreRequest.Op
    OP_SET: StoreRequest.Op
    OP_GET: StoreRequest.Op
    OP_ADD: StoreRequest.Op
    OP_COMPARE_SET: StoreRequest.Op
    OP_WAIT: StoreRequest.Op
    OP_CHECK: StoreRequest.Op
    OP_DELETE: StoreRequest.Op
    OP_NUM_KEYS: StoreRequest.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    op: StoreRequest.Op
    keys: _containers.RepeatedScalarFieldContainer[str]
    value: bytes
    expected: bytes
    delta: int
    timeout_s: float
    def __init__(self, op: _Optional[_Union[StoreRequest.Op, str]] = ..., keys: _Optional[_Iterable[str]] = ..., value: _Optional[bytes] = ..., expected: _Optional[bytes] = ..., delta: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class StoreReply(_message.Message):
    __slots__ = ("value", "number", "ok")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    number: int
    ok: bool
    def __init__(self, value: _Optional[bytes] = ..., number: _Optional[int] = ..., ok: _Optional[bool] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("version", "model_identity", "address")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    version: str
    model_identity: str
    address: str
    def __init__(self, version: _Optional[str] = ..., model_identity: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("workers_joined", "workers_expected")
    WORKERS_JOINED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    workers_joined: int
    workers_expected: int
    def __init__(self, workers_joined: _Optional[int] = ..., workers_expected: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("version", "pid", "device", "free_memory_bytes", "state", "threads")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    device: str
    free_memory_bytes: int
    state: WorkerState
    threads: int
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ..., device: _Optional[str] = ..., free_memory_bytes: _Optional[int] = ..., state: _Optional[_Union[WorkerState, str]] = ..., threads: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model", "first_layer", "end_layer", "dtype", "max_seqs", "max_context", "cache_memory_bytes", "mtp_head", "rank", "world_size", "transport", "rendezvous", "recv_timeout_ms", "load_mtp", "quant", "cuda_graphs", "state_snapshots", "kv_cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CACHE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MTP_HEAD_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    RECV_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MTP_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    STATE_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    model: str
    first_layer: int
    end_layer: int
    dtype: str
    max_seqs: int
    max_context: int
    cache_memory_bytes: int
    mtp_head: str
    rank: int
    world_size: int
    transport: Transport
    rendezvous: str
    recv_timeout_ms: int
    load_mtp: bool
    quant: str
    cuda_graphs: bool
    state_snapshots: int
    kv_cache: str
    def __init__(self, model: _Optional[str] = ..., first_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., dtype: _Optional[str] = ..., max_seqs: _Optional[int] = ..., max_context: _Optional[int] = ..., cache_memory_bytes: _Optional[int] = ..., mtp_head: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., transport: _Optional[_Union[Transport, str]] = ..., rendezvous: _Optional[str] = ..., recv_timeout_ms: _Optional[int] = ..., load_mtp: _Optional[bool] = ..., quant: _Optional[str] = ..., cuda_graphs: _Optional[bool] = ..., state_snapshots: _Optional[int] = ..., kv_cache: _Optional[str] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("parameter_count", "tensor_names", "max_seqs", "max_context", "cache_bytes", "hidden_size", "weights_fingerprint", "load_seconds", "mtp_head", "draft_vocab", "cuda_graphs", "state_block", "tap_layers")
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_NAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MTP_HEAD_FIELD_NUMBER: _ClassVar[int]
    DRAFT_VOCAB_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    STATE_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TAP_LAYERS_FIELD_NUMBER: _ClassVar[int]
    parameter_count: int
    tensor_names: _containers.RepeatedScalarFieldContainer[str]
    max_seqs: int
    max_context: int
    cache_bytes: int
    hidden_size: int
    weights_fingerprint: str
    load_seconds: float
    mtp_head: str
    draft_vocab: int
    cuda_graphs: bool
    state_block: int
    tap_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, parameter_count: _Optional[int] = ..., tensor_names: _Optional[_Iterable[str]] = ..., max_seqs: _Optional[int] = ..., max_context: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., hidden_size: _Optional[int] = ..., weights_fingerprint: _Optional[str] = ..., load_seconds: _Optional[float] = ..., mtp_head: _Optional[str] = ..., draft_vocab: _Optional[int] = ..., cuda_graphs: _Optional[bool] = ..., state_block: _Optional[int] = ..., tap_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "presence_penalty", "frequency_penalty", "logit_bias")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ...) -> None: ...

class SequenceOpen(_message.Message):
    __slots__ = ("seq_id", "sampling", "return_logits", "draft_p_min", "no_mtp", "prompt_tokens", "logprobs", "top_logprobs", "adopt")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_P_MIN_FIELD_NUMBER: _ClassVar[int]
    NO_MTP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ADOPT_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    sampling: SamplingParams
    return_logits: bool
    draft_p_min: float
    no_mtp: bool
    prompt_tokens: int
    logprobs: bool
    top_logprobs: int
    adopt: str
    def __init__(self, seq_id: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., return_logits: _Optional[bool] = ..., draft_p_min: _Optional[float] = ..., no_mtp: _Optional[bool] = ..., prompt_tokens: _Optional[int] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., adopt: _Optional[str] = ...) -> None: ...

class EmittedLogprobs(_message.Message):
    __slots__ = ("logprob", "top_ids", "top_logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class SequenceStep(_message.Message):
    __slots__ = ("seq_id", "keep", "token_ids", "sample", "draft_tokens", "verify", "token_mask", "save_state", "follow")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_MASK_FIELD_NUMBER: _ClassVar[int]
    SAVE_STATE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    keep: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    draft_tokens: int
    verify: int
    token_mask: bytes
    save_state: bool
    follow: bool
    def __init__(self, seq_id: _Optional[str] = ..., keep: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., draft_tokens: _Optional[int] = ..., verify: _Optional[int] = ..., token_mask: _Optional[bytes] = ..., save_state: _Optional[bool] = ..., follow: _Optional[bool] = ...) -> None: ...

class Activations(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    data: bytes
    def __init__(self, header: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "sequences", "release", "activations", "open")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceStep]
    release: _containers.RepeatedScalarFieldContainer[str]
    activations: Activations
    open: _containers.RepeatedCompositeFieldContainer[SequenceOpen]
    def __init__(self, step_id: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceStep, _Mapping]]] = ..., release: _Optional[_Iterable[str]] = ..., activations: _Optional[_Union[Activations, _Mapping]] = ..., open: _Optional[_Iterable[_Union[SequenceOpen, _Mapping]]] = ...) -> None: ...

class SequenceResult(_message.Message):
    __slots__ = ("seq_id", "token_ids", "logits", "accepted", "draft_token_ids", "error", "logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logits: bytes
    accepted: int
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    error: str
    logprobs: _containers.RepeatedCompositeFieldContainer[EmittedLogprobs]
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logits: _Optional[bytes] = ..., accepted: _Optional[int] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., error: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[EmittedLogprobs, _Mapping]]] = ...) -> None: ...

class StepTimings(_message.Message):
    __slots__ = ("compute_s", "recv_wait_s", "send_s", "arrived_at", "input_ready_at", "computed_at", "sent_at", "draft_s", "draft_passes", "draft_catch_up_s", "draft_first_s")
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    RECV_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    SEND_S_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_AT_FIELD_NUMBER: _ClassVar[int]
    INPUT_READY_AT_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_S_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PASSES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CATCH_UP_S_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIRST_S_FIELD_NUMBER: _ClassVar[int]
    compute_s: float
    recv_wait_s: float
    send_s: float
    arrived_at: float
    input_ready_at: float
    computed_at: float
    sent_at: float
    draft_s: float
    draft_passes: int
    draft_catch_up_s: float
    draft_first_s: float
    def __init__(self, compute_s: _Optional[float] = ..., recv_wait_s: _Optional[float] = ..., send_s: _Optional[float] = ..., arrived_at: _Optional[float] = ..., input_ready_at: _Optional[float] = ..., computed_at: _Optional[float] = ..., sent_at: _Optional[float] = ..., draft_s: _Optional[float] = ..., draft_passes: _Optional[int] = ..., draft_catch_up_s: _Optional[float] = ..., draft_first_s: _Optional[float] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("step_id", "results", "activations", "timings", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    results: _containers.RepeatedCompositeFieldContainer[SequenceResult]
    activations: Activations
    timings: StepTimings
    error: str
    def __init__(self, step_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[SequenceResult, _Mapping]]] = ..., activations: _Optional[_Union[Activations, _Mapping]] = ..., timings: _Optional[_Union[StepTimings, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class StepStreamEnd(_message.Message):
    __slots__ = ("message", "bystander")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYSTANDER_FIELD_NUMBER: _ClassVar[int]
    message: str
    bystander: bool
    def __init__(self, message: _Optional[str] = ..., bystander: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ("rendezvous",)
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    rendezvous: str
    def __init__(self, rendezvous: _Optional[str] = ...) -> None: ...

class ResetReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("steps", "tokens", "active_sequences", "max_seqs", "compute_s", "recv_wait_s", "send_s", "weight_bytes", "mtp_bytes", "kv_cache_bytes", "peak_memory_bytes")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    RECV_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    SEND_S_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MTP_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    steps: int
    tokens: int
    active_sequences: int
    max_seqs: int
    compute_s: float
    recv_wait_s: float
    send_s: float
    weight_bytes: int
    mtp_bytes: int
    kv_cache_bytes: int
    peak_memory_bytes: int
    def __init__(self, steps: _Optional[int] = ..., tokens: _Optional[int] = ..., active_sequences: _Optional[int] = ..., max_seqs: _Optional[int] = ..., compute_s: _Optional[float] = ..., recv_wait_s: _Optional[float] = ..., send_s: _Optional[float] = ..., weight_bytes: _Optional[int] = ..., mtp_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ...) -> None: ...
