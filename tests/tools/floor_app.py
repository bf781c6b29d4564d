"""The benchmark's floor: the same job as service.py as a bare ASGI app on the same uvicorn.

No framework, no validation, no logging, no metrics: whatever service.py costs above this is
the price of FastAPI, pydantic, the access log and the metrics. Run: python tests/tools/floor_app.py
"""

import asyncio
import json
import os

import uvicorn

DELAY_SECONDS = float(os.environ.get("DELAY_SECONDS", "5"))


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":  # lifespan: nothing to set up
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/healthz":
        status, body = 200, b'{"status":"ok"}'
    else:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        numbers = json.loads(b"".join(chunks))
        result = float(numbers["a"] + numbers["b"])
        await asyncio.sleep(DELAY_SECONDS)
        status, body = 200, json.dumps({"result": result}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(app) -> None:
    """The service's own uvicorn settings, so the difference is the application alone."""
    uvicorn.run(
        app,
        host="0.0.0.0",
        port=int(os.environ.get("PORT", "8000")),
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        proxy_headers=False,  # as service.py
        server_header=False,
        backlog=4096,  # as service.py
    )


if __name__ == "__main__":
    serve(app)
