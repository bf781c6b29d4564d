# /// script
# requires-python = ">=3.11"
# dependencies = [
#   "fastapi==0.165.0",
#   "uvicorn==0.54.0",
#   "uvloop==0.23.0; sys_platform != 'win32'",
#   "httptools==0.9.0",
#   "pydantic==2.14.4",
#   "structlog==26.1.0",
#   "prometheus-client==0.26.0",
#   "orjson==3.13.0",
# ]
# ///
"""math-service: adds two numbers after a simulated long-running operation."""

import asyncio
import contextlib
import functools
import gc
import logging
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Annotated, Literal

import orjson
import structlog
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat, Strict, ValidationError,
    model_validator,
)
from pydantic_core import to_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.server import HANDLED_SIGNALS


# --- Settings ---------------------------------------------------------------------------------


class Settings(BaseModel):
    """Read from the environment (PORT, LOGLEVEL, ...) when the service starts, and validated."""

    port: int = Field(8000, ge=1, le=65535)
    # Prometheus metrics, on a port of their own that the Service does not expose to the internet.
    metrics_port: int = Field(9000, ge=1, le=65535)
    loglevel: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(str.upper)
    ] = "INFO"
    delay_seconds: float = Field(5.0, ge=0, allow_inf_nan=False)
    # Far more than {"a": ..., "b": ...} needs, small enough that large bodies cannot fill memory.
    max_body_bytes: int = Field(1024 * 1024, ge=1)
    # Requests handled at once (probes excepted); past it, an immediate 503. Sized from the pod's
    # memory limit (docs/operations.md, "Settings").
    max_in_flight: int = Field(10_000, ge=1)
    # A load balancer places a connection once, when it opens: past this age its next response
    # says `Connection: close`, so clients reconnect, also to pods added since (docs/operations.md).
    max_connection_age_seconds: float = Field(15.0, gt=0, allow_inf_nan=False)


# --- Logging ----------------------------------------------------------------------------------

# One JSON object per line, for our own events and for everything the standard library logs
# (uvicorn's start-up and shutdown, asyncio), whichever server runs the app.
_shared = [
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.dict_tracebacks,
                structlog.processors.JSONRenderer(separators=(",", ":")),  # compact, as orjson
            ],
        )
    )
    logging.basicConfig(handlers=[handler], level=level, force=True)
    # uvicorn's loggers carry their own plain-text handlers when its CLI starts the app: send
    # them to the JSON handler above, and drop its access log (Edge writes one, as JSON).
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers, uvicorn_logger.propagate = [], True
        uvicorn_logger.setLevel(logging.NOTSET)  # LOGLEVEL rules, not the command line's level
    access = logging.getLogger("uvicorn.access")
    access.handlers, access.propagate = [], False
    # `fastapi run` builds the app before uvicorn applies its default logging config: make that a
    # no-op, so uvicorn's lines stay JSON there too.
    uvicorn.config.LOGGING_CONFIG.clear()
    uvicorn.config.LOGGING_CONFIG.update(version=1, incremental=True)
    # Our own events skip the stdlib machinery: the access log runs on every request. structlog's
    # recipe for speed: orjson renders bytes, written straight to stdout's buffer.
    structlog.configure(
        processors=[
            *_shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )


logger = structlog.get_logger("math_service")


def load_settings() -> Settings:
    try:
        return Settings.model_validate(
            {name: os.environ[name.upper()] for name in Settings.model_fields if name.upper() in os.environ}
        )
    except ValidationError as exc:
        configure_logging("INFO")
        logger.error(
            "invalid setting",
            variables=[str(e["loc"][0]).upper() for e in exc.errors()],
            errors=[f"{str(e['loc'][0]).upper()}: {e['msg']} (got {e['input']!r})" for e in exc.errors()],
        )
        raise SystemExit(2) from None


# --- Metrics and access log -------------------------------------------------------------------


class Metrics:
    """The app's Prometheus metrics, in a registry of its own: served on METRICS_PORT."""

    def __init__(self, delay_seconds: float) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(REGISTRY)  # and the process's own: CPU, memory, garbage collector
        self.requests = Counter("http_requests_total", "HTTP requests answered.",
                                ["method", "route", "status"], registry=self.registry)
        # Fast answers (errors, probes), then around DELAY_SECONDS, where the interesting tail is.
        factors = (0.05, 0.2, 0.5, 1, 1.02, 1.05, 1.1, 1.2, 1.5, 2, 6)
        around_delay = {round(delay_seconds * f, 3) for f in factors}
        self.latency = Histogram(
            "http_request_duration_seconds", "Time from request to the end of the response.", ["method", "route"],
            buckets=sorted({0.005, 0.05, *around_delay} - {0}), registry=self.registry,
        )
        self.in_flight = Gauge("http_requests_in_flight",
                               "Requests in flight, at most MAX_IN_FLIGHT (probes are not counted).",
                               registry=self.registry)
        self.rejected = Counter("http_requests_rejected_total",
                                "Requests answered 503 at once: MAX_IN_FLIGHT were in flight.",
                                registry=self.registry)
        # labels() takes a lock and builds the key on every call; a child, once made, never changes.
        self.children = functools.lru_cache(maxsize=1024)(self._children)

    def _children(self, method: str, route: str, status: int) -> tuple[Counter, Histogram]:
        return self.requests.labels(method, route, status), self.latency.labels(method, route)


async def answer(send: Send, status: int, detail: str, *headers: tuple[bytes, bytes]) -> None:
    """A JSON error sent by the edge itself, before or instead of the app. The request's body is
    left unread, so the connection ends with it."""
    body = orjson.dumps({"detail": detail})
    headers = ((b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
               (b"connection", b"close"), *headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ConnectionAges:
    """When each open keep-alive connection got its first answer, by client address and port
    (unique while it is open; ASGI names no connection)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.first: dict[tuple[str, int], float] = {}
        self.pruned = time.monotonic()

    def expired(self, client: tuple[str, int] | None) -> bool:
        """True, once, for the first answer on a connection that has lived past the limit."""
        if client is None:  # a Unix socket: nothing to balance
            return False
        client = tuple(client)
        now = time.monotonic()
        if now - self.pruned > self.limit:
            # Connections that ended unasked (the client left, uvicorn's keep-alive timeout)
            # leave their entry: drop those past twice the limit. A connection still open there
            # only starts a new age, at most one more limit long.
            self.first = {c: t for c, t in self.first.items() if now - t < 2 * self.limit}
            self.pruned = now
        if now - self.first.setdefault(client, now) < self.limit:
            return False
        del self.first[client]
        logger.debug("connection past MAX_CONNECTION_AGE_SECONDS: closing after this answer", client=client)
        return True


class Edge:
    """The app's one middleware: admission cap, body limit, access log and metrics, and
    `Connection: close` once shutdown has begun or past MAX_CONNECTION_AGE_SECONDS.

    Every request in flight keeps its frames alive for its whole delay, so this is one coroutine
    frame with at most one `send` and one `receive` wrapper (docs/performance.md).
    """

    # The kubelet's probes must get through a full pod: a liveness probe failing under load
    # would restart the pod and lose every request in it. They are cheap and few.
    UNCAPPED = frozenset({"/healthz", "/readyz"})

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)
        self.ages = ConnectionAges(settings.max_connection_age_seconds)

    def closing(self, scope: Scope) -> bool:
        """Whether this response ends its keep-alive connection. uvicorn closes a connection after
        a response whose headers say so (httptools_impl.RequestResponseCycle.send): each client
        learns on its next answer that the connection is going, not under its next request."""
        return not scope["app"].state.ready or self.ages.expired(scope.get("client"))

    async def too_large(self, send: Send) -> int:
        """The answer to a body over MAX_BODY_BYTES, declared or counted; its status."""
        detail = f"Request body is larger than MAX_BODY_BYTES ({self.settings.max_body_bytes} bytes)"
        await answer(send, 413, detail)
        return 413

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        answered = False  # by the edge itself, over the body limit: the app's reply is dropped
        capped = scope["path"] not in self.UNCAPPED
        received = 0
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")

        async def send_app(message: Message) -> None:
            nonlocal status
            if answered:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", [])
                if self.closing(scope) and (b"connection", b"close") not in headers:
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        if not length:  # a chunked body: the limit counts the bytes as they arrive

            async def receive_counted() -> Message:
                nonlocal status, answered, received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.settings.max_body_bytes and status == 500 and not answered:
                    answered = True  # before the app has sent anything
                    status = await self.too_large(send)
                    return {"type": "http.disconnect"}  # so the app stops: its client is gone
                return message

        try:
            settings = self.settings
            if capped and self.in_flight >= settings.max_in_flight:
                # Past the cap the OOM killer would end the pod and every request in it; a
                # rejected request costs almost nothing: its body is never read.
                self.metrics.rejected.inc()
                # A slot frees as soon as a request in flight ends, within one DELAY_SECONDS.
                retry_after = b"%d" % max(1, math.ceil(settings.delay_seconds))
                detail = f"Busy: {settings.max_in_flight} requests in flight (MAX_IN_FLIGHT); retry later"
                status = 503
                return await answer(send, 503, detail, (b"retry-after", retry_after))
            if length.isdigit() and int(length) > settings.max_body_bytes:  # answered unread
                status = await self.too_large(send)
                return
            self.in_flight += capped
            try:
                # A declared length is the most uvicorn delivers: it was checked above.
                await self.app(scope, receive if length else receive_counted, send_app)
            finally:
                self.in_flight -= capped
        finally:
            duration = time.perf_counter() - start
            # The route template, never the raw path, keeps metric labels bounded.
            route = getattr(scope.get("route"), "path", "unmatched")
            requests, latency = self.metrics.children(scope["method"], route, status)
            requests.inc()
            latency.observe(duration)
            client = scope["client"][0] if scope.get("client") else None
            logger.info("request", method=scope["method"], path=scope["path"], status=status,
                        duration_ms=round(duration * 1000, 3), client=client)


# --- Requests and answers ---------------------------------------------------------------------


class AddRequest(BaseModel):
    # Strict: "10" and true are mistakes, not numbers. NaN, Infinity and 1e999 are refused.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"a": 10, "b": 5}]})
    a: Annotated[FiniteFloat, Strict()]
    b: Annotated[FiniteFloat, Strict()]

    @model_validator(mode="after")
    def _finite_sum(self) -> "AddRequest":
        if not math.isfinite(self.a + self.b):
            raise ValueError("the sum of a and b is too large to represent")
        return self


class AddResponse(BaseModel):
    result: float


class ErrorResponse(BaseModel):
    detail: str


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    # Like FastAPI's default handler, but JSON has no NaN or Infinity: echoing {"a": NaN} back
    # with the standard encoder fails, and a client error would become a 500. pydantic writes
    # them as the strings "NaN" and "Infinity", and an error's context as its message.
    body = to_json({"detail": exc.errors()}, inf_nan_mode="strings", serialize_unknown=True)
    return Response(body, status_code=422, media_type="application/json")


# --- Start-up and shutdown, under whichever server runs the app -------------------------------

# Open sockets besides the requests in flight: a whole listen backlog accepted before any answer,
# plus stdio, listeners, the event loop and probes (docs/operations.md, "Settings").
FD_RESERVE = 4096 + 1024


def fit_open_file_limit(settings: Settings) -> None:
    """Raise the soft open-file limit to the hard one; lower the cap if it still does not fit.

    Each request in flight holds one socket: a cap above the open-file limit would turn a burst
    into failed accepts instead of clean 503s.
    """
    if sys.platform == "win32":
        return
    import resource

    was, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # macOS: an "unlimited" hard limit that the kernel refuses
        hard = was
    reserve = min(FD_RESERVE, hard // 2)
    fits = hard - reserve
    binding = "MAX_IN_FLIGHT" if settings.max_in_flight <= fits else "RLIMIT_NOFILE"
    (logger.info if binding == "MAX_IN_FLIGHT" else logger.warning)(
        "admission cap", binding=binding, max_in_flight=min(settings.max_in_flight, fits),
        max_in_flight_setting=settings.max_in_flight, open_files=hard, open_files_was=was,
        fd_reserve=reserve,
    )
    settings.max_in_flight = min(settings.max_in_flight, fits)


def drain_on_signal(app: FastAPI) -> None:
    """On SIGTERM (or Ctrl+C): fail readiness, stop accepting, and let each open connection end
    itself before uvicorn's own shutdown, which closes idle keep-alive connections at once under
    a client about to send. Each ends after its next answer, which `Edge` marks
    `Connection: close`, or at uvicorn's keep-alive timeout.

    uvicorn's command lines give an app no handle on their server but one: the signal handler
    that `Server.capture_signals` installs before the lifespan starts.
    """
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if not isinstance(server, uvicorn.Server):  # another server, or a test client: no signals
        return
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        for listener in getattr(server, "servers", []):  # none yet if uvicorn has not bound them
            listener.close()
        logger.info("closing keep-alive connections", open=len(server.server_state.connections))
        deadline = loop.time() + server.config.timeout_keep_alive + 1
        while server.server_state.connections and loop.time() < deadline and not server.should_exit:
            await asyncio.sleep(0.1)
        # uvicorn's shutdown drains the rest: requests in flight, and connections that never sent
        # one (they have no timer). Not through its handle_exit, which would re-raise the signal
        # at the end: a drained shutdown exits 0.
        server.should_exit = True

    def handle_exit(sig: int, frame: FrameType | None) -> None:
        if not app.state.ready:  # a second signal: uvicorn's own shutdown, at once
            return server.handle_exit(sig, frame)
        app.state.ready = False
        asyncio.run_coroutine_threadsafe(drain(), loop)

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, handle_exit)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """What runs beside the requests, whichever server runs the app."""
    settings = app.state.settings
    fit_open_file_limit(settings)
    metrics_server, _ = start_http_server(settings.metrics_port, registry=app.state.metrics.registry)
    # Requests leave no cyclic garbage, but thousands in flight make every collector pass walk
    # them all: freeze what start-up built, and collect young objects less often.
    gc.freeze()
    gc.set_threshold(50_000)
    drain_on_signal(app)
    yield
    metrics_server.shutdown()
    metrics_server.server_close()


# --- The app ----------------------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """The service, built and not started: its lifespan starts what runs beside the requests."""
    app = FastAPI(
        title="Simple Math API",
        description="A simple API to perform basic arithmetic operations",
        version="1.0.0",
        lifespan=lifespan,
        exception_handlers={RequestValidationError: validation_error},
        # FastAPI's built-in OpenTelemetry checks for providers on every request; this image ships
        # no OpenTelemetry SDK (metrics are Prometheus, logs are the JSON lines above).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings, app.state.metrics, app.state.ready = settings, Metrics(settings.delay_seconds), True
    app.add_middleware(Edge, settings=settings, metrics=app.state.metrics)

    @app.get("/healthz")
    async def health_check() -> dict[str, str]:
        """Liveness: the process answers. Never delayed."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Shutting down"}})
    async def ready_check(request: Request, response: Response) -> dict[str, str]:
        """Readiness: 200 while serving, 503 once shutdown has begun."""
        if not request.app.state.ready:
            response.status_code = 503
            return {"status": "shutting down"}
        return {"status": "ready"}

    @app.post(
        "/",
        responses={
            413: {"model": ErrorResponse, "description": "Body larger than MAX_BODY_BYTES"},
            503: {
                "model": ErrorResponse, "description": "MAX_IN_FLIGHT in flight: answered at once, body unread",
                "headers": {"Retry-After": {"description": "Seconds", "schema": {"type": "integer"}}},
            },
        },
    )
    async def add_numbers(numbers: AddRequest) -> AddResponse:
        """Add a and b after DELAY_SECONDS of simulated work."""
        result = numbers.a + numbers.b
        await asyncio.sleep(settings.delay_seconds)  # simulate a longish-running operation
        return AddResponse(result=result)

    return app


# --- Running it: `python service.py` (the image), `uvicorn service:app`, `fastapi run service.py`


def app_from_environment() -> FastAPI:
    """The service as a runner starts it: settings from the environment (an invalid one exits 2)
    and the whole process logging JSON."""
    settings = load_settings()
    configure_logging(settings.loglevel)
    return create_app(settings)


def __getattr__(name: str) -> FastAPI:
    # `service:app` is built when a runner first asks for it: importing the module starts nothing.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global app
    app = app_from_environment()
    return app


def __dir__() -> list[str]:
    return sorted({*globals(), "app"})  # `fastapi run` looks for the app in dir(service)


if __name__ == "__main__":
    app = app_from_environment()
    uvicorn.run(
        app,
        host="0.0.0.0",
        port=app.state.settings.port,
        loop="uvloop" if sys.platform != "win32" else "auto",
        http="httptools",
        log_config=None,  # keep the JSON logging configured above
        access_log=False,  # Edge writes it, as JSON
        # X-Forwarded-For is trusted from 127.0.0.1 only, and the ELB (TCP listeners) sends none:
        # the middleware would only add a coroutine frame to every request in flight.
        proxy_headers=False,
        server_header=False,
        # A burst of new connections waits here, up to the kernel's net.core.somaxconn
        # (docs/operations.md, "Starting it").
        backlog=4096,
    )
