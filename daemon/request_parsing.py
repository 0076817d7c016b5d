"""The daemon's gRPC services parse their requests themselves: gRPC's own parsing
answers a request that is not a valid message (above all, invalid UTF-8 in a string
field) with INTERNAL and a traceback in the log; here it is INVALID_ARGUMENT naming the
field. Every unary call of every service, and the Inference service's streams."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from mtpd.v1 import inference_pb2 as api

SERVICE = api.DESCRIPTOR.services_by_name["Inference"]
_LENGTH_DELIMITED = 2


class ParseRequests(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        ours = details.method.startswith(f"/{SERVICE.full_name}/")
        parse = handler.request_deserializer
        message_type = getattr(parse, "__self__", None)  # the class whose FromString it is
        # Other services' streams (health's Watch) may write to the context instead of
        # yielding: left to gRPC.
        if message_type is None or (handler.response_streaming and not ours):
            return handler
        descriptor = message_type.DESCRIPTOR

        async def parsed(raw: bytes, context: grpc.aio.ServicerContext):
            try:
                return parse(raw)
            except DecodeError:
                field = invalid_utf8_field(raw, descriptor)
                why = f"{field}: not valid UTF-8" if field else "not a valid message"
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{descriptor.full_name}: {why}"
                )

        if handler.response_streaming:

            async def stream(raw: bytes, context: grpc.aio.ServicerContext):
                async for reply in handler.unary_stream(await parsed(raw, context), context):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(
                stream, response_serializer=handler.response_serializer
            )

        async def unary(raw: bytes, context: grpc.aio.ServicerContext):
            return await handler.unary_unary(await parsed(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(
            unary, response_serializer=handler.response_serializer
        )


def invalid_utf8_field(data: bytes, descriptor: Descriptor, path: str = "") -> str | None:
    """The path (messages[1].content) of the first string field in `data`, a serialized
    `descriptor` message, whose bytes are not UTF-8; None if there is none or `data` is
    not even wire format. Read as unknown fields of an empty message, which keeps bytes."""
    holder = empty_pb2.Empty()
    try:
        holder.ParseFromString(data)
    except DecodeError:
        return None
    seen: dict[int, int] = {}
    for item in UnknownFieldSet(holder):
        field = descriptor.fields_by_number.get(item.field_number)
        if field is None or item.wire_type != _LENGTH_DELIMITED:
            continue
        index = seen[field.number] = seen.get(field.number, -1) + 1
        name = path + field.name + (f"[{index}]" if field.is_repeated else "")
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                item.data.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE and (
            inner := invalid_utf8_field(item.data, field.message_type, name + ".")
        ):
            return inner
    return None
