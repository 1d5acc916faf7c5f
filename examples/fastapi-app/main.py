"""A FastAPI app as it would run anywhere (`uvicorn main:app`); Cirrus serves it as `kind: server`."""

import asyncio

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

app = FastAPI(title="todo")
TODOS: dict[int, str] = {1: "deploy to Cirrus"}


class Todo(BaseModel):
    text: str


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.get("/todos/{todo_id}")
def read(todo_id: int) -> dict:
    if todo_id not in TODOS:
        raise HTTPException(status_code=404, detail=f"no todo {todo_id}")
    return {"id": todo_id, "text": TODOS[todo_id]}


@app.post("/todos")
def create(todo: Todo) -> dict:
    todo_id = max(TODOS, default=0) + 1
    TODOS[todo_id] = todo.text
    return {"id": todo_id, "text": todo.text}


@app.get("/count")
async def count(to: int = 5) -> StreamingResponse:
    async def numbers():
        for i in range(1, to + 1):
            yield f"{i}\n"
            await asyncio.sleep(0.2)

    return StreamingResponse(numbers(), media_type="text/plain")
