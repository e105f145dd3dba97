"""The observer fan-out: supervisor events to the plugins' observer hooks, never blocking it.

Events go through a bounded channel to one task that calls the hooks one at a time, each with a
time limit: a slow or stuck observer costs dropped events (logged), never the supervisor's
progress or memory. Each call goes through the plugin manager's hook caller
(plugins.call_observers), so pluggy's ordering and wrappers apply to observers. A hook with a
plain (synchronous) implementation is called in a worker thread, since trio's time limit cannot
stop code that runs on its own thread; at most OBSERVER_THREADS of them, so observers stuck for
good cost their events, not a thread per event.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from .process import ExitInfo

if TYPE_CHECKING:
    from ..lifecycle import TrackedRequest
    from ..plugins import ObserverCall
    from .child_loop import Child

log = logging.getLogger("damocles_ext.supervisor")

OBSERVER_TIMEOUT = 10.0  # one observer hook call
OBSERVER_BACKLOG = 10_000  # events waiting for slow observers; more are dropped (logged)
OBSERVER_THREADS = 4  # worker threads for the plugins' plain (not async) observers


class Observers:
    """The hooks of plugin manager `pm` (None: no plugin observers), and `inline`: objects of
    ours whose methods named as the hooks are called at once, as the event happens (the metrics:
    a slow plugin's hook must not hold a counter back), before the plugins' turn in the queue."""

    def __init__(self, pm: Any, inline: Sequence[object] = ()) -> None:
        self._pm = pm
        self._inline = tuple(inline)
        self._inline_calls: dict[str, list[Any]] = {}
        self._send: trio.MemorySendChannel[tuple[str, dict[str, Any]]] | None = None
        self._receive: trio.MemoryReceiveChannel[tuple[str, dict[str, Any]]] | None = None
        self.dropped = 0
        self.no_thread = 0  # of which: every observer thread was held by a stuck observer
        self._wanted: dict[str, bool] = {}  # hook -> implemented, for the pm's generation below
        self._wanted_generation: int | None = None
        #: Taking events (`open` made its channel): until then `wants` is False, and a caller
        #: on the hot path reads this before calling it.
        self.opened = False

    def open(self) -> bool:
        """Start taking events (the supervisor's run); False if there are no observers."""
        if self._pm is None and not self._inline:
            return False
        self._send, self._receive = trio.open_memory_channel(OBSERVER_BACKLOG)
        self.opened = True
        return True

    def _inline_for(self, hook: str) -> list[Any]:
        calls = self._inline_calls.get(hook)
        if calls is None:
            found = (getattr(o, hook, None) for o in self._inline)
            calls = self._inline_calls[hook] = [f for f in found if callable(f)]
        return calls

    def wants(self, hook: str) -> bool:
        """Whether a plugin observes `hook` (and the supervisor runs): callers on the hot path
        skip building an event's arguments otherwise.

        Known per hook while the plugin manager's `generation` (DextPluginManager's count of
        registrations) is unchanged; a manager without one is asked each time."""
        if not self.opened:
            return False
        return bool(self._inline_for(hook)) or self._plugins_want(hook)

    def _plugins_want(self, hook: str) -> bool:
        if self._pm is None:
            return False
        generation = getattr(self._pm, "generation", None)
        if generation is None or generation != self._wanted_generation:
            self._wanted.clear()
            self._wanted_generation = generation
        wanted = self._wanted.get(hook)
        if wanted is None:
            caller = getattr(self._pm.hook, hook, None)
            wanted = self._wanted[hook] = caller is not None and bool(caller.get_hookimpls())
        return wanted

    def observe(self, hook: str, **kwargs: Any) -> None:
        """Queue a call of observer `hook`; drops it (logged) when the backlog is full."""
        send = self._send
        if send is None:
            return
        for call in self._inline_for(hook):
            try:
                call(**kwargs)
            except Exception:  # ours, but an event's bug must not reach the supervisor
                log.exception(
                    "observer %s (%s) failed; going on", hook, getattr(call, "__qualname__", call)
                )
        if not self._plugins_want(hook):
            # No plugin observes this hook (the usual case: none is built in): no event, no
            # wake-up of the observer task, no timeout scope, per request.
            return
        try:
            send.send_nowait((hook, kwargs))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # closed, or its task gone (a run cancelled as a whole): none to deliver it
        except trio.WouldBlock:
            # Slow observers must not make the supervisor's memory grow without bound.
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning(
                    "observers are too slow: %d events dropped so far (%s)", self.dropped, hook
                )

    def close(self) -> None:
        """No more events: `run()` returns once the queued ones are delivered."""
        if self._send is not None:
            self._send.close()

    async def run(self) -> None:
        """Call the hooks for each queued event, until `close()`."""
        from ..plugins import ObserverCall, deliver_observers

        if self._receive is None:
            return
        # The plugins' plain observers run in worker threads (their code may block); one that
        # never returns keeps its thread, so these are bounded.
        threads = trio.CapacityLimiter(OBSERVER_THREADS)
        async with self._receive:
            async for hook, kwargs in self._receive:
                call = ObserverCall(hook)
                # An observer that never returns would otherwise hold every later event and
                # keep the supervisor's run() from returning.
                with trio.move_on_after(OBSERVER_TIMEOUT) as scope:
                    await deliver_observers(self._pm, hook, kwargs, call, threads)
                if scope.cancelled_caught:
                    self._cut_off(call)
                elif call.no_thread:
                    self._no_thread(call)

    def _cut_off(self, call: ObserverCall) -> None:
        if call.running is not None:
            who = f"observer of plugin {call.running!r}"
        elif call.started:
            who = "hook call (in a wrapper)"
        else:
            who = "hook call (waiting for a worker thread)"
        log.error(
            "observer hook %s: the %s did not return within %gs; cut off, this event's later"
            " observers missed it (observers must return quickly; a plain function goes on in"
            " its thread, its result ignored)",
            call.hook,
            who,
            OBSERVER_TIMEOUT,
        )

    def _no_thread(self, call: ObserverCall) -> None:
        self.dropped += 1
        self.no_thread += 1
        if self.no_thread % 1000 == 1:
            why = call.thread_error or (
                f"all {OBSERVER_THREADS} observer threads are held by plain observers that have"
                " not returned"
            )
            log.warning(
                "observer hook %s: event dropped, %s (%d events dropped so far for this)",
                call.hook,
                why,
                self.no_thread,
            )


def child_info(child: Child) -> Any:
    """The hooks' view of a child."""
    from ..hookspecs import ChildInfo as HookChildInfo

    return HookChildInfo(
        stage=child.spec.stage,
        index=child.spec.index,
        name=child.name,
        pid=child.pid,
        gpu=child.spec.gpu,
    )


def request_info(req: TrackedRequest) -> Any:
    """The hooks' view of a request."""
    from ..hookspecs import RequestInfo

    return RequestInfo(
        id=req.rid,
        stage=req.stage,
        child=req.child,
        deadline=req.deadline_unix,
        attempt=max(1, req.attempts),
    )


def exit_status(info: ExitInfo | None, reason: str) -> Any:
    """The hooks' view of how a child's process ended."""
    from ..hookspecs import ExitStatus

    if info is None:
        return ExitStatus(returncode=None, signal=None, reason=reason)
    return ExitStatus(returncode=info.returncode, signal=info.signal, reason=reason)
