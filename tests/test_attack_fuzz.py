"""Schemathesis fuzzes a typed API through the gateway: no payload, valid or not, gets a 5xx.

A predictor with a pydantic payload publishes `GET /<api>/openapi.json`; schemathesis reads it
from the running gateway and sends generated requests (valid ones, and invalid ones: wrong types,
missing fields, out-of-range numbers, bodies of the wrong media type) with a bounded number of
examples. Every answer must be a 2xx or 4xx. The admin API publishes its own document
(`GET /v1/openapi.json`) and is fuzzed from it in tests/test_attack_fuzz_admin.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from conftest import Cirrus, module_daemon, write_project
from hypothesis import HealthCheck, given
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from cirrus.types import ApiStatusName

EXAMPLES_PER_MODE = 100  # positive and negative: ~200 requests, a few seconds

TYPED_PREDICTOR = """
    from typing import Literal

    from pydantic import BaseModel, Field


    class Room(BaseModel):
        name: str = Field(max_length=40)
        area_m2: float = Field(gt=0, le=10_000)


    class House(BaseModel):
        rooms: list[Room] = Field(min_length=1, max_length=20)
        floors: int = Field(ge=1, le=200)
        kind: Literal["flat", "house", "villa"] = "house"
        city: str | None = None
        tags: dict[str, int] = {}


    class Price(BaseModel):
        euros: float
        rooms: int


    class Predictor:
        \"\"\"Prices a house.\"\"\"

        def predict(self, payload: House) -> Price:
            area = sum(room.area_m2 for room in payload.rooms)
            return Price(euros=1000.0 * area + 5000.0 * payload.floors, rooms=len(payload.rooms))
"""


@pytest.fixture(scope="module")
def typed_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cirrus, str]]:
    home = tmp_path_factory.mktemp("attack-fuzz") / "home"
    with module_daemon(home) as cirrus:
        cirrus.client().deploy(write_project(home.parent / "typed", TYPED_PREDICTOR, name="pricer"))
        cirrus.wait_for("pricer", lambda s: s.status == ApiStatusName.LIVE)
        yield cirrus, cirrus.url("pricer/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_schemathesis_finds_no_server_error(typed_api: tuple[Cirrus, str], mode: GenerationMode) -> None:
    cirrus, schema_url = typed_api
    schema = schemathesis.openapi.from_url(schema_url)
    operation = schema["/pricer"]["POST"]
    statuses: dict[int, int] = {}

    @hypothesis.settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call_and_validate(checks=[not_a_server_error], timeout=10)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{response.status_code} for {case.body!r}: {response.text[:300]}"

    fuzz()
    print(f"schemathesis {mode.value}: statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= EXAMPLES_PER_MODE // 2, statuses
    if mode == GenerationMode.POSITIVE:
        assert statuses.get(200), f"no valid payload was served: {statuses}"
    else:
        assert any(400 <= status < 500 for status in statuses), f"no invalid payload was refused: {statuses}"
    assert "Traceback" not in Path(cirrus.settings.daemon_log).read_text(errors="replace")
