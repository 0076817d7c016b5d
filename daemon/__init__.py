"""The coordinator: API, scheduler, request state, draft policy, worker supervision.

It holds no model tensors and needs no GPU; it talks to workers only through the
contract in protos/. Built by the pipeline issue; until then `mtpd run` drives the
single-process engine in mtpd.worker.engine directly.
"""
