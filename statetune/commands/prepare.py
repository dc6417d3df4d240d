"""``statetune prepare``: tokenize JSONL/CSV datasets into ``{"text": ids, "mask": 0/1}`` training files.

Everything goes to temporary files that replace ``OUT.jsonl``, ``OUT.val.jsonl`` and ``OUT.meta.json`` only
when the whole run succeeded (see :mod:`statetune.data.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from statetune.data.fields import Template, unescape
from statetune.data.formats import Format
from statetune.data.prepare import PrepareSettings, TokenizerChoice, check_paths, prepare_dataset, resolve_tokenizer
from statetune.errors import OptionError
from statetune.options import h
from statetune.outpaths import check_name

__all__ = ["PrepareOptions", "prepare"]


@dataclass
class PrepareOptions:
    """Tokenize JSONL/CSV datasets into {"text": [ids], "mask": [0/1...]} lines for training.

    The format of each file is detected from its first record (text, tokenized, prompt/completion,
    input/output, instruction, chat messages, chosen/rejected preference pairs) or set with --format;
    --prompt-template and --completion-template read any fields. See docs/prepare.md.
    """

    inputs: list[str] = field(metadata=h("JSONL, CSV or TSV files to tokenize.", positional=True))
    out: str = field(metadata=h("Output name: writes OUT.jsonl, OUT.meta.json (and OUT.val.jsonl); a file "
                                "name, not a directory."))
    format: Format = field(default=Format.AUTO, metadata=h(
        "Record format; auto detects it per file from the first valid record."))
    tokenizer: TokenizerChoice = field(default=TokenizerChoice.AUTO, metadata=h(
        "Tokenizer; auto takes it from --model's vocabulary size, else world."))
    model: str | None = field(default=None, metadata=h(
        "Model checkpoint (.pth/.safetensors) whose vocabulary picks the tokenizer."))
    prompt_template: str | None = field(default=None, metadata=h(
        r"Prompt (no loss) from record fields, e.g. 'Input: {mr}\n\nResponse:' (\n is a newline)."))
    completion_template: str | None = field(default=None, metadata=h(
        "Completion (loss) from record fields, e.g. ' {ref}'."))
    eos: str | None = field(default=None, metadata=h(
        "Appended after each completion: none, a token id, or text. Default: 0 (end of text) for completion "
        "formats, nothing for text and chat (turns end with a blank line)."))
    val_fraction: float = field(default=0.0, metadata=h(
        "Fraction of records for OUT.val.jsonl (deterministic by hash)."))
    split_by: str | None = field(default=None, metadata=h(
        "Field whose value keeps records together on one side of the split."))
    seed: int = field(default=0, metadata=h("Seed of the train/validation split."))
    max_len: int | None = field(default=None, metadata=h(
        "Report records longer than this many tokens (they are kept whole, never truncated)."))
    skip_invalid: bool = field(default=False, metadata=h(
        "Skip invalid records (counted and listed) instead of stopping at the first one."))
    workers: int = field(default=0, metadata=h(
        "Tokenizing processes; 0 = one per CPU core on inputs over 8 MB, else 1."))

    def __post_init__(self) -> None:
        try:
            self.format = Format(self.format)
        except ValueError:
            raise OptionError(f"--format: unknown format {self.format!r} "
                              f"(choose from {', '.join(f.value for f in Format)})") from None
        try:
            self.tokenizer = TokenizerChoice(self.tokenizer)
        except ValueError:
            raise OptionError(f"--tokenizer: unknown tokenizer {self.tokenizer!r} "
                              f"(choose from {', '.join(t.value for t in TokenizerChoice)})") from None
        if not self.inputs:
            raise OptionError("INPUTS: give at least one dataset file")
        if not 0.0 <= self.val_fraction < 1.0:
            raise OptionError(f"--val-fraction: must be in [0, 1), got {self.val_fraction}")
        if self.split_by is not None and self.val_fraction == 0.0:
            raise OptionError("--split-by: only meaningful with --val-fraction above 0")
        if self.max_len is not None and self.max_len < 1:
            raise OptionError(f"--max-len: must be at least 1, got {self.max_len}")
        try:  # OUT is a prefix: "data/" or "data/.jsonl" would write the hidden data/.jsonl and data/.meta.json
            check_name(self.out.removesuffix(".jsonl") or ".", "--out")
        except OptionError:
            raise OptionError(f"--out: {self.out!r} names a directory, not the name of the output files; give "
                              f"one, e.g. {Path(self.out.removesuffix('.jsonl') or '.') / 'train'} (writes "
                              f"train.jsonl and train.meta.json there)") from None
        if self.workers < 0:
            raise OptionError(f"--workers: must be 0 (auto) or more, got {self.workers}")
        if self.prompt_template is not None or self.completion_template is not None:
            if self.format not in (Format.AUTO, Format.TEMPLATE, Format.PREFERENCE):
                raise OptionError(f"--prompt-template/--completion-template: only with --format template or "
                                  f"preference, not {self.format.value}")
        if self.format in (Format.AUTO, Format.TEMPLATE) and self.completion_template is None and (
                self.format is Format.TEMPLATE or self.prompt_template is not None):
            raise OptionError("--completion-template: required with --format template or --prompt-template "
                              "(only --format preference takes --prompt-template alone)")
        for value, flag in ((self.prompt_template, "--prompt-template"),
                            (self.completion_template, "--completion-template")):
            if value is not None:
                Template(unescape(value), flag)

    def output_paths(self) -> tuple[Path, Path | None, Path]:
        """``OUT.jsonl``, ``OUT.val.jsonl`` (None without a split) and ``OUT.meta.json``."""
        base = self.out[: -len(".jsonl")] if self.out.endswith(".jsonl") else self.out
        val = Path(base + ".val.jsonl") if self.val_fraction > 0 else None
        return Path(base + ".jsonl"), val, Path(base + ".meta.json")


def _unescaped(template: str | None) -> str | None:
    return None if template is None else unescape(template)


def prepare(opts: PrepareOptions) -> int:
    """Tokenize ``opts.inputs`` into ``OUT.jsonl`` (+ ``OUT.val.jsonl``) and ``OUT.meta.json``; returns 0."""
    settings = PrepareSettings(
        format=opts.format, prompt_template=_unescaped(opts.prompt_template),
        completion_template=_unescaped(opts.completion_template), eos=opts.eos, val_fraction=opts.val_fraction,
        split_by=opts.split_by, seed=opts.seed, max_len=opts.max_len, skip_invalid=opts.skip_invalid,
        workers=opts.workers)
    inputs, outputs = [Path(p) for p in opts.inputs], opts.output_paths()
    check_paths(inputs, outputs)
    prepare_dataset(inputs, outputs, resolve_tokenizer(opts.tokenizer, opts.model), settings)
    return 0
