"""A locust plugin, loaded beside the project's locustfile (`-f locustfile.py,request_log.py`): one
JSON line per request, to the file REQUEST_LOG names, with the verdict of the locustfile's own
checks (a failure's reason: "no response: ...", "status 503: ...", "wrong answer: ...")."""

import json
import os
import time

from locust import events

log = open(os.environ["REQUEST_LOG"], "a", buffering=1)  # noqa: SIM115 (open for the whole run)


@events.request.add_listener
def one_line(name: str, response_time: float, exception: BaseException | None, **_) -> None:
    # `end` is wall-clock time, to be set against the cluster's events; `ms` how long it took.
    log.write(json.dumps({"end": round(time.time(), 3), "ms": round(response_time), "name": name,
                          "error": None if exception is None else str(exception)}) + "\n")
