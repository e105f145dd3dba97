"""The plugin contract, discovery through entry points, observers, the test provers, the example."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import importlib.metadata
import inspect
import json
import logging
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio
from damocles_ext_plugins import testing
from helpers.child import Child, child_env, make_plugin_dist, window_task, winning_task

from damocles_ext import hookspecs, plugins
from damocles_ext.hookspecs import (
    Cancelled,
    CancelToken,
    ChildInfo,
    ExitStatus,
    ProverSpec,
    RequestInfo,
    hookimpl,
)
from damocles_ext.protocol import dext

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dext-hello-plugin"

# -- the contract ---------------------------------------------------------------------------------


def _hookspecs():
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec")
    }


def test_the_contract_declares_the_provider_and_observer_hooks():
    assert set(_hookspecs()) == {
        "dext_provers",
        "dext_validate_plugin_options",
        "dext_child_started",
        "dext_child_ready",
        "dext_child_exited",
        "dext_request_started",
        "dext_request_finished",
        "dext_sector_paths",
        "dext_sector_providers",
    }


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_every_hook_is_documented_with_parameters_return_and_when_called(name):
    fn = _hookspecs()[name]
    doc = inspect.getdoc(fn) or ""
    assert name.startswith("dext_")
    assert "Parameters:" in doc and "Returns:" in doc and "Called:" in doc, name
    for param in inspect.signature(fn).parameters:
        assert f"`{param}`" in doc, f"{name} does not document its parameter {param!r}"


def test_markers_and_entry_point_group_use_the_project_name():
    assert hookspecs.hookspec.project_name == "damocles_ext"
    assert hookspecs.hookimpl.project_name == "damocles_ext"
    assert plugins.ENTRY_POINT_GROUP == "damocles_ext"


def test_prover_spec_keeps_stages_as_a_tuple_and_validates_nothing_by_default():
    spec = ProverSpec("x", "window_post", lambda options: None)
    assert spec.stages == ("window_post",)
    assert spec.validate_options({"anything": 1}) == []


def test_cancel_token_check_raises_once_cancelled():
    token = CancelToken()
    token.check()
    assert not token.cancelled and token.wait(0) is False
    token.cancel("deadline")
    assert token.cancelled and token.wait(0) is True
    with pytest.raises(Cancelled, match="deadline"):
        token.check()


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (ExitStatus(None, 9, "request timeout"), "killed by SIGKILL (request timeout)"),
        (ExitStatus(3), "exit code 3"),
        (ExitStatus(None, None), "unknown exit status"),
    ],
)
def test_exit_status_describes_itself_for_logs(status, text):
    assert status.describe() == text


# -- discovery ------------------------------------------------------------------------------------


def test_builtin_plugins_are_registered_through_the_package_entry_points():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="damocles_ext")}
    assert eps.get("testing") == "damocles_ext_plugins.testing"
    pm = plugins.get_plugin_manager()
    assert pm.get_plugin("testing") is testing
    origin = pm.origins["testing"]
    assert origin.startswith("damocles-ext ") and origin.endswith("testing.py")
    assert plugins.find_prover(pm, "echo").stages == (
        "window_post",
        "winning_post",
        "window_post_vanilla",
        "window_post_snark",
    )
    assert plugins.prover_plugin(pm, "sleep") == "testing"


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


BROKEN = "raise RuntimeError('the GPU library is missing')\n"


def test_broken_plugin_is_named_in_errors_and_the_others_still_load(tmp_path, monkeypatch):
    module = _unique("broken_plugin")
    make_plugin_dist(
        tmp_path, dist="broken-plugin", module=module, source=BROKEN, entry_point="broken"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = plugins.get_plugin_manager()
    failure = next(e for e in pm.load_errors if e.name == "broken")
    assert failure.error == "RuntimeError: the GPU library is missing"
    assert "broken-plugin 0.1" in failure.origin
    assert plugins.find_prover(pm, "echo").name == "echo"  # the others still load
    with pytest.raises(plugins.PluginError) as excinfo:
        plugins.find_prover(pm, "gpu")
    message = str(excinfo.value)
    assert "unknown prover 'gpu'" in message
    assert "broken (RuntimeError: the GPU library is missing)" in message
    assert "echo (testing: window_post/winning_post/window_post_vanilla/" in message
    rows = {r.name: r for r in plugins.list_plugins(pm)}
    assert rows["broken"].error == failure.error and rows["broken"].provers == ()


def test_a_distribution_whose_entry_points_file_is_corrupt_fails_alone(tmp_path, monkeypatch):
    for dist, text in [
        ("ours-broken", "[damocles_ext]\nthis line has no equals sign\n"),
        ("theirs-broken", "[console_scripts]\nthis line has none either\n"),
    ]:
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = plugins.get_plugin_manager()
    assert plugins.find_prover(pm, "echo").name == "echo"  # the others still load
    [failure] = pm.load_errors
    assert (failure.name, failure.origin) == ("ours-broken", "ours-broken 1.0")
    assert failure.error.startswith("its entry_points.txt cannot be read (TypeError: ")
    assert "each line under [damocles_ext] is NAME = module" in failure.error


OFFERS = """
from damocles_ext.hookspecs import ProverSpec, hookimpl

@hookimpl
def dext_provers():
    return [ProverSpec(name=%r, stages=("window_post",), factory=lambda options: None)]
"""


def test_two_distributions_plugins_of_one_name_are_an_error_not_one_dropped_unsaid(
    tmp_path, monkeypatch
):
    # Which one loads follows sys.path; the other was skipped as a "shadowed copy": its provers
    # "unknown, install the plugin", and no load error (a vendor's "native" hid ours so).
    for dist, module, prover in [("vendor-a", "dup_a", "gpu_a"), ("vendor-b", "dup_b", "gpu_b")]:
        (tmp_path / f"{module}.py").write_text(OFFERS % prover)
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[damocles_ext]\ngpu = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = plugins.get_plugin_manager()
    [failure] = pm.load_errors
    loaded, dropped = (
        ("vendor-a", "vendor-b") if "vendor-a" in pm.origins["gpu"] else ("vendor-b", "vendor-a")
    )
    assert failure.name == "gpu" and failure.origin.startswith(f"{dropped} 1.0"), failure
    assert f"distribution {loaded!r} has a plugin of that name" in failure.error
    assert "rename one's entry point" in failure.error
    with pytest.raises(plugins.PluginError, match="plugins that failed to load: gpu"):
        plugins.find_prover(pm, "gpu_b" if dropped == "vendor-b" else "gpu_a")


def test_plugins_command_lists_provers_origins_and_broken_plugins(tmp_path):
    make_plugin_dist(
        tmp_path,
        dist="broken-plugin",
        module=_unique("broken"),
        source=BROKEN,
        entry_point="broken",
    )
    argv = [sys.executable, "-m", "damocles_ext", "plugins"]
    env = child_env([tmp_path])
    text = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert text.returncode == 0, text.stderr
    assert "broken: FAILED TO LOAD: RuntimeError: the GPU library is missing" in text.stdout
    assert "  from broken-plugin 0.1" in text.stdout
    assert "testing: 2 prover(s), from damocles-ext" in text.stdout
    assert re.search(r"^  echo +window_post, winning_post", text.stdout, re.MULTILINE)
    as_json = subprocess.run(
        [*argv, "--json"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    rows = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert [p["name"] for p in rows["testing"]["provers"]] == ["echo", "sleep"]
    assert rows["broken"]["error"].startswith("RuntimeError")


CHATTY = """
import os
from damocles_ext.hookspecs import hookimpl, ProverSpec

print("chatter from import")
os.write(1, b"chatter from fd 1\\n")

def validate(options):
    print("chatter from validate_options")
    return []

@hookimpl
def dext_provers():
    print("chatter from dext_provers")
    return [ProverSpec("chatty", ("window_post",), lambda options: None, validate_options=validate)]
"""


@pytest.mark.parametrize("command", [["plugins", "--json"], ["check-config", "--json", "-c"]])
def test_what_plugins_print_as_they_load_stays_out_of_a_commands_json(tmp_path, command):
    make_plugin_dist(tmp_path, dist="chatty", module=_unique("chatty"), source=CHATTY)
    cfg = tmp_path / "chatty.cfg"
    cfg.write_text('[[WdPost]]\nPlugin = "chatty"\n')
    argv = [sys.executable, "-m", "damocles_ext", *command]
    if argv[-1] == "-c":
        argv.append(str(cfg))
    done = subprocess.run(
        argv, env=child_env([tmp_path]), capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)  # the whole of stdout is the JSON
    for where in ("import", "fd 1", "dext_provers"):
        assert f"chatter from {where}" in done.stderr


def test_child_starts_although_an_unrelated_plugin_is_broken(tmp_path):
    make_plugin_dist(
        tmp_path,
        dist="broken-plugin",
        module=_unique("broken"),
        source=BROKEN,
        entry_point="broken",
    )
    with Child("window_post", "echo", pythonpath=[tmp_path]) as child:
        assert isinstance(child.next(), dext.Hello)


class Misspelt:
    @hookimpl
    def dext_prover(self):  # the hook is dext_provers
        return []


def test_misspelt_hook_is_reported_with_a_suggestion_and_the_plugin_not_registered():
    pm = plugins.get_plugin_manager(entry_points=False)
    assert not plugins.register_plugin(pm, Misspelt(), "typo")
    assert "unknown hook 'dext_prover' (did you mean 'dext_provers'?)" in pm.load_errors[0].error
    assert not pm.has_plugin("typo")


class Provides:
    def __init__(self, *specs, raises=None):
        self.specs, self.raises = specs, raises

    @hookimpl
    def dext_provers(self):
        if self.raises:
            raise self.raises
        return list(self.specs)


class Echoish:
    name = "x"
    stages = ("window_post",)

    def prove(self, task, progress, cancel):
        return testing.echo_output(task)


def _spec(name="x", stages=("window_post",), **kw):
    return ProverSpec(name, stages, kw.pop("factory", lambda options: Echoish()), **kw)


def test_plugin_whose_dext_provers_raises_is_recorded_and_the_others_still_serve():
    pm = plugins.get_plugin_manager(entry_points=False)
    plugins.register_plugin(pm, Provides(raises=KeyError("cuda")), "bad")
    plugins.register_plugin(pm, Provides(_spec("good")), "good")
    assert plugins.find_prover(pm, "good").name == "good"
    assert [(e.name, e.error) for e in pm.load_errors] == [
        ("bad", "dext_provers raised KeyError: 'cuda'")
    ]


def test_plugin_whose_dext_provers_calls_sys_exit_is_recorded_and_the_others_still_serve():
    pm = plugins.get_plugin_manager(entry_points=False)
    plugins.register_plugin(pm, Provides(raises=SystemExit(5)), "exits")
    plugins.register_plugin(pm, Provides(_spec("good")), "good")
    assert plugins.find_prover(pm, "good").name == "good"
    assert [(e.name, e.error) for e in pm.load_errors] == [
        ("exits", "dext_provers raised SystemExit: 5")
    ]


def test_plugin_returning_something_else_than_prover_specs_is_recorded():
    pm = plugins.get_plugin_manager(entry_points=False)
    plugins.register_plugin(pm, Provides({"name": "x"}), "dicty")
    assert plugins.available_provers(pm) == {}
    assert "returned dict, not ProverSpec" in pm.load_errors[0].error


def test_a_prover_spec_whose_stages_are_not_str_is_recorded_and_the_listings_still_work():
    class Stage(enum.Enum):  # a vendor's own stage type, not a str
        WINDOW = "window_post"

    pm = plugins.get_plugin_manager(entry_points=False)
    plugins.register_plugin(pm, Provides(_spec("enumy", [Stage.WINDOW])), "vendor")
    plugins.register_plugin(pm, Provides(_spec("good")), "good")
    with pytest.raises(plugins.PluginError, match=r"unknown prover 'nosuch'.* good \(good: window"):
        plugins.find_prover(pm, "nosuch")
    with pytest.raises(plugins.PluginError, match="unknown prover 'enumy'"):
        plugins.find_prover(pm, "enumy", "window_post")
    error = (
        "dext_provers raised TypeError: ProverSpec 'enumy': its name, stages and description"
        " must be str (a stage such as 'window_post'), got Stage"
    )
    assert [(e.name, e.error) for e in pm.load_errors] == [("vendor", error)]
    rows = {r.name: r for r in plugins.list_plugins(pm)}
    assert rows["vendor"].provers == () and rows["good"].provers[0].name == "good"


def test_prover_offered_by_two_plugins_is_an_error_naming_both():
    pm = plugins.get_plugin_manager(entry_points=False)
    plugins.register_plugin(pm, Provides(_spec("gpu")), "vendor_a")
    plugins.register_plugin(pm, Provides(_spec("gpu")), "vendor_b")
    with pytest.raises(plugins.PluginError, match=r"several plugins \(vendor_a, vendor_b\)"):
        plugins.find_prover(pm, "gpu")


def test_prover_asked_for_a_stage_it_does_not_serve_is_refused():
    pm = plugins.get_plugin_manager(entry_points=False)
    plugins.register_plugin(pm, Provides(_spec("wd", ("window_post",))), "p")
    with pytest.raises(plugins.PluginError, match="serves window_post, not winning_post"):
        plugins.find_prover(pm, "wd", "winning_post")


class Policy:
    @hookimpl
    def dext_validate_plugin_options(self, prover_name, options):
        if "threads" in options and options["threads"] > 4:
            return [f"{prover_name}: threads must be <= 4 on this site"]
        return None


def test_option_problems_from_the_prover_and_from_other_plugins_are_all_reported():
    pm = plugins.get_plugin_manager(entry_points=False)

    def needs_dev(options):
        return [] if "dev" in options else ["p: option 'dev' is required"]

    spec = _spec("p", validate_options=needs_dev)
    plugins.register_plugin(pm, Provides(spec), "p")
    plugins.register_plugin(pm, Policy(), "policy")
    assert plugins.validate_prover_options(pm, spec, {"threads": 8}) == [
        "p: option 'dev' is required",
        "p: threads must be <= 4 on this site",
    ]
    with pytest.raises(plugins.PluginError, match="invalid options for prover 'p': p: option"):
        plugins.load_prover(pm, "p", {"threads": 8})
    assert isinstance(plugins.load_prover(pm, "p", {"dev": "/dev/x", "threads": 2}), Echoish)


def test_prover_problems_checks_a_config_entry_without_building_the_prover():
    pm = plugins.get_plugin_manager()
    assert plugins.prover_problems(pm, "sleep", {"seconds": 2}, "winning_post") == []
    assert plugins.prover_problems(pm, "sleep", {"seconds": "x"}) == [
        "prover 'sleep': sleep: option 'seconds' must be a number, got 'x'"
    ]
    [unknown] = plugins.prover_problems(pm, "eho", {})
    assert "unknown prover 'eho' (did you mean 'echo'?)" in unknown


def test_factory_failures_and_non_provers_become_plugin_errors():
    pm = plugins.get_plugin_manager(entry_points=False)

    def explode(options):
        raise OSError("libcuda.so: cannot open shared object file")

    specs = _spec("boom", factory=explode), _spec("nothing", factory=lambda o: 42)
    plugins.register_plugin(pm, Provides(*specs), "p")
    with pytest.raises(plugins.PluginError, match=r"'boom' .plugin p. failed to start: OSError"):
        plugins.load_prover(pm, "boom", {})
    with pytest.raises(plugins.PluginError, match="returned int, which has no prove"):
        plugins.load_prover(pm, "nothing", {})


class Unreadable(Exception):
    def __str__(self):
        raise ValueError("no text")


UNREADABLE_PLUGIN = """
class Unreadable(Exception):
    def __str__(self):
        raise ValueError("no text")

raise Unreadable()
"""


class UnreadablePolicy:
    @hookimpl
    def dext_validate_plugin_options(self, prover_name, options):
        raise Unreadable()


def test_plugin_exceptions_whose_text_cannot_be_read_are_reported_not_raised(tmp_path):
    unreadable = Unreadable()
    what = "Unreadable: <Unreadable whose text could not be read>"
    # Its import fails with one: recorded, and the other plugins still load.
    module = _unique("unreadable")
    make_plugin_dist(tmp_path, dist="unreadable", module=module, source=UNREADABLE_PLUGIN)
    done = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "plugins"],
        env=child_env([tmp_path]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"{module}: FAILED TO LOAD: {what}" in done.stdout
    assert "testing: 2 prover(s)" in done.stdout
    # Its dext_provers, a validator and a factory raise one.
    pm = plugins.get_plugin_manager(entry_points=False)
    plugins.register_plugin(pm, Provides(raises=unreadable), "bad")

    def explode(options):
        raise unreadable

    plugins.register_plugin(pm, Provides(_spec("boom", factory=explode)), "p")
    assert plugins.find_prover(pm, "boom").name == "boom"
    assert [(e.name, e.error) for e in pm.load_errors] == [("bad", f"dext_provers raised {what}")]
    with pytest.raises(plugins.PluginError, match=f"'boom' .plugin p. failed to start: {what}"):
        plugins.load_prover(pm, "boom", {})
    plugins.register_plugin(pm, Provides(_spec("picky", validate_options=explode)), "q")
    plugins.register_plugin(pm, UnreadablePolicy(), "policy")
    assert plugins.prover_problems(pm, "picky", {}) == [
        f"prover 'picky': validate_options raised {what}",
        f"prover 'picky': plugin 'policy' dext_validate_plugin_options raised {what}",
    ]


class Halt(BaseException):
    """A BaseException of a plugin's own (as gevent's GreenletExit, asyncio's CancelledError)."""


HALTING_PLUGIN = """
class Halt(BaseException):
    pass

raise Halt("the plugin stops its import")
"""


def test_base_exceptions_out_of_a_plugins_import_hooks_and_validators_are_recorded(tmp_path):
    module = _unique("halting")
    make_plugin_dist(tmp_path, dist="halting", module=module, source=HALTING_PLUGIN)
    with Child("window_post", "echo", pythonpath=[tmp_path]) as child:
        assert isinstance(child.next(), dext.Hello), child.stderr
        child.close_stdin()
        assert child.wait() == 0
    assert f"plugin '{module}'" in child.stderr
    assert "failed to load: Halt: the plugin stops its import" in child.stderr
    pm = plugins.get_plugin_manager(entry_points=False)
    plugins.register_plugin(pm, Provides(raises=asyncio.CancelledError("loop gone")), "bad")

    def halt(options):
        raise Halt("no options today")

    class Halts:
        @hookimpl
        def dext_validate_plugin_options(self, prover_name, options):
            raise Halt("policy")

    plugins.register_plugin(pm, Provides(_spec("picky", validate_options=halt)), "p")
    plugins.register_plugin(pm, Halts(), "policy")
    assert [(e.name, e.error) for e in pm.load_errors] == []
    assert plugins.prover_problems(pm, "picky", {}) == [
        "prover 'picky': validate_options raised Halt: no options today",
        "prover 'picky': plugin 'policy' dext_validate_plugin_options raised Halt: policy",
    ]
    assert [(e.name, e.error) for e in pm.load_errors] == [
        ("bad", "dext_provers raised CancelledError: loop gone")
    ]


def test_trace_env_var_logs_hook_calls(monkeypatch, caplog):
    monkeypatch.setenv(plugins.TRACE_ENV, "1")
    pm = plugins.get_plugin_manager(entry_points=False)
    plugins.register_plugin(pm, Provides(_spec("t")), "p")
    with caplog.at_level(logging.INFO, logger="damocles_ext.hooks"):
        pm.hook.dext_provers()
    assert any("dext_provers" in r.getMessage() for r in caplog.records)


# -- observers ------------------------------------------------------------------------------------

CHILD = ChildInfo("window_post", 0, "window_post#0", 1234, "0")
REQUEST = RequestInfo(9, "window_post", "window_post#0", None)


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def dext_child_started(self, child):
        self.calls.append(("started", child))

    @hookimpl
    async def dext_child_exited(self, child, status):
        await trio.lowlevel.checkpoint()
        self.calls.append(("exited", child, status))

    @hookimpl
    def dext_request_finished(self, request, outcome, duration):
        async def later():
            await trio.lowlevel.checkpoint()
            self.calls.append(("finished", request.id, outcome, duration))

        return later  # a callable returning an awaitable, datasette style


class Raises:
    @hookimpl
    def dext_child_started(self, child):
        raise ValueError("sync observer bug")

    @hookimpl
    async def dext_child_exited(self, child, status):
        await trio.lowlevel.checkpoint()
        raise ValueError("async observer bug")


@pytest.fixture
def observed():
    pm = plugins.get_plugin_manager(entry_points=False)
    recorder = Recorder()
    plugins.register_plugin(pm, recorder, "recorder")
    plugins.register_plugin(pm, Raises(), "raiser")  # registered last: called first
    return pm, recorder


async def test_sync_observer_exception_is_logged_naming_the_plugin_and_others_still_run(
    observed, caplog
):
    pm, recorder = observed
    await plugins.call_observers(pm, "dext_child_started", child=CHILD)
    assert recorder.calls == [("started", CHILD)]
    record = next(r for r in caplog.records if "raiser" in r.getMessage())
    assert "dext_child_started" in record.getMessage() and record.exc_info[1].args == (
        "sync observer bug",
    )


async def test_async_observer_is_awaited_and_its_exception_logged(observed, caplog):
    pm, recorder = observed
    status = ExitStatus(None, 9, "crash")
    await plugins.call_observers(pm, "dext_child_exited", child=CHILD, status=status)
    assert recorder.calls == [("exited", CHILD, status)]
    assert any("async observer bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def test_observer_returning_a_callable_gets_it_called_and_awaited(observed):
    pm, recorder = observed
    await plugins.call_observers(
        pm, "dext_request_finished", request=REQUEST, outcome="ok", duration=0.5, slack=None
    )
    assert recorder.calls == [("finished", 9, "ok", 0.5)]


async def test_observers_do_not_swallow_the_callers_cancellation():
    pm = plugins.get_plugin_manager(entry_points=False)

    class Slow:
        @hookimpl
        async def dext_child_ready(self, child):
            await trio.sleep_forever()

    plugins.register_plugin(pm, Slow(), "slow")
    with trio.CancelScope() as scope:
        scope.cancel()
        await plugins.call_observers(pm, "dext_child_ready", child=CHILD)
    assert scope.cancelled_caught


async def test_unknown_observer_hook_is_logged_not_raised(caplog):
    pm = plugins.get_plugin_manager(entry_points=False)
    await plugins.call_observers(pm, "dext_child_explode", child=CHILD)
    assert "no hook named 'dext_child_explode'" in caplog.text


# -- the test provers (in-process) ----------------------------------------------------------------


def _prove(prover, task, on_progress=lambda *a: None, token=None):
    return prover.prove(task, on_progress, token or CancelToken())


def test_echo_output_is_derived_from_the_task():
    echo = plugins.load_prover(plugins.get_plugin_manager(), "echo", {})
    a, b = _prove(echo, window_task(seed_byte=1)), _prove(echo, window_task(seed_byte=2))
    assert a.faults == [] and len(a.proofs) == 1 and a.proofs != b.proofs
    assert _prove(echo, winning_task()).proofs == [testing.echo_proof(winning_task())]


def test_sleep_stops_at_the_next_check_after_cancel():
    sleep = plugins.load_prover(
        plugins.get_plugin_manager(), "sleep", {"seconds": 600, "progress_interval": 0.001}
    )
    token = CancelToken()
    seen = []

    def on_progress(phase, done, total):
        seen.append(done)
        if done == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        _prove(sleep, window_task(), on_progress, token)
    assert seen == [0, 1, 2, 3]


def test_sleep_fails_every_nth_request():
    sleep = plugins.load_prover(
        plugins.get_plugin_manager(), "sleep", {"seconds": 0, "fail": "every:3"}
    )
    results = []
    for _ in range(6):
        try:
            _prove(sleep, window_task())
            results.append("ok")
        except RuntimeError:
            results.append("fail")
    assert results == ["ok", "ok", "fail", "ok", "ok", "fail"]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"seconds": "long"}, "option 'seconds' must be a number"),
        ({"seconds": True}, "option 'seconds' must be a number"),
        ({"progress_interval": 0}, "option 'progress_interval' must be > 0.0"),
        ({"seconds": 1e308}, "option 'seconds' must be at most 86400, got 1e+308"),
        ({"fail": "sometimes"}, "is not one of never, always, every:N, crash, hang"),
        ({"fail": "every:0"}, "N in every:N must be >= 1"),
        ({"load_fail": "yes"}, "option 'load_fail' must be true or false"),
        ({"sconds": 1}, "unknown option 'sconds'"),
    ],
)
def test_sleep_option_problems_are_reported(options, problem):
    spec = plugins.find_prover(plugins.get_plugin_manager(), "sleep")
    assert any(problem in p for p in spec.validate_options(options))


def test_echo_takes_no_options():
    spec = plugins.find_prover(plugins.get_plugin_manager(), "echo")
    assert spec.validate_options({"seconds": 1}) == [
        "echo: unknown option 'seconds'; echo takes no options"
    ]


# -- the example third-party plugin, installed with pip -------------------------------------------


@pytest.fixture(scope="module")
def hello_installed(tmp_path_factory):
    """pip-install examples/dext-hello-plugin into a private target dir (not into the venv)."""
    work = tmp_path_factory.mktemp("hello")
    source = work / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert list(target.glob("dext_hello_plugin-0.2.0.dist-info"))
    return target


def test_example_plugin_appears_in_the_plugins_listing(hello_installed):
    out = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "plugins"],
        env=child_env([hello_installed]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0
    block = out.stdout.split("hello: ", 1)[1].splitlines()
    assert block[0] == (
        "1 prover(s), from dext-hello-plugin 0.2.0, entry point 'dext_hello_plugin', "
        f"{hello_installed / 'dext_hello_plugin' / '__init__.py'}"
    )
    assert block[1].split()[:3] == ["hello", "window_post,", "winning_post"]


def _hello_proof(greeting, task):
    """The example's proof, computed here from its documented formula."""
    h = hashlib.sha256(greeting.encode() + task.seed + task.miner_id.to_bytes(8, "little"))
    for replica in task.replicas:
        h.update(replica.sector_id.to_bytes(8, "little"))
    return h.digest()


@pytest.mark.parametrize("make_task", [window_task, winning_task])
def test_example_plugin_serves_requests_in_a_child(hello_installed, make_task):
    task = make_task()
    stage = type(task).__struct_config__.tag
    with Child(stage, "hello", "greeting=bonjour", pythonpath=[hello_installed]) as child:
        hello = child.next()
        assert (hello.prover, hello.version) == ("hello", "0.2.0")
        child.send_msg(dext.Request(1, task))
        response, _ = child.next_of(dext.Response)
    assert response.error is None and response.output.proofs == [_hello_proof("bonjour", task)]


def test_example_plugin_option_errors_fail_the_child_start(hello_installed):
    with Child(
        "window_post", "hello", "greeting=", "volume=11", pythonpath=[hello_installed]
    ) as child:
        assert child.wait() == 2
        assert "hello: unknown option 'volume'" in child.stderr
        assert "option 'greeting' must be non-empty text" in child.stderr


async def test_example_plugin_serves_requests_through_the_supervisor(hello_installed):
    from damocles_ext.api import open_supervisor
    from damocles_ext.config import parse_config

    config = parse_config(
        "[[WdPost]]\n"
        'Plugin = "hello"\n'
        'PluginOptions = { greeting = "hi" }\n'
        f'Envs = {{ PYTHONPATH = "{hello_installed}" }}\n',
        "example.cfg",
    )
    task = window_task()
    with trio.fail_after(30):
        async with open_supervisor(config) as sup:
            output = await sup.submit(task)
    assert output.proofs == [_hello_proof("hi", task)] and output.faults == []


class Journal:
    """An observer plugin recording every call, half of its hooks async."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def dext_child_started(self, child):
        self.calls.append(("child_started", child.name))

    @hookimpl
    async def dext_child_ready(self, child):
        await trio.lowlevel.checkpoint()
        self.calls.append(("child_ready", child.name))

    @hookimpl
    def dext_child_exited(self, child, status):
        self.calls.append(("child_exited", child.name))

    @hookimpl
    async def dext_request_started(self, request):
        self.calls.append(("request_started", request.child))

    @hookimpl
    def dext_request_finished(self, request, outcome, duration):
        assert duration >= 0
        self.calls.append(("request_finished", request.child, outcome))


async def prove_once(pm):
    """One window_post proof by a supervisor of one echo child, with plugin manager `pm`."""
    from damocles_ext.api import open_supervisor
    from damocles_ext.config import parse_config

    config = parse_config('[[WdPost]]\nPlugin = "echo"\n', "observed.cfg")
    with trio.fail_after(30):
        async with open_supervisor(config, plugin_manager=pm) as sup:
            await sup.wait_ready("window_post")
            return await sup.submit(window_task())


async def test_supervisor_calls_observers_and_survives_a_raising_one():
    pm = plugins.get_plugin_manager()
    journal = Journal()
    plugins.register_plugin(pm, journal, "journal")
    plugins.register_plugin(pm, Raises(), "raiser")
    assert await prove_once(pm) == testing.echo_output(window_task())
    assert journal.calls == [
        ("child_started", "window_post#0"),
        ("child_ready", "window_post#0"),
        ("request_started", "window_post#0"),
        ("request_finished", "window_post#0", "ok"),
        ("child_exited", "window_post#0"),
    ]


class Exits:
    """Observers that call sys.exit(), as a plugin's alert library may when it fails."""

    @hookimpl
    def dext_child_started(self, child):
        sys.exit(3)

    @hookimpl
    async def dext_request_finished(self, request, outcome):
        await trio.lowlevel.checkpoint()
        sys.exit(4)


async def test_observers_that_call_sys_exit_are_logged_and_the_supervisor_answers(caplog):
    pm = plugins.get_plugin_manager()
    journal = Journal()
    plugins.register_plugin(pm, journal, "journal")
    plugins.register_plugin(pm, Exits(), "exits")
    assert await prove_once(pm) == testing.echo_output(window_task())
    assert ("request_finished", "window_post#0", "ok") in journal.calls
    logged = [r for r in caplog.records if "plugin 'exits' raised" in r.getMessage()]
    assert {type(r.exc_info[1]) for r in logged} == {SystemExit}
    assert {r.getMessage().split()[1] for r in logged} == {
        "dext_child_started",
        "dext_request_finished",
    }


class Interrupts:
    """A plain observer raising a KeyboardInterrupt of its own (a vendor SDK passing on one it
    caught): it runs in a worker thread, where no Ctrl-C is ever raised."""

    @hookimpl
    def dext_child_ready(self, child):
        raise KeyboardInterrupt("the plugin's own")


async def test_a_plain_observers_own_keyboard_interrupt_is_logged_and_the_supervisor_answers(
    caplog,
):
    # Taken for Ctrl-C, it stopped the supervisor (serve exited 130, nothing said of the plugin).
    pm = plugins.get_plugin_manager()
    journal = Journal()
    plugins.register_plugin(pm, journal, "journal")
    plugins.register_plugin(pm, Interrupts(), "interrupts")
    assert await prove_once(pm) == testing.echo_output(window_task())
    assert ("request_finished", "window_post#0", "ok") in journal.calls
    [logged] = [r for r in caplog.records if "plugin 'interrupts' raised" in r.getMessage()]
    assert isinstance(logged.exc_info[1], KeyboardInterrupt), logged.exc_info


class HaltsObserving:
    """Observers that raise BaseExceptions that are not Exceptions."""

    @hookimpl
    def dext_child_started(self, child):
        raise Halt("sync observer")

    @hookimpl
    async def dext_request_finished(self, request, outcome):
        await trio.lowlevel.checkpoint()
        raise asyncio.CancelledError("async observer")

    @hookimpl(wrapper=True)
    def dext_child_ready(self, child):
        yield
        raise Halt("wrapper")


async def test_observers_raising_base_exceptions_are_logged_and_the_supervisor_answers(caplog):
    pm = plugins.get_plugin_manager()
    journal = Journal()
    plugins.register_plugin(pm, journal, "journal")
    assert plugins.register_plugin(pm, HaltsObserving(), "halts")
    assert await prove_once(pm) == testing.echo_output(window_task())
    assert ("request_finished", "window_post#0", "ok") in journal.calls
    logged = {
        r.getMessage().split()[1]: type(r.exc_info[1])
        for r in caplog.records
        if "plugin 'halts'" in r.getMessage()
    }
    assert logged == {
        "dext_child_started": Halt,
        "dext_child_ready:": Halt,
        "dext_request_finished": asyncio.CancelledError,
    }


async def test_an_observer_registered_while_the_supervisor_runs_sees_the_next_request():
    """The supervisor remembers which observer hooks have an implementation (it builds no event
    for the others); a plugin registered, or unregistered, while it runs changes that at once."""
    from damocles_ext.api import open_supervisor
    from damocles_ext.config import parse_config

    class Finished:
        def __init__(self) -> None:
            self.outcomes: list[str] = []
            self.seen = trio.Event()

        @hookimpl
        async def dext_request_finished(self, request, outcome):
            self.outcomes.append(outcome)
            self.seen.set()

    pm = plugins.get_plugin_manager()
    config = parse_config('[[WdPost]]\nPlugin = "echo"\n', "observed.cfg")
    first, second = Finished(), Finished()
    with trio.fail_after(30):
        async with open_supervisor(config, plugin_manager=pm) as sup:
            await sup.wait_ready("window_post")
            await sup.submit(window_task())  # nobody observes it
            plugins.register_plugin(pm, first, "first")
            await sup.submit(window_task())
            await first.seen.wait()
            pm.unregister(first)
            plugins.register_plugin(pm, second, "second")
            await sup.submit(window_task())
            await second.seen.wait()
    assert (first.outcomes, second.outcomes) == (["ok"], ["ok"])


class Around:
    """Wrappers on observer hooks: one that sees the event and what the others returned, one
    that raises before the others run, and an implementation ordered first."""

    def __init__(self, journal):
        self.journal = journal
        self.seen = []

    @hookimpl(wrapper=True)
    def dext_request_finished(self, request, outcome):
        calls_before = len(self.journal.calls)
        results = yield
        # Inside the hook call: the journal's implementation ran between the two halves.
        self.seen.append((request.child, outcome, len(self.journal.calls) - calls_before))
        return results

    @hookimpl(hookwrapper=True)
    def dext_child_started(self, child):
        raise RuntimeError("wrapper bug")
        yield  # a generator, as pluggy wants of a wrapper

    @hookimpl(wrapper=True)
    def dext_request_started(self, request):
        yield
        raise RuntimeError("late wrapper bug")

    @hookimpl(tryfirst=True)
    def dext_child_exited(self, child):
        self.journal.calls.append(("first", child.name))


async def test_observer_hooks_keep_pluggys_wrappers_and_call_order_under_the_supervisor(caplog):
    pm = plugins.get_plugin_manager()
    journal = Journal()
    around = Around(journal)
    plugins.register_plugin(pm, around, "around")  # registered first, yet called first
    plugins.register_plugin(pm, journal, "journal")
    assert await prove_once(pm) == testing.echo_output(window_task())
    assert around.seen == [("window_post#0", "ok", 1)]
    assert journal.calls == [
        # child_started: its raising wrapper ended that event's delivery, logged below;
        # request_started too: the journal's (async) observer ran, but was not awaited
        ("child_ready", "window_post#0"),
        ("request_finished", "window_post#0", "ok"),
        ("first", "window_post#0"),  # tryfirst: before the journal, registered after it
        ("child_exited", "window_post#0"),
    ]
    records = [r for r in caplog.records if "wrapper of plugin 'around'" in r.getMessage()]
    assert [(r.getMessage().split(":")[0], r.exc_info[1].args) for r in records] == [
        ("observer dext_child_started", ("wrapper bug",)),
        ("observer dext_request_started", ("late wrapper bug",)),
    ]
