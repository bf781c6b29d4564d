"""The benchmark's FastAPI reference: service.py's route as FastAPI's tutorial writes it, and
nothing else, on the service's uvicorn settings.

No admission cap, body limit, access log, metrics or strict validation: what service.py costs
above this is what it adds to FastAPI; what this costs above tests/tools/floor_app.py is FastAPI's.
Run: python tests/tools/fastapi_floor_app.py
"""

import asyncio
import os

from fastapi import FastAPI
from floor_app import serve
from pydantic import BaseModel

DELAY_SECONDS = float(os.environ.get("DELAY_SECONDS", "5"))

app = FastAPI()


class AddRequest(BaseModel):
    a: float
    b: float


class AddResponse(BaseModel):
    result: float


@app.get("/healthz")
async def health_check() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/")
async def add_numbers(request: AddRequest) -> AddResponse:
    result = request.a + request.b
    await asyncio.sleep(DELAY_SECONDS)
    return AddResponse(result=result)


if __name__ == "__main__":
    serve(app)  # tests/tools/floor_app.py's: the service's own uvicorn settings
