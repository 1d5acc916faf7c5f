"""An ordinary FastAPI app, written as for any host: Cirrus serves it as a `kind: server` API unchanged."""

import asyncio
import hashlib
import os

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

app = FastAPI(title="shop")
VERSION = os.environ.get("SHOP_VERSION", "1")
ITEMS = {1: "apple", 2: "pear"}


class Item(BaseModel):
    name: str
    price: float


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.get("/")
def index() -> dict:
    return {"app": "shop", "version": VERSION, "pid": os.getpid()}


@app.get("/items/{item_id}")
def read_item(item_id: int, q: str | None = None) -> dict:
    if item_id not in ITEMS:
        raise HTTPException(status_code=404, detail=f"no item {item_id}")
    return {"id": item_id, "name": ITEMS[item_id], "q": q}


@app.post("/items")
def create_item(item: Item) -> dict:
    return {"created": item.name, "price": item.price, "version": VERSION}


@app.get("/headers")
def headers(request: Request) -> dict:
    return {k: v for k, v in request.headers.items()}


@app.post("/digest")
async def digest(request: Request) -> dict:
    sha, size, chunks = hashlib.sha256(), 0, 0
    async for chunk in request.stream():
        sha.update(chunk)
        size += len(chunk)
        chunks += 1
    return {"size": size, "sha256": sha.hexdigest(), "chunks": chunks}


@app.get("/stream")
async def stream(n: int = 3, gap: float = 0.3) -> StreamingResponse:
    async def numbers():
        for i in range(n):
            yield f"chunk {i}\n"
            await asyncio.sleep(gap)

    return StreamingResponse(numbers(), media_type="text/plain", headers={"x-app": "shop"})


@app.get("/slow")
async def slow(s: float = 1.0) -> dict:
    await asyncio.sleep(s)
    return {"slept": s, "pid": os.getpid()}


@app.get("/where")
def where(request: Request) -> dict:
    return {"root_path": request.scope.get("root_path"), "path": request.url.path, "url": str(request.url)}
