"""Per-request timings and trace context, on the gateway's hot path: kept to an f-string or two.

`Server-Timing` (https://www.w3.org/TR/server-timing/) names the stages a request went through, in
milliseconds: `queue` (arrival until a replica slot was taken: body read and gateway queue),
`pre_predict` (the hook, when the predictor has one), `slot_wait` (for an inference slot or the
batch), `predict` (the call that answered it, a whole batch's) and `total` (the gateway's time until
it answered). Only stages that ran are named.

W3C trace context (https://www.w3.org/TR/trace-context/): a valid `traceparent` from the client
continues its trace; an invalid or missing one starts a new trace. The gateway's span is the
parent of what the replica (and the predictor, in `headers["traceparent"]`) sees.
"""

from __future__ import annotations

import os
import re

from cirrus.wire import InferResponse

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def valid_traceparent(value: str) -> bool:
    """A `traceparent` that continues a trace: version 00 exactly, or a later one (not ff) with
    possibly more fields after ours; ids not all zeros."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return False
    version, trace_id, span_id, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return False
    return trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN


def child_traceparent(inbound: str, sampled: bool) -> str:
    """The `traceparent` the replica gets: the client's trace (when `inbound` is valid) or a new one,
    with the gateway's new span as the parent. A new trace is sampled when spans are exported."""
    if inbound and valid_traceparent(inbound):
        return f"00-{inbound[3:35]}-{os.urandom(8).hex()}-{inbound[53:55]}"
    ids = os.urandom(24).hex()
    return f"00-{ids[:32]}-{ids[32:]}-{'01' if sampled else '00'}"


def server_timing(queue_s: float, response: InferResponse, total_s: float | None) -> bytes:
    """The `Server-Timing` value of a relayed reply (`total_s` None: a stream's head, sent before its end)."""
    text = f"queue;dur={queue_s * 1000:.3f}"
    if response.pre_s:
        text += f", pre_predict;dur={response.pre_s * 1000:.3f}"
    if response.batch_size:
        text += f", slot_wait;dur={response.slot_wait_s * 1000:.3f}, predict;dur={response.predict_s * 1000:.3f}"
    elif response.stream:
        text += f", slot_wait;dur={response.slot_wait_s * 1000:.3f}"
    if total_s is not None:
        text += f", total;dur={total_s * 1000:.3f}"
    return text.encode()


def total_timing(total_s: float) -> tuple[bytes, bytes]:
    """The `Server-Timing` header of an answer the gateway gave itself (an error, an async 202)."""
    return (b"server-timing", f"total;dur={total_s * 1000:.3f}".encode())
