"""dext-hello-plugin: the smallest useful damocles-ext prover plugin.

It offers one prover, `hello`, for both PoSt stages. Its "proof" is a SHA-256 over a greeting and
the task, so it does no real proving, but it shows everything a real plugin does: options with
validation, progress reports, cooperative cancellation and outputs of the stage's type.

    damocles-ext child window_post --plugin hello --option greeting=bonjour
"""

from __future__ import annotations

import hashlib

from damocles_ext.hookspecs import ProverSpec, hookimpl

__version__ = "0.2.0"

STAGES = ("window_post", "winning_post")
OPTIONS = {"greeting": "text mixed into every proof (default: hello)"}


def hello_proof(greeting: str, task) -> bytes:
    """sha256(greeting || seed || miner_id as 8 little-endian bytes || each sector id the same)."""
    h = hashlib.sha256(greeting.encode())
    h.update(bytes(task.seed))
    h.update(int(task.miner_id).to_bytes(8, "little"))
    for replica in task.replicas:
        h.update(int(replica.sector_id).to_bytes(8, "little"))
    return h.digest()


class HelloProver:
    name = "hello"
    stages = STAGES
    version = __version__

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def prove(self, task, progress, cancel):
        # Imported here, not at module level: plugin modules load in every child at start.
        from damocles_ext.tasks import WindowPoSt, WindowPoStOutput, WinningPoStOutput

        total = max(1, len(task.replicas))
        for done in range(total):
            cancel.check()  # stop between units of work when the request is cancelled
            progress("greeting", done, total)
        proof = hello_proof(self.greeting, task)
        if isinstance(task, WindowPoSt):
            return WindowPoStOutput(proofs=[proof], faults=[])
        return WinningPoStOutput(proofs=[proof])


def validate_options(options) -> list[str]:
    problems = []
    for key in options:
        if key not in OPTIONS:
            problems.append(f"hello: unknown option {key!r}; known: {', '.join(OPTIONS)}")
    greeting = options.get("greeting", "hello")
    if not isinstance(greeting, str) or not greeting:
        problems.append(f"hello: option 'greeting' must be non-empty text, got {greeting!r}")
    return problems


@hookimpl
def dext_provers():
    return [
        ProverSpec(
            name="hello",
            stages=STAGES,
            description="example plugin: sha256 of a greeting and the task",
            factory=lambda options: HelloProver(str(options.get("greeting", "hello"))),
            validate_options=validate_options,
        )
    ]
