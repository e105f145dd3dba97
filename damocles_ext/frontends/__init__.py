"""The front ends of the supervisor: the doors requests come in by.

* `serve.py`: `damocles-ext serve`'s process, our stdin/stdout as the protocol channel; light to
  import, so the ready line goes out before trio and the supervisor are imported.
* `serve_jsonl.py`: damocles' JSON lines on a stream pair, answered by a `submit` (the
  supervisor's own, or the forwarder's).
* `forwarder.py`: `serve --connect`: the requests of one stage, proved by a running
  `damocles-ext run` through its control socket.
* `control.py`: `run`'s control socket (dext/1 frames); `control_socket.py`: where that socket
  lives and who may use it (the client makes the same checks); `run.py`: `run`'s process, the
  control socket and the metrics port around one supervisor.
* `prove.py`: `prove`'s one request, through `run`'s socket or on a supervisor of its own.
* `listeners.py`: the connection limits shared by the control socket and the metrics port.
* `signals.py`: SIGTERM/SIGINT, the same way in every front end.

None of them spawns a process (that is `supervisor/`), and this package imports nothing itself.
"""
