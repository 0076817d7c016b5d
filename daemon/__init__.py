"""The daemon (coordinator): the gRPC front (server, service), one request's path
(options, generation), continuous batching (scheduler, draft policy) and the pipeline of
workers it drives.

It holds no model tensors and needs no GPU; it talks to workers only through the
contract in protos/.
"""
