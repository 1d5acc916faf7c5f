"""Requests in a standard protocol, on the replica's side: the gateway names the protocol and the
operation in the `X-Cirrus-Protocol` header (e.g. `v2.infer`, `openai.embeddings`), and the
protocol's module decodes the body, calls the predictor through the same slots and batcher as
`POST /<api>`, and encodes the answer as its protocol says (errors in its error shape).

Clients cannot set the header: the gateway drops theirs and sets its own (cirrus/gateway/app.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cirrus.wire import InferRequest, InferResponse

if TYPE_CHECKING:
    from cirrus.predictor import Call
    from cirrus.replica.server import RequestHandler
    from cirrus.replica.streaming import StreamSource

PROTOCOL_HEADER = "x-cirrus-protocol"


def protocol_of(req: InferRequest) -> str | None:
    """The protocol operation the gateway named for this request (None: a plain `POST /<api>`)."""
    for name, value in req.headers:
        if name == PROTOCOL_HEADER:
            return value
    return None


async def handle_protocol(
    handler: RequestHandler, req: InferRequest, protocol: str
) -> tuple[InferResponse | StreamSource, Call | None, Any]:
    """`RequestHandler.handle` for a request in a standard protocol."""
    family, _, operation = protocol.partition(".")
    if family == "v2":
        from cirrus.replica import v2

        return await v2.handle(handler, req, operation)
    if family == "openai":
        from cirrus.replica import openai

        return await openai.handle(handler, req, operation)
    body = b'{"error": "unknown protocol operation"}'
    return InferResponse(id=req.id, status=400, body=body), None, None
