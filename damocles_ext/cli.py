"""The `damocles-ext` command line: parse arguments, call the library, map errors to exit codes.

Each subcommand lives in `damocles_ext/commands/<name>.py` and exposes
`add_parser(subparsers) -> argparse.ArgumentParser` and `run(args) -> int`. Command modules keep
their imports light at module level (heavy imports go inside `run`) so `--help` stays fast, and
only the command given is imported and built (`build_parser`): a prover child, started by every
supervisor and again after each crash, pays for its own command only.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import io
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar, NoReturn

from . import __version__
from .errors import EXIT_USAGE, DextError, OutputError, ProverError

# Order is the order shown in --help.
COMMANDS = (
    "check_config",
    "serve",
    "run",
    "prove",
    "status",
    "child",
    "plugins",
    "sectors",
    "verify",
    "demo",
    "simulate",
    "wdpost",
    "coordinator",
    "worker",
)


#: The metavars of the options and arguments that name a file or a directory.
PATH_METAVARS = frozenset({"FILE", "DIR", "PATH", "TASK.json", "OUT.json", "MANIFEST.json"})


class _StoreOnce(argparse._StoreAction):
    """Every _Parser's 'store': an option taking one value, given twice with different values
    (`--jobs A --jobs B`), is refused (exit 2) naming both, where argparse kept the last one
    silently. The same value twice stays allowed; options meant to repeat append instead."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if self.option_strings and self.nargs is None and isinstance(parser, _Parser):
            text = parser._text
            if self in parser._given:
                earlier, earlier_text = parser._given[self]
                if earlier_text != text and earlier != values:
                    raise argparse.ArgumentError(
                        self, f"given twice ({earlier_text!r} and {text!r}): give it once"
                    )
            parser._given[self] = (values, text)
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    #: The arguments being parsed and the parser of the whole command line (set by parse_args),
    #: for `error` to name what this parser does not take when argparse stops at something
    #: else first, and the hints to say which options were meant.
    _argv: ClassVar[list[str]] = []
    _root: ClassVar[argparse.ArgumentParser | None] = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # argparse's own keywords
        # 'store' (the default action) refuses a second, different value: see _StoreOnce.
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)
        self.partial = False  # the root parser, built for one command (build_parser)
        #: Each store option given in this parse: its value and the text it was given as.
        self._given: dict[argparse.Action, tuple[object, str]] = {}
        #: The text of the value being converted, for _StoreOnce to say it as typed.
        self._text = ""

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> object:
        if isinstance(action, _StoreOnce) and len(arg_strings) == 1:
            self._text = arg_strings[0]
        return super()._get_values(action, arg_strings)

    def error(self, message: str) -> NoReturn:  # argparse exits 2 already; keep its wording short
        commands = _subcommands(self)
        foreign: list[str] = []
        if commands is not None and (mistyped := _mistyped_command(message, commands)) is not None:
            # Which options come after the subcommand is not known when the subcommand is the
            # mistake (`statu --json`): none is called foreign; the one close to it is said.
            # Those before the word taken for it are this parser's (`--socket s status`: s).
            word, close = mistyped
            message += close
            foreign = self._foreign(upto=word)
        elif not message.startswith("unrecognized arguments"):
            # argparse stops at what it could not fit (`check-config -c F --log-format json`:
            # "argument FILE: not allowed with argument -c", json taken as the FILE) before it
            # would say that --log-format is no option here, the mistake to fix.
            foreign = self._foreign()
        if foreign:
            hints = "; ".join(_hints([self], foreign))
            message += (
                f" ({' and '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not an option"
                f" of {self.prog}{': ' + hints if hints else ''})"
            )
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def _foreign(self, upto: str | None = None) -> list[str]:
        """The options given after this (sub)command's name (and before `upto`, if given) that
        it does not take, nor any abbreviation of one of its own."""
        argv = _Parser._argv
        given = argv[_after_names(argv, self.prog.split()[1:]) :]
        if upto in given:
            given = given[: given.index(upto)]
        given = _options_in(given)
        own = [o for a in self._actions for o in a.option_strings]
        return [t for t in given if not any(o.startswith(t) for o in own)]

    def parse_args(  # type: ignore[override]  # the same arguments, passed on
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        # argparse says an argument no (sub)command takes is unrecognized with the top parser's
        # usage and name; the subcommand given is the one that did not take it.
        _Parser._argv = argv = list(sys.argv[1:] if args is None else args)
        _Parser._root = self
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            chain, names = _given(self, parsed)
            # What came before the subcommand's name went to a parser above (`--json status`):
            # blamed there, and then the options of each parser on the way are the ones it may
            # have meant.
            # An option given both before and after it (`--json status --json`) is the one
            # before: the subcommand took the other (a word, `status status`, is the one after).
            start = _after_names(argv, names)
            before = set(_options_in(argv[:start]))
            after = all(e in argv[start:] and e.split("=", 1)[0] not in before for e in extras)
            blamed, meant = (chain[-1], chain[-1:]) if after else (self, chain)
            hints = "; ".join(_hints(meant, extras))
            blamed.error(
                f"unrecognized arguments: {' '.join(extras)}{f' ({hints})' if hints else ''}"
            )
        return parsed

    def parse_known_args(  # type: ignore[override]  # the same arguments, passed on
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # An empty path would be the current directory (Path("") is "."): a config "that is a
        # directory", fixtures written where the command ran. Refused for every path option.
        self._given = {}
        parsed, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if action.metavar in PATH_METAVARS and getattr(parsed, action.dest, None) == "":
                name = "/".join(action.option_strings) or str(action.metavar)
                what = "a directory" if action.metavar == "DIR" else "a file"
                self.error(f"argument {name}: empty; give the path of {what}")
        return parsed, extras


def _after_names(argv: list[str], names: list[str]) -> int:
    """Where in `argv` what follows the subcommand names `names` ('sectors', 'create') starts:
    just after the last of them, each looked for after the one before; 0 with no names."""
    at = -1
    for name in names:
        at = argv.index(name, at + 1) if name in argv[at + 1 :] else at
    return at + 1


def _options_in(args: list[str]) -> list[str]:
    """The long options given in `args`, `--name=value` as --name, none after a `--` (what
    follows it is positional)."""
    if "--" in args:
        args = args[: args.index("--")]
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _mistyped_command(
    message: str, commands: argparse._SubParsersAction[argparse.ArgumentParser]
) -> tuple[str, str] | None:
    """When `message` says the subcommand typed is none of `commands`: the word typed, and
    ' (did you mean status?)' if one is spelt alike, else ''. None for another message."""
    import re

    from .config.messages import closest

    name = argparse._get_action_name(commands)
    said = re.match(rf"argument {re.escape(str(name))}: invalid choice: (['\"])(.*?)\1", message)
    if said is None:
        return None
    close = closest(said[2], list(commands.choices))
    return said[2], f" (did you mean {close}?)" if close else ""


def _hints(parsers: list[argparse.ArgumentParser], extras: list[str]) -> list[str]:
    """What may have been meant by the options among `extras` that `parsers` do not take where
    they were given: that such an option is one of another command ('--miner is an option of
    damocles-ext sectors create'), or of a subcommand it was given before ('put it after the
    command'), and the one of `parsers` it is close to ('did you mean --conf-dir?'), if any."""
    from .config.messages import closest
    from .wording import some_and_more

    given = set(_options_in(_Parser._argv))
    own = {o for p in parsers for a in p._actions for o in a.option_strings}
    # An option given already is not what another one meant (`--manager h -c f --miner 1`).
    known = sorted(o for o in own if o.startswith("--") and o not in given)
    typed = [t for t in dict.fromkeys(_options_in(extras)) if t in given]
    notes: list[str] = []
    close: dict[str, str] = {}
    for t in typed:
        if t in own:  # a subcommand's, given before its name (`--json status`)
            holder = next(
                p for p in reversed(parsers) if any(t in a.option_strings for a in p._actions)
            )
            names = holder.prog.split()[1:]
            if t in _options_in(_Parser._argv[_after_names(_Parser._argv, names) :]):
                notes.append(
                    f"{t} is an option of {holder.prog}, given after it too: leave out the one"
                    " before the command"
                )
            else:
                notes.append(f"{t} is an option of {holder.prog}: put it after the command")
            continue
        if elsewhere := _commands_with(t):
            named = [elsewhere[0], *(p.removeprefix("damocles-ext ") for p in elsewhere[1:3])]
            notes.append(f"{t} is an option of {some_and_more(named, len(elsewhere))}")
        # The same but for case and - or _ (--CONF-DIR, --conf_dir); else the one option that
        # holds it (--miner: --allowed-miners); else one spelt alike (difflib's 0.75 took
        # --miner for --manager, --count for --connect), as typed (not by key: without its
        # dashes --deadline-afte- is close to --deadline).
        typed_as = t.lower().replace("_", "-")
        if match := closest(typed_as, known, containing=True, cutoff=0.8, by_key=False):
            close[t] = match
    if len(close) == 1:
        notes.append(f"did you mean {next(iter(close.values()))}?")
    elif close:
        notes.append(f"did you mean {', '.join(f'{m} for {t}' for t, m in close.items())}?")
    return notes


def _subcommands(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    """`parser`'s subcommands, if it has some (argparse allows one set per parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _commands_with(option: str) -> list[str]:
    """The (sub)commands that take `option` ('damocles-ext sectors create')."""
    found: list[str] = []
    root = _Parser._root
    if isinstance(root, _Parser) and root.partial:  # built for one command: all are looked at
        root = _Parser._root = build_parser()  # (once: each option of the hints asks)
    todo = [root] if root is not None else []
    while todo:
        parser = todo.pop(0)
        if any(option in a.option_strings for a in parser._actions):
            found.append(parser.prog)
        if (commands := _subcommands(parser)) is not None:
            todo.extend(dict.fromkeys(commands.choices.values()))  # once each (aliases)
    return found


def _given(
    parser: argparse.ArgumentParser, parsed: argparse.Namespace
) -> tuple[list[argparse.ArgumentParser], list[str]]:
    """The parsers that `parsed` went through, `parser` first and the innermost subcommand's
    last, and the names of the subcommands on the way."""
    if (commands := _subcommands(parser)) is not None:
        name = getattr(parsed, commands.dest, None) or ""
        chosen = commands.choices.get(name)
        if chosen is not None:
            inner, names = _given(chosen, parsed)
            return [parser, *inner], [name, *names]
    return [parser], []


def build_parser(argv: Sequence[str] | None = None) -> _Parser:
    """The command line's parser. Given the arguments, when the first names a command, only
    that command is built (its module alone imported): a prover child's start, or any one
    command, does not pay for importing and building all the others (about 50 ms of CPU)."""
    parser = _Parser(
        prog="damocles-ext",
        description="Supervise Filecoin PoSt prover processes (a drop-in ext-prover for damocles).",
    )
    parser.add_argument("--version", action="version", version=f"damocles-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    chosen = _command_module(argv[0]) if argv else None
    parser.partial = chosen is not None
    for name in COMMANDS if chosen is None else (chosen,):
        try:
            module = importlib.import_module(f"damocles_ext.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"damocles_ext.commands.{name}":
                continue  # not built yet
            raise
        command_parser = module.add_parser(sub)
        command_parser.set_defaults(_run=module.run)
    return parser


def _command_module(word: str) -> str | None:
    """The module (in COMMANDS) of the command named `word`, if one is."""
    module = word.replace("-", "_")
    return module if module in COMMANDS and module.replace("_", "-") == word else None


class _Stdout(io.RawIOBase):
    """fd 1 under sys.stdout: a write that fails for another reason than a reader gone (a full
    disk, a descriptor closed when we were started) raises OutputError saying so, once; what
    is written after that is dropped, as it cannot be delivered either."""

    def __init__(self, closed: bool) -> None:
        super().__init__()
        self.closed_at_start = closed
        self.failed = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return os.isatty(1)

    def write(self, data: bytes) -> int:  # type: ignore[override]  # bytes-like, as io passes
        if self.failed:
            return len(data)
        # All of it, as a write_through TextIOWrapper (python -u) does not write the rest.
        view, done = memoryview(data), 0
        while done < len(view):
            try:
                done += os.write(1, view[done:])
            except BlockingIOError:
                # A non-blocking stdout (O_NONBLOCK set on the file we share, by a shell or a
                # program that started us) whose reader is behind: not full, so wait for room.
                import select

                select.select([], [1], [])
            except BrokenPipeError:
                raise
            except OSError as exc:
                self._fail(exc)
        return done

    def _fail(self, exc: OSError) -> NoReturn:
        self.failed = True
        if self.closed_at_start:
            raise OutputError(
                "stdout is closed, so the output cannot be written; start the command with"
                " stdout open (redirect it to a file, or to /dev/null to drop it)"
            ) from None
        raise OutputError(f"cannot write the output to stdout: {exc.strerror}") from None


#: The error handler of the text written to stdout: a character the locale's encoding cannot
#: write is never an error. A byte a path held that is not UTF-8 (a surrogate, as os.fsdecode
#: reads it) is written as that byte, as `ls` writes the name; any other character (a worker's
#: name in a locale of another script) as a backslash escape.
OUTPUT_ERRORS = "damocles-ext-output"


def _output_errors(exc: UnicodeError) -> tuple[str | bytes, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    char = exc.object[exc.start]
    if 0xDC80 <= ord(char) <= 0xDCFF:
        return bytes([ord(char) - 0xDC00]), exc.start + 1
    return char.encode("ascii", "backslashreplace").decode("ascii"), exc.start + 1


codecs.register_error(OUTPUT_ERRORS, _output_errors)


def _guard_stdio() -> None:
    """Make fds 0, 1 and 2 open, so that no file, socket or database we open takes one of their
    numbers (a closed 1 would have our output written into it): a closed one becomes /dev/null,
    fd 1 read-only so that writing there still fails. Then, unless sys.stdout was replaced (a
    test capturing it, a program embedding us), it reports a failed write as OutputError."""
    closed = {}
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_RDONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
            closed[fd] = False
        except OSError:
            closed[fd] = True
            devnull = os.open(os.devnull, mode)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
    if closed[0] and sys.stdin is None:  # read as empty ('-' given for an input file)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin
    if closed[2] and sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - the process's own stderr
    stdout = sys.stdout
    if stdout is not None and stdout is not sys.__stdout__:
        return
    # Unbuffered as it was (python -u, PYTHONUNBUFFERED): each write goes out at once.
    unbuffered = stdout is not None and stdout.write_through
    raw = _Stdout(closed[1])
    sys.stdout = io.TextIOWrapper(
        raw if unbuffered else io.BufferedWriter(raw),
        encoding=stdout.encoding if stdout is not None else None,
        errors=OUTPUT_ERRORS,
        line_buffering=stdout.line_buffering if stdout is not None else False,
        write_through=unbuffered,
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (0, 1 when it failed, 2 for usage or input errors, 75 when
    the GPU driver does not answer yet: see errors.EXIT_TEMPFAIL)."""
    _guard_stdio()
    try:
        try:
            return _main(argv)
        finally:
            # Output still buffered (also as argparse exits after --help) would otherwise meet
            # a closed pipe at interpreter exit, where the error can no longer be caught.
            sys.stdout.flush()
    except BaseException as exc:
        if _only(exc, OutputError):
            print(f"damocles-ext: error: {_first(exc)}", file=sys.stderr)
            return 1
        if not _only(exc, BrokenPipeError):
            raise
        # The reader went away (`| head`): nothing more can be said there, and no traceback.
        # Point stdout at /dev/null so that the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """`exc` is a `kind`, or a group (from a trio nursery) holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kind) for e in exc.exceptions)
    return isinstance(exc, kind)


def _first(exc: BaseException) -> BaseException:
    """The first exception in `exc` (a group's first leaf)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def command_name(args: argparse.Namespace) -> str:
    """The command `args` ran, as its errors name it: `damocles-ext wdpost reset`, with the
    subcommand of a command that has them (its `<command>_command`)."""
    sub = getattr(args, f"{args.command.replace('-', '_')}_command", None)
    return f"damocles-ext {args.command}" + (f" {sub}" if isinstance(sub, str) else "")


def _say_error(
    args: argparse.Namespace, text: str, exit_code: int, request_id: int | None = None
) -> None:
    """Why the command failed, on stderr: a line of text, or, when the command logs JSON lines,
    one more record (a log pipeline parsing JSON would miss a line of text, the one that says
    why the service stopped), with `request_id`, the supervisor's number of the request whose
    error answer it is (`prove`'s), if one."""
    from . import logs  # here: the commands' start imports no more than they need

    if hasattr(args, "log_format") and logs.json_logging():
        fields: dict[str, int] = {"exit_code": exit_code}
        if request_id is not None:
            fields["request_id"] = request_id
        logging.getLogger("damocles_ext.cli").error("%s", text, extra=fields)
    else:  # (each line's controls escaped: an id or a server's words may hold an ESC, a CR)
        print("\n".join(map(logs.controls_escaped, text.split("\n"))), file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    args = None
    try:
        # Building the parser imports the command's module: Ctrl-C then is as quiet as later.
        args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
        return int(args._run(args) or 0)
    except DextError as exc:
        if args is None:  # stdout failed as the parser wrote --help: main() says so
            raise
        rid = None
        if isinstance(exc, ProverError):  # (over run's socket: the number in run's log)
            from .frontends.started import supervisor_number

            rid = supervisor_number(exc)
        _say_error(args, f"{command_name(args)}: error: {exc}", exc.exit_code, rid)
        return exc.exit_code
    except BaseException as exc:
        # Ctrl-C, also when trio raises it out of a nursery, inside a group.
        if _only(exc, KeyboardInterrupt):
            return 130
        raise
    finally:
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
