"""The floor of a Python web stack: a one-route FastAPI no-op on uvicorn (uvloop + httptools).

POST /predict {"x": 1} -> {"y": 1}, validated by a pydantic model, the same app as the peer
benchmark's `fastapi_app.py` (MODE=noop). `bench/realtime.py` runs it as:

    uvicorn fastapi_noop:app --app-dir bench --host 127.0.0.1 --port PORT \
        --loop uvloop --http httptools --workers 1 --no-access-log --log-level warning
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class In(BaseModel):
    x: int


@app.post("/predict")
async def predict(inp: In) -> dict[str, int]:
    return {"y": inp.x}
