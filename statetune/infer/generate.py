"""``statetune generate``: text from a model and a (tuned) state, for one prompt or a JSONL/CSV of records.

One ``--prompt`` streams its continuation to stdout and nothing else (diagnostics go to stderr). With
``--input``, every record gets a prompt (from ``--prompt-field``, ``--prompt-template``, the template the
state was trained with, or the record's own format as ``prepare`` detects it), the prompts are decoded
together in batches, and ``--out`` gets each record back with its ``"generated"`` text, in input order.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statetune.data.fields import RecordError, Template, text_field, unescape
from statetune.data.formats import CHAT_END, CHAT_ROLES, Format, detect_format, normalize_chat
from statetune.data.readers import parse_json_line, read_items
from statetune.data.report import templates_for
from statetune.errors import DataError, OptionError
from statetune.infer.engine import Completion, Engine
from statetune.infer.sampling import SamplingOptions, SamplingParams
from statetune.runtime import ModelOptions, Runtime, load_runtime
from statetune.tokenizer import Tokenizer

__all__ = ["GenerateOptions", "generate"]
log = logging.getLogger("statetune.generate")


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(kw_only=True)
class GenerateOptions(SamplingOptions, ModelOptions):
    """Generate text from a model and a state: one --prompt (streamed to stdout), or every record of --input
    into --out. The state's prompt template (from prepare/train) wraps the input unless --raw. See
    docs/generate.md."""

    prompt: str | None = field(default=None, metadata=_h(r"Text to continue (\n is a newline); wrapped in the "
                                                          "state's prompt template unless --raw."))
    input: str | None = field(default=None, metadata=_h("JSONL/CSV of records to generate for (with --out)."))
    out: str | None = field(default=None, metadata=_h("Output JSONL: each input record plus \"generated\"."))
    prompt_field: str | None = field(default=None, metadata=_h("With --input: the field holding the prompt "
                                                                "text (treated like --prompt)."))
    prompt_template: str | None = field(default=None, metadata=_h(
        r"Prompt from record fields, e.g. 'Input: {mr}\n\nResponse:' (default: the state's template)."))
    raw: bool = field(default=False, metadata=_h("Use the prompt text exactly, without any template."))
    batch_size: int = field(default=8, metadata=_h("Sequences decoded together with --input."))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_model_options()
        if (self.prompt is None) == (self.input is None):
            raise OptionError("--prompt/--input: give exactly one of --prompt TEXT or --input IN.jsonl")
        if (self.input is None) != (self.out is None):
            raise OptionError("--out: --input and --out go together")
        if self.prompt_field is not None and self.input is None:
            raise OptionError("--prompt-field: only with --input")
        if self.raw and self.prompt_template is not None:
            raise OptionError("--raw: contradicts --prompt-template (--raw means no template)")
        if self.raw and self.input is not None and self.prompt_field is None:
            raise OptionError("--raw: with --input, name the field holding the prompt with --prompt-field")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size: must be at least 1, got {self.batch_size}")
        if self.prompt_template is not None:
            Template(unescape(self.prompt_template), "--prompt-template")


def stops(opts: SamplingOptions, meta: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[str], list[int]]:
    """Stop strings and ids: the flags, else the state's ``stop`` metadata; end of text (0) always stops."""
    if opts.stop is not None or opts.stop_token is not None:
        strings, ids = [unescape(s) for s in opts.stop or []], list(opts.stop_token or [])
    else:
        stop = meta.get("stop") if isinstance(meta.get("stop"), dict) else {}
        text, stop_ids = stop.get("text"), [i for i in stop.get("ids") or [] if isinstance(i, int)]
        if text or len(stop_ids) > 1:
            strings, ids = [text or tokenizer.decode(stop_ids)], []
        else:
            strings, ids = [], stop_ids
    return strings, sorted({*ids, tokenizer.eot_id})


class Prompts:
    """Builds prompts the way ``prepare`` built training prompts: the text of a raw prompt, or a record."""

    def __init__(self, opts: GenerateOptions, meta: dict[str, Any]) -> None:
        self.raw, self.field = opts.raw, opts.prompt_field
        self.chat = meta.get("data_format") == Format.CHAT.value
        if opts.prompt_template is not None:
            self.template, self.no_input = unescape(opts.prompt_template), None
        else:
            self.template, self.no_input = meta.get("prompt_template") or None, meta.get("prompt_template_no_input")

    def from_text(self, text: str, flag: str = "--prompt") -> str:
        """A raw prompt inside the template's single field (the no-input variant when there is one)."""
        if self.raw or not self.template:
            return text
        for source in (self.template, self.no_input):
            if source:
                t = Template(source, "prompt template")
                if len(t.fields) == 1:
                    return t.render({t.fields[0]: normalize_chat(text) if self.chat else text})
                if not t.fields:
                    return text
        raise OptionError(f"{flag}: the prompt template {self.template!r} needs the fields "
                          f"{', '.join(Template(self.template, '').fields)}; use --input with such records, "
                          "or --raw")

    def from_record(self, record: dict[str, Any]) -> str:
        """The prompt of one record; raises ``RecordError`` naming a missing or mistyped field."""
        if self.field is not None:
            return self.from_text(text_field(record, self.field), "--prompt-field")
        template, no_input = self.template, self.no_input
        if template is None or (self.chat and "messages" in record):
            fmt = detect_format(record)
            if fmt is Format.CHAT:
                return chat_prompt(record["messages"])
            if fmt is None or fmt in (Format.TEXT, Format.TOKENIZED):
                raise RecordError("record", f"cannot tell the prompt from fields {', '.join(map(repr, record))}; "
                                  "give --prompt-field or --prompt-template")
            t = templates_for(fmt, None, None)
            template, no_input = t["prompt_template"], t["prompt_template_no_input"]
        full = Template(template, "prompt template")
        if no_input:
            short = Template(no_input, "prompt template")
            if all(not record.get(f) for f in full.fields if f not in short.fields):
                return short.render(record)
        return full.render(record)


def chat_prompt(messages: Any) -> str:
    """The chat template over the messages up to the last user turn, ending with ``Assistant:``."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RecordError("messages", "expected a list of {role, content} objects")
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    turns = []
    for k, m in enumerate(messages[:last_user + 1]):
        if m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise RecordError(f"messages[{k}]", "expected a role (system, user, assistant) and a string content")
        turns.append(f"{CHAT_ROLES[m['role']]}: {normalize_chat(m['content'])}{CHAT_END}")
    return "".join(turns) + "Assistant:"


def read_records(path: str, prompts: Prompts, tokenizer: Tokenizer) -> list[tuple[dict[str, Any], list[int]]]:
    """Every record of ``path`` with its prompt's token ids; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"--input: no such file: {p}")
    out = []
    for line, item, _ in read_items(p):
        try:
            if isinstance(item, RecordError):
                raise item
            record = parse_json_line(item) if isinstance(item, bytes) else dict(item)
            ids = tokenizer.encode(prompts.from_record(record))
        except RecordError as e:
            raise DataError(f"{p}:{line}: {e.message}") from None
        if not ids:
            raise DataError(f"{p}:{line}: the prompt is empty")
        out.append((record, ids))
    if not out:
        raise DataError(f"{p}: empty file: no records")
    return out


def generate(opts: GenerateOptions) -> int:
    """Run ``statetune generate``; returns the exit status."""
    setup = load_runtime(opts)
    strings, ids = stops(opts, setup.metadata, setup.tokenizer)
    prompts = Prompts(opts, setup.metadata)
    if opts.input is None:
        text = prompts.from_text(unescape(opts.prompt))
        tokens = setup.tokenizer.encode(text)
        if not tokens:
            raise OptionError("--prompt: empty; the model needs at least one token to continue from")
        setup.model.use_decode_layout()  # one sequence: faster matrix-vector products on CPU
        _one(opts, setup, tokens, opts.sampling_params(strings, ids))
    else:
        records = read_records(opts.input, prompts, setup.tokenizer)
        _many(opts, setup, records, strings, ids)
    return 0


def _one(opts: GenerateOptions, setup: Runtime, tokens: list[int], params: SamplingParams) -> None:
    engine = Engine(setup.model, setup.tokenizer, max_batch_size=1)
    engine.add(tokens, setup.state, params)
    t0, done = time.perf_counter(), None
    while done is None:
        for d in engine.step():
            if d.text:
                sys.stdout.write(d.text)
                sys.stdout.flush()
            done = d.completion or done
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    _report(done, time.perf_counter() - t0)


def _report(c: Completion, seconds: float) -> None:
    why = f"stop {c.stop!r}" if c.finish_reason == "stop" else f"--max-tokens {len(c.tokens)}"
    log.info("%d prompt tokens, %d generated (%s), %.1f tokens/s", c.prompt_tokens, len(c.tokens), why,
             len(c.tokens) / max(seconds, 1e-9))


def _many(opts: GenerateOptions, setup: Runtime, records: list[tuple[dict[str, Any], list[int]]],
          strings: list[str], ids: list[int]) -> None:
    from tqdm import tqdm

    from statetune.fileio import atomic_write

    def run(tmp: str) -> None:
        engine = Engine(setup.model, setup.tokenizer, max_batch_size=opts.batch_size)
        index: dict[int, int] = {}
        texts: dict[int, str] = {}
        queued = written = generated = 0
        t0 = time.perf_counter()
        with open(tmp, "w", encoding="utf-8") as fh, tqdm(total=len(records), unit="rec", disable=None,
                                                          file=sys.stderr) as bar:
            while written < len(records):
                while queued < len(records) and len(engine) < opts.batch_size:
                    seq = engine.add(records[queued][1], setup.state, opts.sampling_params(strings, ids, queued))
                    index[seq] = queued
                    queued += 1
                for d in engine.step():
                    generated += 1
                    if d.completion is not None:
                        texts[index.pop(d.seq_id)] = d.completion.text
                while written in texts:
                    fh.write(json.dumps({**records[written][0], "generated": texts.pop(written)},
                                        ensure_ascii=False) + "\n")
                    written += 1
                    bar.update(1)
        log.info("%d records, %d tokens generated, %.1f tokens/s -> %s", len(records), generated,
                 generated / max(time.perf_counter() - t0, 1e-9), opts.out)

    atomic_write(opts.out, run)
