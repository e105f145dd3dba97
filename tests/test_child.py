"""The child runtime, driven as a real `damocles-ext child` subprocess through the codecs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.child import EOF, Child, make_plugin_dist, window_task, winning_task
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace

from damocles_ext.child_codecs import QUEUE
from damocles_ext.options import coerce_value, format_option, parse_option, parse_options
from damocles_ext.protocol import dext, jsonl
from damocles_ext.tasks import WindowPoSt

# -- option parsing (in-process) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-2", -2),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        ("true", True),
        ("False", False),
        ("every:2", "every:2"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("", ""),
        ("/dev/nvidia0", "/dev/nvidia0"),
        ('"123"', "123"),
        ('"true"', "true"),
        ("0x10", "0x10"),
    ],
)
def test_option_values_are_typed_only_when_unambiguous(text, value):
    result = coerce_value(text)
    assert result == value and type(result) is type(value)


def test_option_without_equals_sign_is_rejected_with_an_example():
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_option("seconds")


def test_option_value_may_contain_equals_signs():
    assert parse_option("path=/a=b") == ("path", "/a=b")


def test_repeated_option_key_is_rejected():
    with pytest.raises(ValueError, match="given twice"):
        parse_options(["a=1", "a=2"])


option_values = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)


@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1), value=option_values)
def test_format_option_round_trips_through_parse_option(key, value):
    parsed_key, parsed = parse_option(format_option(key, value))
    assert parsed_key == key
    assert parsed == value and type(parsed) is type(value)


# -- the child process: dext ----------------------------------------------------------------------


def test_hello_is_the_first_frame_and_describes_the_child():
    with Child("window_post", "echo", extra=["--capacity", "3"]) as child:
        hello = child.next()
        assert hello == dext.Hello(
            protocol="dext/1",
            stage="window_post",
            pid=child.proc.pid,
            prover="echo",
            version="1",
            capacity=3,
            queue=QUEUE,  # more, quick requests only: the supervisor's "Quick requests"
        )


@pytest.mark.parametrize("make_task", [window_task, winning_task])
def test_echo_request_gets_its_response_over_dext(make_task):
    task = make_task()
    stage = type(task).__struct_config__.tag
    with Child(stage, "echo") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(41, task))
        response, _ = child.next_of(dext.Response)
        assert response == dext.Response(41, output=echo_output(task), error=None)


def test_progress_frames_arrive_while_the_sleep_prover_works():
    with Child("window_post", "sleep", "seconds=0.6", "progress_interval=0.05") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task()))
        response, before = child.next_of(dext.Response)
        assert response.error is None
        progress = [m for m in before if isinstance(m, dext.Progress)]
        assert all(p.id == 1 for p in progress)
        sleep_steps = [p.done for p in progress if p.phase == "sleep"]
        assert len(sleep_steps) >= 3
        assert sleep_steps == sorted(sleep_steps)
        assert {p.total for p in progress if p.phase == "sleep"} == {12}


def test_heartbeat_repeats_progress_while_the_prover_is_silent():
    # fail=hang reports progress once and then never again; the heartbeat keeps the child visible.
    with Child("window_post", "sleep", "fail=hang", extra=["--heartbeat", "0.1"]) as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(5, window_task()))
        frames = [child.next() for _ in range(6)]
        assert all(isinstance(f, dext.Progress) and f.id == 5 for f in frames)
        assert frames[-1].phase == "hang"
        assert sum(f.phase == "hang" for f in frames) >= 4


def test_cancel_stops_a_working_prover_with_a_cancelled_response():
    with Child("window_post", "sleep", "seconds=600", "progress_interval=0.05") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(7, window_task()))
        child.next_of(dext.Progress)
        child.send_msg(dext.Cancel(7))
        response, _ = child.next_of(dext.Response)
        assert response == dext.Response(7, output=None, error="cancelled")
        # and the child keeps serving
        child.send_msg(dext.Request(8, window_task(seed_byte=1)))
        child.send_msg(dext.Cancel(8))
        assert child.next_of(dext.Response)[0].id == 8


def test_cancel_of_a_queued_request_is_answered_at_once():
    with Child("window_post", "sleep", "seconds=600", "progress_interval=0.05") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task()))
        child.next_of(dext.Progress)  # request 1 occupies the only slot
        child.send_msg(dext.Request(2, window_task()))
        child.send_msg(dext.Cancel(2))
        response, _ = child.next_of(dext.Response)
        assert response == dext.Response(2, error="cancelled")
        child.send_msg(dext.Cancel(1))
        assert child.next_of(dext.Response)[0] == dext.Response(1, error="cancelled")


def test_requests_beyond_capacity_wait_until_a_slot_frees():
    with Child(
        "window_post", "sleep", "seconds=600", "progress_interval=0.05", extra=["--capacity", "2"]
    ) as child:
        child.next_of(dext.Hello)
        for i in (1, 2, 3):
            child.send_msg(dext.Request(i, window_task(seed_byte=i)))
        started = set()
        while started != {1, 2}:  # both slots busy at once; nothing has finished
            msg = child.next()
            assert isinstance(msg, dext.Progress) and msg.id in (1, 2), msg
            started.add(msg.id)
        child.send_msg(dext.Cancel(1))
        response, before = child.next_of(dext.Response)
        assert response == dext.Response(1, error="cancelled")
        assert all(m.id != 3 for m in before)  # 3 waited for a free slot...
        third, _ = child.next_of(dext.Progress)
        while third.id != 3:
            third, _ = child.next_of(dext.Progress)
        assert (third.phase, third.done) == ("sleep", 0)  # ...and got the freed one


def test_prover_exception_becomes_an_error_response_and_the_child_keeps_serving():
    with Child("winning_post", "sleep", "seconds=0", "fail=every:2") as child:
        child.next_of(dext.Hello)
        answers = []
        for i in (1, 2, 3):
            child.send_msg(dext.Request(i, winning_task(seed_byte=i)))
            answers.append(child.next_of(dext.Response)[0])
        assert answers[0].output == echo_output(winning_task(seed_byte=1))
        assert answers[1].output is None
        assert answers[1].error.startswith("RuntimeError: sleep prover failing as configured")
        assert answers[2].output == echo_output(winning_task(seed_byte=3))
        assert child.proc.poll() is None


def test_task_of_the_other_stage_is_refused_with_an_error_response():
    with Child("window_post", "echo") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(3, winning_task()))
        response, _ = child.next_of(dext.Response)
        assert response.id == 3 and "serves window_post, not winning_post" in response.error


def test_shutdown_finishes_in_flight_requests_then_exits_0():
    with Child("window_post", "sleep", "seconds=0.4", "progress_interval=0.05") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task()))
        child.next_of(dext.Progress)
        child.send_msg(dext.Shutdown())
        child.send_msg(dext.Request(2, window_task()))  # arrives after Shutdown: refused
        answers = {}
        while len(answers) < 2:
            msg, _ = child.next_of(dext.Response)
            answers[msg.id] = msg
        assert answers[1].output == echo_output(window_task())
        assert "shutting down" in answers[2].error
        assert child.until_eof() == []
        assert child.wait() == 0


def test_stdin_eof_makes_the_child_exit_even_with_work_in_flight():
    with Child("window_post", "sleep", "seconds=600", "progress_interval=0.05") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task()))
        child.next_of(dext.Progress)
        child.close_stdin()
        assert child.wait() == 0
        assert "stdin closed" in child.stderr


def test_idle_child_exits_0_on_stdin_eof():
    with Child("window_post", "echo") as child:
        child.next_of(dext.Hello)
        child.close_stdin()
        assert child.wait() == 0


def test_garbage_from_the_parent_is_a_fatal_protocol_error():
    with Child("window_post", "echo") as child:
        child.next_of(dext.Hello)
        child.send(b"\xff\xff\xff\xffnot a frame")
        assert child.wait() == 1
        assert "protocol error from the parent" in child.stderr


def test_unexpected_frame_from_the_parent_is_logged_and_the_child_keeps_serving():
    with Child("window_post", "echo") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Response(1, error="why would a parent send this"))
        child.send_msg(dext.Request(1, window_task()))
        assert child.next() == dext.Response(1, output=echo_output(window_task()))
        child.close_stdin()
        assert child.wait() == 0
        assert "unexpected Response frame" in child.stderr


def test_crash_mode_kills_the_child_mid_request_without_an_answer():
    with Child(
        "window_post", "sleep", "seconds=0.2", "progress_interval=0.05", "fail=crash"
    ) as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task()))
        before = child.until_eof()
        assert not any(isinstance(m, dext.Response) for m in before)
        assert any(isinstance(m, dext.Progress) for m in before)
        assert child.wait() == 3


# -- the child process: damocles JSON lines -------------------------------------------------------


@pytest.mark.parametrize("make_task", [window_task, winning_task])
def test_echo_request_gets_its_response_over_json_lines(make_task):
    task = make_task()
    stage = type(task).__struct_config__.tag
    with Child(stage, "echo", protocol="jsonl") as child:
        assert child.next() == f"{stage} processor ready\n".encode()
        child.send(jsonl.encode_request(12, task))
        line = child.next()
        assert jsonl.decode_response(line, stage) == jsonl.JsonResponse(12, echo_output(task), None)
        assert line == jsonl.encode_response(12, echo_output(task))


def test_json_lines_bad_request_is_answered_when_its_id_is_readable_and_skipped_otherwise():
    with Child("window_post", "echo", protocol="jsonl") as child:
        child.next()  # ready line
        child.send(b'{"id": 4, "task": {"miner_id": "x"}}\n')
        child.send(b"this is not json\n")
        child.send(jsonl.encode_request(5, window_task()))
        first = jsonl.decode_response(child.next(), "window_post")
        assert first.id == 4 and "invalid window_post task" in first.err_msg
        second = jsonl.decode_response(child.next(), "window_post")
        assert second.id == 5 and second.output == echo_output(window_task())
        child.close_stdin()
        assert child.wait() == 0
        assert "not a request line" in child.stderr


def test_json_lines_child_exits_on_stdin_eof():
    with Child("winning_post", "echo", protocol="jsonl") as child:
        child.next()
        child.close_stdin()
        assert child.wait() == 0


# -- start failures: exit 2 before the ready message ----------------------------------------------


def _assert_failed_start(child: Child) -> str:
    assert child.wait() == 2
    assert child.next() is EOF and child.raw == b""  # nothing reached the protocol
    assert "Traceback" not in child.stderr
    return child.stderr


def test_unknown_prover_exits_2_before_ready_listing_the_available_provers():
    with Child("window_post", "no-such-prover") as child:
        err = _assert_failed_start(child)
        assert "unknown prover 'no-such-prover'" in err
        assert "echo (testing" in err and "sleep (testing" in err


def test_invalid_options_exit_2_naming_the_option():
    with Child("window_post", "sleep", "seconds=-1", "colour=red") as child:
        err = _assert_failed_start(child)
        assert "option 'seconds' must be >= 0.0" in err
        assert "unknown option 'colour'" in err


def test_malformed_option_exits_2():
    with Child("window_post", "sleep", "seconds") as child:
        assert "expected KEY=VALUE" in _assert_failed_start(child)


def test_prover_that_fails_to_load_exits_2_with_the_reason():
    with Child("window_post", "sleep", "load_fail=true", protocol="jsonl") as child:
        err = _assert_failed_start(child)
        assert "prover 'sleep' (plugin testing) failed to start" in err
        assert "load_fail=true" in err


QUITTING_PLUGIN = textwrap.dedent(
    """
    import sys
    from damocles_ext.hookspecs import hookimpl, ProverSpec

    class NoDevice(BaseException):
        pass

    def quits(options):
        sys.exit(0)  # as a GPU library's init may, finding no device

    def no_device(options):
        raise NoDevice("no CUDA device")

    def interrupted(options):
        raise KeyboardInterrupt("vendor lib: interrupted while loading params")

    @hookimpl
    def dext_provers():
        return [
            ProverSpec("quits", ("window_post",), quits),
            ProverSpec("nodevice", ("window_post",), no_device),
            ProverSpec("kbi", ("window_post",), interrupted),
        ]
    """
)


@pytest.mark.parametrize(
    ("prover", "reason"),
    [
        ("quits", "SystemExit: 0"),
        ("nodevice", "NoDevice: no CUDA device"),
        # its own (no SIGINT came): a failed start naming the plugin, not a silent exit 130
        ("kbi", "KeyboardInterrupt: vendor lib: interrupted while loading params (raised by"),
    ],
)
def test_a_factory_that_exits_or_raises_a_base_exception_exits_2_naming_the_prover(
    tmp_path, prover, reason
):
    root = make_plugin_dist(tmp_path, dist="quitting", module="quitting", source=QUITTING_PLUGIN)
    with Child("window_post", prover, pythonpath=[root]) as child:
        err = _assert_failed_start(child)
        assert f"prover {prover!r} (plugin quitting) failed to start: {reason}" in err


def test_a_plugin_import_raising_its_own_keyboard_interrupt_exits_2_naming_the_module(tmp_path):
    source = 'raise KeyboardInterrupt("vendor lib: interrupted while opening the device")\n'
    root = make_plugin_dist(tmp_path, dist="kbi-import", module="kbi_import", source=source)
    with Child("window_post", "echo", pythonpath=[root]) as child:
        err = _assert_failed_start(child)
        assert (
            "prover 'echo' failed to start: plugin module 'kbi_import' raised KeyboardInterrupt:"
            " vendor lib: interrupted while opening the device (raised by the plugin itself"
        ) in err


SIGNATURES_PLUGIN = textwrap.dedent(
    """
    import functools
    from damocles_ext.hookspecs import hookimpl, ProverSpec
    from damocles_ext_plugins.testing import echo_output

    class Base:
        name = "p"
        stages = ("window_post",)

    class TaskOnly(Base):
        def prove(self, task):
            return echo_output(task)

    class Extra(Base):
        def prove(self, task, progress, cancel, device):
            return echo_output(task)

    class Async(Base):
        async def prove(self, task, progress, cancel):
            return echo_output(task)

    class Flexible(Base):
        def prove(self, task, *rest, device=None):
            return echo_output(task)

    class Proves:
        def __call__(self, task, progress, cancel):
            return echo_output(task)

    class CallableObject(Base):
        prove = Proves()

    class Builtin(Base):  # a C function: no signature to read
        prove = staticmethod(functools.partial(max, key=id))

    KINDS = {"task-only": TaskOnly, "extra": Extra, "async": Async, "flexible": Flexible,
             "callable-object": CallableObject, "builtin": Builtin}

    @hookimpl
    def dext_provers():
        return [ProverSpec(name, ("window_post",), lambda options, kind=kind: kind())
                for name, kind in KINDS.items()]
    """
)


@pytest.mark.parametrize(
    ("prover", "why"),
    [
        ("task-only", "prove(task) cannot be called as prove(task, progress, cancel)"),
        ("extra", "missing a required argument: 'device'"),
        ("async", "is async def"),
    ],
)
def test_a_prover_whose_prove_takes_other_arguments_exits_2_naming_it_and_the_signature(
    tmp_path, prover, why
):
    """`def prove(self, task)` started, then failed every request with "TypeError: prove()
    takes 2 positional arguments but 4 were given", naming no plugin (an `async def` one with
    "returned coroutine"): it is refused at start, before the ready message."""
    root = make_plugin_dist(tmp_path, dist="sigs", module="sigs", source=SIGNATURES_PLUGIN)
    with Child("window_post", prover, pythonpath=[root]) as child:
        err = _assert_failed_start(child)
        assert f"prover {prover!r} (plugin sigs)" in err and why in err, err
        assert "prove(task, progress, cancel)" in err


@pytest.mark.parametrize("prover", ["flexible", "callable-object", "builtin"])
def test_a_prover_whose_prove_takes_the_three_arguments_or_cannot_be_inspected_starts(
    tmp_path, prover
):
    root = make_plugin_dist(tmp_path, dist="sigs", module="sigs", source=SIGNATURES_PLUGIN)
    with Child("window_post", prover, pythonpath=[root]) as child:
        child.next_of(dext.Hello)
        child.close_stdin()
        assert child.wait() == 0, child.stderr


INTERRUPTING_PLUGIN = textwrap.dedent(
    """
    from damocles_ext.hookspecs import hookimpl, ProverSpec
    from damocles_ext_plugins.testing import echo_output

    class Interrupting:
        def prove(self, task, progress, cancel):
            if task.miner_id == 1:
                raise KeyboardInterrupt("raised by the prover, not a Ctrl-C")
            return echo_output(task)

    @hookimpl
    def dext_provers():
        return [ProverSpec("interrupting", ("window_post",), lambda options: Interrupting())]
    """
)


def test_a_keyboard_interrupt_a_prover_raises_fails_its_request_not_the_inline_child(tmp_path):
    root = make_plugin_dist(
        tmp_path, dist="interrupting", module="interrupting", source=INTERRUPTING_PLUGIN
    )
    with Child("window_post", "interrupting", pythonpath=[root]) as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task(miner=1)))
        response, _ = child.next_of(dext.Response)
        assert response.error == "KeyboardInterrupt: raised by the prover, not a Ctrl-C"
        child.send_msg(dext.Request(2, window_task()))
        assert child.next_of(dext.Response)[0].output == echo_output(window_task())
        child.close_stdin()
        assert child.wait() == 0, child.stderr


def test_a_keyboard_interrupt_a_prover_raises_fails_its_request_also_with_sigint_ignored(tmp_path):
    # `nohup damocles-ext run &` starts the supervisor, and so its children, with SIGINT ignored:
    # no KeyboardInterrupt can then come from a signal. The child took every one for a SIGINT and
    # exited, failing the request only by its exit.
    root = make_plugin_dist(
        tmp_path, dist="interrupting", module="interrupting", source=INTERRUPTING_PLUGIN
    )
    with Child("window_post", "interrupting", pythonpath=[root], sigint_ignored=True) as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task(miner=1)))
        response, _ = child.next_of(dext.Response)
        assert response.error == "KeyboardInterrupt: raised by the prover, not a Ctrl-C"
        child.close_stdin()
        assert child.wait() == 0, child.stderr


def test_a_sigint_still_stops_the_inline_child_while_it_proves():
    import signal

    with Child("window_post", "sleep", "seconds=600", "progress_interval=0.05") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task()))
        child.next_of(dext.Progress)
        child.proc.send_signal(signal.SIGINT)
        assert child.wait() == 130, child.stderr
        assert "Traceback" not in child.stderr


# -- stray output of a prover ---------------------------------------------------------------------

NOISY_PLUGIN = textwrap.dedent(
    """
    import os, sys
    from damocles_ext.hookspecs import hookimpl, ProverSpec
    from damocles_ext_plugins.testing import echo_output

    print("noise from import")

    class Noisy:
        name = "noisy"
        stages = ("window_post",)

        def prove(self, task, progress, cancel):
            print("noise from print")
            sys.stdout.write("noise from sys.stdout\\n")
            sys.stdout.flush()
            os.write(1, b"noise from fd 1\\n")
            return echo_output(task)

    @hookimpl
    def dext_provers():
        return [ProverSpec("noisy", ("window_post",), lambda options: Noisy())]
    """
)


@contextmanager
def _asked_once(tmp_path, prover: str, source: str) -> Iterator[Child]:
    """A child serving `prover` from a plugin of `source` (installed as `<prover>_plugin`),
    sent one WindowPoSt (request 1) after its Hello."""
    root = make_plugin_dist(tmp_path, dist=prover, module=f"{prover}_plugin", source=source)
    with Child("window_post", prover, pythonpath=[root]) as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task()))
        yield child


def test_stray_prints_from_a_prover_go_to_stderr_not_into_the_protocol(tmp_path):
    with _asked_once(tmp_path, "noisy", NOISY_PLUGIN) as child:
        response, skipped = child.next_of(dext.Response)
        assert response.output == echo_output(window_task())
        assert all(isinstance(m, dext.Progress) for m in skipped)
        child.close_stdin()
        assert child.wait() == 0
        for noise in ("import", "print", "sys.stdout", "fd 1"):
            assert f"noise from {noise}" in child.stderr
        assert b"noise" not in child.raw


READER_PLUGIN = textwrap.dedent(
    """
    import subprocess, sys
    from damocles_ext.hookspecs import hookimpl, ProverSpec
    from damocles_ext_plugins.testing import echo_output

    class Reader:
        name = "reader"
        stages = ("window_post",)

        def prove(self, task, progress, cancel):
            if task.miner_id != 1000:  # request 1 (window_task()) runs the tool
                return echo_output(task)
            progress("running a tool", 0, 1)  # the test sends request 2 once it sees this
            # A vendor tool started without stdin=DEVNULL that reads its stdin (as ssh does).
            tool = "import os, sys; sys.stderr.write(str(len(os.read(0, 65536))))"
            done = subprocess.run(
                [sys.executable, "-c", tool], capture_output=True, text=True, timeout=30
            )
            if done.stderr != "0":
                raise RuntimeError(f"the tool read {done.stderr} bytes of the protocol")
            return echo_output(task)

    @hookimpl
    def dext_provers():
        return [ProverSpec("reader", ("window_post",), lambda options: Reader())]
    """
)


def test_a_tool_a_prover_runs_reads_no_request_from_the_childs_stdin(tmp_path):
    with _asked_once(tmp_path, "reader", READER_PLUGIN) as child:
        child.next_of(dext.Progress)
        child.send_msg(dext.Request(2, window_task(miner=2)))
        answers = {}
        while len(answers) < 2:
            response, _ = child.next_of(dext.Response)
            answers[response.id] = response
        assert answers[1].error is None, answers[1].error
        assert answers[1].output == echo_output(window_task())
        assert answers[2].output == echo_output(window_task(miner=2))


UNVERSIONED_PLUGIN = textwrap.dedent(
    """
    from damocles_ext.hookspecs import hookimpl, ProverSpec
    from damocles_ext_plugins.testing import echo_output

    class Stop(BaseException):  # a plugin's own, as gevent's GreenletExit is one
        pass

    class Unversioned:
        name = "unversioned"
        stages = ("window_post",)

        @property
        def version(self):
            raise {raised}

        def prove(self, task, progress, cancel):
            return echo_output(task)

    @hookimpl
    def dext_provers():
        return [ProverSpec("unversioned", ("window_post",), lambda options: Unversioned())]
    """
)


@pytest.mark.parametrize(
    ("raised", "said"),
    [('FileNotFoundError("VERSION")', "FileNotFoundError: VERSION"), ('Stop("no")', "Stop: no")],
    ids=["exception", "base-exception"],
)
def test_a_prover_whose_version_cannot_be_read_starts_with_its_plugins_version(
    tmp_path, raised, said
):
    source = UNVERSIONED_PLUGIN.replace("{raised}", raised)
    root = make_plugin_dist(
        tmp_path, dist="unversioned", module="unversioned_plugin", source=source
    )
    with Child("window_post", "unversioned", pythonpath=[root]) as child:
        hello = child.next()
        assert isinstance(hello, dext.Hello), child.stderr
        assert hello.version == "0.1"
        child.send_msg(dext.Request(1, window_task()))
        response, _ = child.next_of(dext.Response)
        assert response.output == echo_output(window_task())
        child.close_stdin()
        assert child.wait() == 0
    assert f"its version cannot be read ({said})" in child.stderr


def test_a_prover_whose_version_is_no_utf8_text_starts_with_it_mended(tmp_path):
    # A version read from a file name that is not UTF-8 (os.fsdecode: lone surrogates): the
    # Hello could not be encoded and the child died with a traceback before its ready line.
    source = UNVERSIONED_PLUGIN.replace("raise {raised}", 'return "1.0-\\udc80"')
    root = make_plugin_dist(
        tmp_path, dist="unversioned", module="unversioned_plugin", source=source
    )
    with Child("window_post", "unversioned", pythonpath=[root]) as child:
        hello = child.next()
        assert isinstance(hello, dext.Hello), child.stderr
        assert hello.version == "1.0-\\udc80"
        child.close_stdin()
        assert child.wait() == 0
    assert "Traceback" not in child.stderr


GARBLED_PLUGIN = textwrap.dedent(
    """
    import os
    from damocles_ext.hookspecs import hookimpl, ProverSpec
    from damocles_ext_plugins.testing import echo_output

    class Unreadable(Exception):
        def __str__(self):
            raise ValueError("no text")

    class Garbled:
        name = "garbled"
        stages = ("window_post",)

        def prove(self, task, progress, cancel):
            if task.miner_id == 1:  # a file name os.fsdecode could not decode
                raise RuntimeError("cannot open " + os.fsdecode(b"/store/s-t01000-\\xff"))
            if task.miner_id == 2:
                raise Unreadable()
            progress("reading " + os.fsdecode(b"\\xff"), 0, 1)
            progress("log " * 500_000, 0, 1)  # a whole log as the phase: re-sent every 2 s
            progress("proving", 2**70, -1)
            cancel.wait(3.3)  # a heartbeat (2 s, looked at every 1 s) re-sends the last progress
            return echo_output(task)

    @hookimpl
    def dext_provers():
        return [ProverSpec("garbled", ("window_post",), lambda options: Garbled())]
    """
)


@pytest.mark.parametrize("capacity", [1, 2], ids=["inline", "threaded"])
def test_error_and_progress_texts_no_frame_can_carry_fail_nothing_but_their_request(
    tmp_path, capacity
):
    # A prover's message with a lone surrogate (a non-UTF-8 file name) could not be encoded:
    # the child exited (capacity 1) or its worker thread died and the request was never
    # answered (capacity 2); a progress report like it failed its proof, or killed the
    # heartbeat thread, and the supervisor then took the busy child for hung.
    root = make_plugin_dist(
        tmp_path, dist="garbled", module="garbled_plugin", source=GARBLED_PLUGIN
    )
    extra = ["--capacity", str(capacity)]
    with Child("window_post", "garbled", pythonpath=[root], extra=extra) as child:
        child.next_of(dext.Hello)
        answers = {}
        for miner in (1, 2, 3):
            child.send_msg(dext.Request(miner, window_task(miner=miner)))
            answers[miner], skipped = child.next_of(dext.Response)
        assert answers[1].error == "RuntimeError: cannot open /store/s-t01000-\\udcff"
        assert answers[2].error == "Unreadable: <Unreadable whose text could not be read>"
        assert answers[3].output == echo_output(window_task(miner=3))
        progress = [(m.phase, m.done, m.total) for m in skipped if isinstance(m, dext.Progress)]
        assert ("reading \\udcff", 0, 1) in progress
        assert ("log " * 64 + "...", 0, 1) in progress  # cut to 256 characters
        # The heartbeat re-sent the last one, its counts left out.
        assert progress[-2:] == [("proving", 0, 0)] * 2, progress
        child.close_stdin()
        assert child.wait() == 0


def test_child_reads_options_as_the_supervisor_formats_them():
    with Child(
        "window_post",
        "sleep",
        format_option("seconds", 0),
        format_option("fail", "never"),
        format_option("load_fail", False),
    ) as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(1, window_task()))
        assert child.next_of(dext.Response)[0].output == echo_output(window_task())


def test_child_module_does_not_import_trio():
    code = "import sys, damocles_ext.child, damocles_ext.plugins; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- outputs the supervisor could not read --------------------------------------------------------

SLOPPY_PLUGIN = textwrap.dedent(
    """
    from damocles_ext.hookspecs import hookimpl, ProverSpec
    from damocles_ext.tasks import WindowPoStOutput
    from damocles_ext_plugins.testing import echo_output

    # What each request's first sector id makes this prover return or raise.
    SLOPPY = {
        1: lambda: WindowPoStOutput(proofs=["text, not bytes"], faults=[]),
        2: lambda: WindowPoStOutput(proofs=[], faults=[-1]),
        3: lambda: WindowPoStOutput(proofs=[b"x" * (65 * 2**20)], faults=[]),
    }

    class Sloppy:
        def prove(self, task, progress, cancel):
            sector = task.replicas[0].sector_id
            if sector == 4:
                raise RuntimeError("y" * (70 * 2**20))
            return SLOPPY.get(sector, lambda: echo_output(task))()

    @hookimpl
    def dext_provers():
        return [ProverSpec("sloppy", ("window_post",), lambda options: Sloppy())]
    """
)


@pytest.mark.parametrize("protocol", ["dext", "jsonl"])
async def test_an_output_the_supervisor_could_not_read_fails_its_request_not_the_child(
    tmp_path, protocol
):
    from damocles_ext.api import open_supervisor
    from damocles_ext.config import parse_config
    from damocles_ext.errors import ProverError

    root = make_plugin_dist(tmp_path, dist="sloppy", module="sloppy_plugin", source=SLOPPY_PLUGIN)
    config = parse_config(
        f'[[WdPost]]\nPlugin = "sloppy"\nProtocol = "{protocol}"\nMaxAttempts = 2\n'
        f'Envs = {{ PYTHONPATH = "{root}" }}\n',
        "sloppy.cfg",
    )

    def task(sector: int) -> WindowPoSt:
        t = window_task()
        return WindowPoSt(
            t.miner_id, t.proof_type, [replace(t.replicas[0], sector_id=sector)], t.seed
        )

    expected = {
        1: "returned an invalid WindowPoStOutput: Expected `bytes`, got `str` - at `$.proofs[0]`",
        2: "returned an invalid WindowPoStOutput: Expected `int` >= 0 - at `$.faults[0]`",
        3: f"MiB as a {'dext frame' if protocol == 'dext' else 'JSON line'}, over the 64 MiB",
        4: "characters cut)",
    }
    with trio.fail_after(60):
        async with open_supervisor(config) as sup:
            await sup.wait_ready("window_post")
            (child,) = sup.statistics().children
            for sector, words in expected.items():
                with pytest.raises(ProverError) as raised:
                    await sup.submit(task(sector))
                assert words in str(raised.value), str(raised.value)[:500]
                assert "attempt" not in str(raised.value)  # answered once, not retried
            assert (await sup.submit(task(5))).proofs == echo_output(task(5)).proofs
            (after,) = sup.statistics().children
            assert after.pid == child.pid and after.restarts == 0


CRASHING_PLUGIN = textwrap.dedent(
    """
    import ctypes
    from damocles_ext.hookspecs import hookimpl, ProverSpec

    class Crashing:
        def prove(self, task, progress, cancel):
            return ctypes.string_at(0)  # SIGSEGV, as a broken native library would

    @hookimpl
    def dext_provers():
        return [ProverSpec("crashing", ("window_post",), lambda options: Crashing())]
    """
)


def test_a_prover_that_crashes_the_child_leaves_where_it_was_on_stderr(tmp_path):
    with _asked_once(tmp_path, "crashing", CRASHING_PLUGIN) as child:
        assert child.wait() == -11  # SIGSEGV
        assert "Fatal Python error: Segmentation fault" in child.stderr
        assert 'crashing_plugin.py", line 7 in prove' in child.stderr


def test_a_child_with_a_log_level_it_does_not_know_starts_at_info_and_says_so():
    # (A block's Envs may set it; "basic_format" was once taken as a level and crashed it.)
    for level in ("basic_format", "loud"):
        env = {**os.environ, "DAMOCLES_EXT_LOG_LEVEL": level}
        argv = [sys.executable, "-m", "damocles_ext", "child", "window_post", "--plugin", "echo"]
        done = subprocess.run(
            argv, input=b"", capture_output=True, env=env, timeout=60, check=False
        )
        stderr = done.stderr.decode()
        assert done.returncode == 0, stderr
        assert b"hello" in done.stdout
        assert "Traceback" not in stderr
        assert (
            f"DAMOCLES_EXT_LOG_LEVEL={level!r} is not one of debug, info, warning, error; fix"
            " or unset it (logging at info)"
        ) in stderr


def test_a_capacity_beyond_a_configs_largest_concurrent_is_refused_before_any_thread_starts():
    # 10**8 worker threads were started one by one: the child hung instead of answering.
    done = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "child", "window_post", "--plugin", "echo",
         "--capacity", "100000000"],
        input=b"",
        capture_output=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert b"argument --capacity: must be at most 1024" in done.stderr
