"""How a stored async request looks to its client (`GET /<api>/<id>`, webhooks)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import msgspec

from cirrus.store.base import RequestRecord

PREVIEW_BYTES = 1024  # a listing shows at most this much of each request's body


def _is_text(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media.startswith("text/") or media == "application/json" or media.endswith("+json")


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()


def describe(record: RequestRecord) -> dict[str, Any]:
    """The JSON a client sees for `GET /<api>/<id>`."""
    out: dict[str, Any] = {
        "id": record.id,
        "api": record.api,
        "status": record.status.value,
        "attempts": record.attempts,
        "timestamps": {
            "created": _iso(record.created_at),
            "started": _iso(record.started_at),
            "finished": _iso(record.finished_at),
        },
    }
    if record.result is not None:
        media = (record.result_type or "").partition(";")[0].strip()
        if media == "application/json" or media.endswith("+json"):
            out["result"] = msgspec.json.decode(record.result)
        elif media.startswith("text/"):
            out["result"] = record.result.decode("utf-8", "replace")
        else:
            out["result"] = base64.b64encode(record.result).decode()
            out["result_encoding"] = "base64"
        out["result_type"] = record.result_type
        out["result_status"] = record.result_status
    if record.error is not None:
        out["error"] = record.error
    if record.webhook_result is not None:
        out["webhook_result"] = record.webhook_result
    return out


def with_payload(record: RequestRecord, limit: int = PREVIEW_BYTES) -> dict[str, Any]:
    """`describe(record)` and the start of its request body, for people looking at a queue: `payload`
    (text when the body is text or JSON, else base64 with `payload_encoding`), `payload_type`,
    `payload_bytes` (the whole body's size) and `truncated`."""
    out = describe(record)
    body = record.body or b""
    head = body[:limit]
    if _is_text(record.content_type):
        out["payload"] = head.decode("utf-8", "replace")
    else:
        out["payload"] = base64.b64encode(head).decode()
        out["payload_encoding"] = "base64"
    out |= {"payload_type": record.content_type, "payload_bytes": len(body), "truncated": len(body) > limit}
    return out
