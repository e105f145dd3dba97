"""Post an alert to a webhook when a prover child dies or a proof fails or misses its deadline.

Install it next to damocles-ext (`pip install ./examples/dext-alerts-plugin`) and set
DEXT_ALERT_WEBHOOK to a URL that takes a JSON POST (Alertmanager's webhook receiver, a chat
incoming webhook, ...). `damocles-ext run` and `serve` then call these hooks on their event loop.

Observer hooks must return quickly: the supervisor cuts one off after 10 s and logs it. So the
HTTP call runs in a worker thread, and an unreachable webhook costs a log line, not a proof. The
thread is left to itself when the hook is cut off: a webhook that trickles its answer (each read
within the 5 s timeout) would otherwise hold this alert and every later event of every observer.
At most THREADS such threads at once (not trio's, which the supervisor needs): with all of them
held, an alert is dropped with a warning.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import urllib.request

from damocles_ext.hookspecs import hookimpl

log = logging.getLogger("dext_alerts")

THREADS = 4  # POSTs under way at once (each stuck one keeps its thread until it returns)
_limiters = None  # trio.lowlevel.RunVar of this run's CapacityLimiter, made at the first alert


def _post(url: str, alert: dict) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(alert).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5):
        pass


async def _send(alert: dict) -> None:
    url = os.environ.get("DEXT_ALERT_WEBHOOK")
    if not url:
        return
    import trio  # imported here: every prover child imports plugin modules at start

    limiter = _limiter(trio)
    if limiter.available_tokens < 1:
        log.warning("alert %s dropped: %d posts to %s have not returned", alert["alert"],
                    THREADS, url)  # fmt: skip
        return
    try:
        await trio.to_thread.run_sync(_post, url, alert, limiter=limiter, abandon_on_cancel=True)
    except (OSError, http.client.HTTPException) as exc:  # unreachable, refused, or not HTTP
        log.warning("could not post alert %s to %s: %s", alert["alert"], url, exc)


def _limiter(trio):
    global _limiters
    if _limiters is None:
        _limiters = trio.lowlevel.RunVar("dext_alerts_threads")
    try:
        return _limiters.get()
    except LookupError:
        limiter = trio.CapacityLimiter(THREADS)
        _limiters.set(limiter)
        return limiter


@hookimpl
async def dext_child_exited(child, status):
    """A child went down for another reason than a shutdown: say which, and how."""
    if status.reason.startswith("stopped"):
        return  # we stopped it (shutdown)
    await _send(
        {
            "alert": "ProverChildDown",
            "child": child.name,
            "stage": child.stage,
            "gpu": child.gpu,
            "pid": child.pid,
            "how": status.describe(),
        }
    )


@hookimpl
async def dext_request_finished(request, outcome, duration, slack):
    """A proof failed, timed out, or came after its deadline."""
    missed = slack is not None and slack < 0
    if outcome not in ("error", "timeout") and not missed:
        return
    await _send(
        {
            "alert": "ProofMissedDeadline" if missed else "ProofFailed",
            "request": request.id,
            "stage": request.stage,
            "child": request.child,
            "outcome": outcome,
            "duration_s": round(duration, 3),
            "slack_s": None if slack is None else round(slack, 3),
        }
    )
