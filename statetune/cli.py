"""The ``statetune`` command: a table from command name to (options dataclass, library function).

No logic lives here: each command is a library function taking its options dataclass, so everything the
CLI does can also be driven from Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import traceback
from dataclasses import dataclass

from statetune._version import __version__
from statetune.errors import USAGE, explain
from statetune.interrupts import handle_sigterm, terminated
from statetune.options import add_arguments, from_namespace

THREADS_HELP = "CPU threads for torch (default: torch's)."
DEBUG_HELP = "Show the full traceback of an error (also: environment STATETUNE_DEBUG=1)."
BUG_REPORT = ("this is a bug in statetune {version}, not something you did wrong; please report it with the "
              "command you ran and the traceback above")


@dataclass(frozen=True)
class Command:
    """Where a command's options dataclass and function live (imported only when the command runs)."""

    module: str
    options: str
    function: str
    summary: str

    def load(self) -> tuple[type, object]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.options), getattr(mod, self.function)


STATE_COMMANDS: dict[str, Command] = {
    "info": Command("statetune.commands.state", "InfoOptions", "info", "Shapes, norms and metadata of a state."),
    "convert": Command("statetune.commands.state", "ConvertOptions", "convert",
                       "Convert between statetune and the ecosystem's state formats."),
    "merge": Command("statetune.commands.state", "MergeOptions", "merge",
                     "Write a state into a copy of a model checkpoint (time_state keys)."),
    "capture": Command("statetune.commands.state", "CaptureOptions", "capture",
                       "Save the state a prompt leaves behind, without training."),
    "average": Command("statetune.commands.state", "AverageOptions", "average",
                       "Interpolate states of the same model."),
}

#: A group's "" entry runs when no subcommand is named: ``statetune eval --model ...``, ``statetune eval plot RUN``.
EVAL_COMMANDS: dict[str, Command] = {
    "": Command("statetune.commands.eval", "EvalOptions", "evaluate",
                "Task loss and generation metrics, base model and states side by side."),
    "plot": Command("statetune.commands.eval", "PlotOptions", "plot",
                    "Draw a training run's loss curves to RUN_DIR/curves.png."),
}

MODEL_COMMANDS: dict[str, Command] = {
    "convert": Command("statetune.commands.model", "ModelConvertOptions", "convert",
                       "Convert a model between the official .pth layout and a Hugging Face directory."),
}

COMMANDS: dict[str, Command | dict[str, Command]] = {
    "prepare": Command("statetune.commands.prepare", "PrepareOptions", "prepare",
                       "Tokenize JSONL/CSV datasets into {text: ids, mask} training files."),
    "train": Command("statetune.commands.train", "TrainOptions", "train",
                     "Train the initial state of a frozen RWKV model."),
    "eval": EVAL_COMMANDS,
    "generate": Command("statetune.commands.generate", "GenerateOptions", "generate",
                        "Generate text from a model and a state, for one prompt or a file of records."),
    "chat": Command("statetune.commands.chat", "ChatOptions", "chat",
                    "Chat with a model and a state, the conversation carried in the state."),
    "serve": Command("statetune.commands.serve", "ServeOptions", "serve",
                     "Serve a model and its states over an OpenAI-compatible HTTP API."),
    "state": STATE_COMMANDS,
    "model": MODEL_COMMANDS,
    "demo": Command("statetune.commands.demo", "DemoOptions", "demo",
                    "Tune a state on the shipped small model and show the gain."),
    "smoke": Command("statetune.commands.smoke", "SmokeOptions", "smoke",
                     "Build a tiny random RWKV-7, run it, and check sequence vs token-by-token."),
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser: one subcommand per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="statetune", description="State tuning for RWKV language models.")
    parser.add_argument("--version", action="version", version=f"statetune {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        if isinstance(cmd, dict):
            default = cmd.get("")
            if default is None:
                group = sub.add_parser(name, help=f"{name} tools: {', '.join(cmd)}.")
            else:
                group = _add_command(sub, name, default)
            inner = group.add_subparsers(dest="subcommand", required=default is None,
                                         metavar="SUBCOMMAND" if default is None else "[SUBCOMMAND]")
            for sub_name, sub_cmd in cmd.items():
                if sub_name:
                    _add_command(inner, sub_name, sub_cmd)
        else:
            _add_command(sub, name, cmd)
    return parser


def _add_command(sub, name: str, cmd: Command) -> argparse.ArgumentParser:
    opts_cls, _ = cmd.load()
    p = sub.add_parser(name, help=cmd.summary, description=(opts_cls.__doc__ or cmd.summary).strip())
    p.add_argument("--config", help="TOML file of options; command-line flags override it.", default=None)
    if not _has_threads(opts_cls):  # commands that run a model have --threads in their runtime options
        p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    add_arguments(p, opts_cls)
    return p


def _has_threads(opts_cls: type) -> bool:
    return any(f.name == "threads" for f in dataclasses.fields(opts_cls))


def resolve(ns: argparse.Namespace) -> tuple[str, Command]:
    """The command a parsed namespace names (``state info`` for groups)."""
    cmd = COMMANDS[ns.command]
    if isinstance(cmd, dict):
        sub = getattr(ns, "subcommand", None) or ""
        return f"{ns.command} {sub}".strip(), cmd[sub]
    return ns.command, cmd


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``statetune`` console script; returns the exit status.

    The one error boundary: an expected failure (see :func:`statetune.errors.explain`) is one line on
    stderr and exit status 2 (usage) or 1 (runtime); an interrupt (Ctrl-C or SIGTERM) is 130 or 143; a bug
    in statetune shows its traceback and asks for a report. ``--debug`` shows every traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    parser = build_parser()
    ns = parser.parse_args(argv)  # a usage error here: argparse prints it and exits with status 2
    debug = ns.__dict__.pop("debug", False) or os.environ.get("STATETUNE_DEBUG", "") not in ("", "0")
    name, cmd = resolve(ns)
    ns.__dict__.pop("subcommand", None)
    opts_cls, fn = cmd.load()
    threads = None if _has_threads(opts_cls) else ns.__dict__.pop("threads", None)
    if threads is not None:
        if threads < 1:
            print(f"statetune {name}: error: --threads: must be at least 1, got {threads}", file=sys.stderr)
            return USAGE
        import torch

        torch.set_num_threads(threads)
    restore = handle_sigterm()
    try:
        opts = from_namespace(opts_cls, ns, ns.config)
        result = fn(opts)
    except KeyboardInterrupt:
        print(f"statetune {name}: {'terminated' if terminated() else 'interrupted'}", file=sys.stderr)
        return 143 if terminated() else 130
    except BrokenPipeError:  # the reader went away (`statetune ... | head`): stop quietly, as Unix tools do
        _silence_stdout()
        return 141
    except Exception as e:  # the boundary: every expected failure becomes one line
        return _report(name, e, debug)
    finally:
        restore()
    code = result if isinstance(result, int) else 0
    return 143 if code == 130 and terminated() else code  # a command that stopped cleanly on SIGTERM


def _report(name: str, exc: Exception, debug: bool) -> int:
    """Print an error the way :func:`main` promises; returns the exit status."""
    expected = explain(exc)
    if debug or expected is None:
        traceback.print_exception(exc, file=sys.stderr)
    if expected is None:
        print(f"statetune {name}: error: {BUG_REPORT.format(version=__version__)}", file=sys.stderr)
        return 1
    message, code = expected
    print(f"statetune {name}: error: {message}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a file descriptor
        pass


if __name__ == "__main__":
    sys.exit(main())
