"""Spans per request, exported over OTLP/HTTP (the `otel` extra: opentelemetry-sdk and its OTLP
exporter), imported only when an endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`CIRRUS_OTEL_ENDPOINT`).

Each sampled request becomes a `cirrus.request` span (the gateway's span: the parent in the
`traceparent` the replica got; its own parent the client's span, when the client sent one) with a
child span per stage that ran: `queue`, `pre_predict`, `slot_wait`, `predict`. The replica reports
how long each stage took, not when it began, so the children are laid end to end from the request's
start (their start times are reconstructed; their durations are measured). Spans are batched and
sent by the SDK's `BatchSpanProcessor` from its own thread.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cirrus.gateway.access import RequestRecord


class Tracer:
    """Turns finished `RequestRecord`s into spans for an OTLP/HTTP endpoint."""

    def __init__(self, endpoint: str, service_name: str = "cirrus-gateway") -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        except ImportError as exc:
            why = f"exporting traces needs the otel extra: pip install 'cirrus-serve[otel]' ({exc})"
            raise ImportError(why) from None
        url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
        self.processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=url))
        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("cirrus.gateway")

    def export(self, record: RequestRecord) -> None:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        traceparent = record.traceparent
        trace_id = int(traceparent[3:35], 16)
        flags = TraceFlags(int(traceparent[53:55], 16))
        context = SpanContext(trace_id, int(traceparent[36:52], 16), is_remote=False, trace_flags=flags)
        parent = None
        if record.parent_span:
            parent = SpanContext(trace_id, int(record.parent_span, 16), is_remote=True, trace_flags=flags)
        start = record.started_ns
        end = start + int(record.total_s * 1e9)
        response = record.response
        attributes: dict[str, Any] = {
            "cirrus.api": record.api,
            "cirrus.revision": record.revision,
            "cirrus.replica": record.replica,
            "cirrus.request_id": record.request_id,
            "cirrus.batch_size": 0 if response is None else response.batch_size,
            "http.request.method": record.method,
            "url.path": record.path,
            "http.response.status_code": record.status,
        }
        status = Status(StatusCode.ERROR) if record.status >= 500 else Status(StatusCode.UNSET)
        common: dict[str, Any] = {"resource": self.resource, "instrumentation_scope": self.scope}
        spans = [
            ReadableSpan(
                "cirrus.request",
                context,
                parent,
                attributes=attributes,
                kind=SpanKind.SERVER,
                status=status,
                start_time=start,
                end_time=end,
                **common,
            )
        ]
        at = start
        for name, seconds in _stages(record):
            child = SpanContext(trace_id, int.from_bytes(os.urandom(8), "big") or 1, is_remote=False, trace_flags=flags)
            length = int(seconds * 1e9)
            spans.append(ReadableSpan(name, child, context, start_time=at, end_time=at + length, **common))
            at += length
        for span in spans:
            self.processor.on_end(span)

    def close(self) -> None:
        self.processor.shutdown()


def _stages(record: RequestRecord) -> list[tuple[str, float]]:
    stages = []
    if record.queue_s is not None:
        stages.append(("queue", record.queue_s))
    response = record.response
    if response is not None:
        if response.pre_s:
            stages.append(("pre_predict", response.pre_s))
        if response.batch_size or response.stream:
            stages.append(("slot_wait", response.slot_wait_s))
        if response.batch_size:
            stages.append(("predict", response.predict_s))
    return stages
