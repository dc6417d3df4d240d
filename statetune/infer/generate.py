"""Generation for ``statetune generate``: one prompt streamed as it decodes, or every record of a JSONL/CSV
file, batched, written back in input order with its ``"generated"`` text.

A record's prompt comes from a named field, a template, the template the state was trained with, or the
record's own format as ``prepare`` detects it (:class:`RecordPrompts`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from statetune.data.fields import Template, field_names, text_field
from statetune.data.formats import Format
from statetune.data.preference import preference_prompt
from statetune.data.readers import parse_json_line, read_items
from statetune.errors import DataError, OptionError, RecordError
from statetune.infer.engine import Completion, Engine
from statetune.infer.sampling import SamplingParams
from statetune.prompts import Prompts, chat_prompt, templates_for
from statetune.runtime import Runtime
from statetune.tokenizer import Tokenizer

log = logging.getLogger("statetune.generate")
Records = list[tuple[dict[str, Any], list[int]]]


#: The record shapes whose prompt is known without a template (docs/generate.md lists the same).
PROMPT_SHAPES = "a field prompt, input, instruction (+ input) or messages, or a pair chosen + rejected"


def prompt_format(record: dict[str, Any]) -> Format | None:
    """The format whose prompt template reads ``record``: the formats ``prepare`` detects, matched on their
    prompt fields alone (a record to generate for has no completion yet), in the order of docs/generate.md
    with ``instruction`` before ``input`` (instruction records may have an input too); a preference pair
    (``chosen`` and ``rejected``) first, whatever its prompt's shape."""
    if "chosen" in record and "rejected" in record:
        return Format.PREFERENCE
    if "messages" in record:
        return Format.CHAT
    if "instruction" in record:
        return Format.INSTRUCTION
    if "prompt" in record:
        return Format.PROMPT_COMPLETION
    if "input" in record:
        return Format.INPUT_OUTPUT
    return None


class RecordPrompts(Prompts):
    """:class:`~statetune.prompts.Prompts` that also builds the prompt of a whole record (``field``: the
    record field holding a raw prompt)."""

    def __init__(self, meta: dict[str, Any], template: str | None = None, raw: bool = False,
                 field: str | None = None) -> None:
        super().__init__(meta, template, raw)
        self.field = field

    def from_record(self, record: dict[str, Any]) -> str:
        """The prompt of one record; raises ``RecordError`` naming a missing or mistyped field."""
        if self.field is not None:
            return self.from_text(text_field(record, self.field), "--prompt-field")
        template, no_input = self.template, self.no_input
        if template is None or (self.chat and "messages" in record):
            fmt = prompt_format(record)
            if fmt is Format.CHAT:
                return chat_prompt(record["messages"])
            if fmt is Format.PREFERENCE:
                return preference_prompt(record)
            if fmt is None:
                raise RecordError("record", f"cannot tell the prompt from {field_names(record)}; expected "
                                  f"{PROMPT_SHAPES}, or give --prompt-field or --prompt-template")
            t = templates_for(fmt)
            template, no_input = t["prompt_template"], t["prompt_template_no_input"]
        full = Template(template, "prompt template")
        if no_input:
            short = Template(no_input, "prompt template")
            if all(not record.get(f) for f in full.fields if f not in short.fields):
                return short.render(record)
        return full.render(record)


def read_records(path: str, prompts: RecordPrompts, tokenizer: Tokenizer) -> Records:
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


def stream_one(rt: Runtime, tokens: list[int], params: SamplingParams) -> Completion:
    """Decode one prompt, writing its text to stdout as it comes (a newline at the end in a terminal)."""
    rt.model.use_decode_layout()  # one sequence: faster matrix-vector products on CPU
    engine = Engine(rt.model, rt.tokenizer, max_batch_size=1)
    engine.add(tokens, rt.state, params, source=rt.source)
    t0, done = time.perf_counter(), None
    while done is None:
        for d in engine.step():
            if d.text:
                sys.stdout.write(d.text)
                sys.stdout.flush()
            done = d.completion or done
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    why = f"stop {done.stop!r}" if done.finish_reason == "stop" else f"--max-tokens {len(done.tokens)}"
    log.info("%d prompt tokens, %d generated (%s), %.1f tokens/s", done.prompt_tokens, len(done.tokens), why,
             len(done.tokens) / max(time.perf_counter() - t0, 1e-9))
    return done


def generate_records(rt: Runtime, records: Records, out: str, batch_size: int,
                     params_for: Callable[[int], SamplingParams]) -> None:
    """Decode every record's prompt (``batch_size`` at a time, record ``i`` with ``params_for(i)``) and write
    the records with their ``"generated"`` text to ``out`` as JSONL, in input order (atomically)."""
    from tqdm import tqdm

    from statetune.fileio import atomic_write

    rt.model.use_batch_layout(batch_size)  # batched decode steps: weights blocked once for oneDNN on CPU

    def run(tmp: str) -> None:
        engine = Engine(rt.model, rt.tokenizer, max_batch_size=batch_size)
        index: dict[int, int] = {}
        texts: dict[int, str] = {}
        queued = written = generated = 0
        t0 = time.perf_counter()
        with open(tmp, "w", encoding="utf-8") as fh, tqdm(total=len(records), unit="rec", disable=None,
                                                          file=sys.stderr) as bar:
            while written < len(records):
                while queued < len(records) and len(engine) < batch_size:
                    index[engine.add(records[queued][1], rt.state, params_for(queued), source=rt.source)] = queued
                    queued += 1
                for d in engine.step():
                    generated += 1
                    if d.completion is not None:
                        texts[index.pop(d.seq_id)] = d.completion.text
                while written in texts:
                    fh.write(json.dumps({**records[written][0], "generated": texts.pop(written)},
                                        ensure_ascii=False, allow_nan=False) + "\n")
                    written += 1
                    bar.update(1)
        log.info("%d records, %d tokens generated, %.1f tokens/s -> %s", len(records), generated,
                 generated / max(time.perf_counter() - t0, 1e-9), out)

    atomic_write(out, run)
