"""The mtpd client SDK: `Client` (blocking) and `AsyncClient` (asyncio) for a running
`mtpd serve`. It knows only the gRPC contract (protos/mtpd/v1/inference.proto) and
imports neither torch nor the daemon.

    from mtpd.client import Client

    with Client() as client:  # $MTPD_ADDRESS, else the default socket
        print(client.generate("The capital of France is", max_tokens=8).text)
        for delta in client.chat_stream([{"role": "user", "content": "Hi!"}]):
            print(delta.text, end="", flush=True)
"""

from mtpd.client.async_client import AsyncClient, AsyncStream
from mtpd.client.errors import (
    Cancelled,
    InvalidRequest,
    MtpdError,
    Overloaded,
    ServerError,
    Timeout,
    Unauthenticated,
    Unavailable,
    UntrustedSocket,
)
from mtpd.client.messages import (
    ChatOptions,
    Delta,
    GenerationResult,
    Message,
    Options,
    ToolCall,
)
from mtpd.client.sync_client import Client, Stream

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Cancelled",
    "ChatOptions",
    "Client",
    "Delta",
    "GenerationResult",
    "InvalidRequest",
    "Message",
    "MtpdError",
    "Options",
    "Overloaded",
    "ServerError",
    "Stream",
    "Timeout",
    "ToolCall",
    "Unauthenticated",
    "Unavailable",
    "UntrustedSocket",
]
