"""The documentation names only flags that exist: a renamed or removed option cannot linger in the docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from statetune.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# flags of other programs that the docs quote (pip, pytest, torchrun, lm_eval), of the benchmark scripts, and of the
# shell scripts (scripts/test.sh's --no-install)
LM_EVAL = {"--model_args", "--batch_size", "--tasks", "--include_path", "--output_path", "--log_samples",
           "--apply_chat_template", "--gen_kwargs"}
OTHER_PROGRAMS = {"--nproc_per_node", "--standalone", "--upgrade", "--quiet", "--durations"} | LM_EVAL | {
    m.group(1) for f in (ROOT / "benchmarks").rglob("*.py")
    for m in re.finditer(r"add_argument\(\s*\"(--[a-z0-9_-]+)\"", f.read_text())} | {
    m.group(1) for f in (ROOT / "scripts").glob("*.sh") for m in re.finditer(r"= \"(--[a-z0-9-]+)\"", f.read_text())}
OTHER_PROGRAMS |= {"--head", "--address"}  # `ray start`, in docs/serve.md's cluster set-up


def _parsers() -> dict[str, set[str]]:
    """Each command's flags, keyed by its name as typed (``train``, ``state info``)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    out = {}
    for name, parser in sub.choices.items():
        if isinstance(COMMANDS[name], dict):
            if "" in COMMANDS[name]:  # a group that is also a command (``eval``, ``eval plot``)
                out[name] = set(parser._option_string_actions)
            inner = next(a for a in parser._actions if a.dest == "subcommand")
            for sub_name, sub_parser in inner.choices.items():
                out[f"{name} {sub_name}"] = set(sub_parser._option_string_actions)
        else:
            out[name] = set(parser._option_string_actions)
    return out


def _command_lines(text: str) -> list[str]:
    """``statetune ...`` invocations, with backslash-continued lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0) for m in re.finditer(r"statetune\s+[a-z][^\n`|;&]*", joined)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_flag_in_a_command_line_exists_on_that_command(doc):
    parsers = _parsers()
    wrong = []
    for line in _command_lines(doc.read_text()):
        words = line.split()
        name = " ".join(words[1:3]) if " ".join(words[1:3]) in parsers else words[1]
        if name not in parsers:
            continue  # prose such as "statetune is ..."
        wrong += [f"`{name} {f}`" for f in FLAG.findall(line) if f not in parsers[name] and f not in OTHER_PROGRAMS]
    assert not wrong, f"{doc.name} names flags its commands do not have: {', '.join(sorted(set(wrong)))}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_flag_named_anywhere_exists_on_some_command(doc):
    known = set().union(*_parsers().values()) | OTHER_PROGRAMS
    unknown = sorted(set(FLAG.findall(doc.read_text())) - known)
    assert not unknown, f"{doc.name} names flags that no command has: {', '.join(unknown)}"
