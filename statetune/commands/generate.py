"""``statetune generate``: text from a model and a (tuned) state, for one prompt or a JSONL/CSV of records.

One ``--prompt`` streams its continuation to stdout and nothing else (diagnostics go to stderr). With
``--input``, every record gets a prompt (see :class:`~statetune.infer.generate.RecordPrompts`), the prompts
are decoded together in batches, and ``--out`` gets each record back with its ``"generated"`` text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from statetune.data.fields import Template, unescape
from statetune.errors import OptionError
from statetune.infer.generate import RecordPrompts, generate_records, read_records, stream_one
from statetune.infer.sampling import SamplingOptions
from statetune.options import h
from statetune.outpaths import check_output
from statetune.prompts import stops
from statetune.runtime import ModelOptions, StateOption, check_state_scale, check_stop_tokens, load_runtime

__all__ = ["GenerateOptions", "generate"]


@dataclass(kw_only=True)
class GenerateOptions(SamplingOptions, StateOption, ModelOptions):
    """Generate text from a model and a state: one --prompt (streamed to stdout), or every record of --input
    into --out. The state's prompt template (from prepare/train) wraps the input unless --raw. See
    docs/generate.md."""

    prompt: str | None = field(default=None, metadata=h(r"Text to continue (\n is a newline); wrapped in the "
                                                         "state's prompt template unless --raw."))
    input: str | None = field(default=None, metadata=h("JSONL/CSV of records to generate for (with --out)."))
    out: str | None = field(default=None, metadata=h("Output JSONL: each input record plus \"generated\"."))
    prompt_field: str | None = field(default=None, metadata=h("With --input: the field holding the prompt "
                                                               "text (treated like --prompt)."))
    prompt_template: str | None = field(default=None, metadata=h(
        r"Prompt from record fields, e.g. 'Input: {mr}\n\nResponse:' (default: the state's template)."))
    raw: bool = field(default=False, metadata=h("Use the prompt text exactly, without any template."))
    batch_size: int = field(default=8, metadata=h("Sequences decoded together with --input."))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_model_options()
        check_state_scale(self.state_scale)
        if (self.prompt is None) == (self.input is None):
            raise OptionError("--prompt/--input: give exactly one of --prompt TEXT or --input IN.jsonl")
        if (self.input is None) != (self.out is None):
            raise OptionError("--out: --input and --out go together")
        if self.out is not None:
            check_output(self.out, "--out", [("--input", self.input), ("--state", self.state), ("--model", self.model)])
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

    def prompts(self, meta: dict) -> RecordPrompts:
        """How this command's prompts are built for a state with metadata ``meta``."""
        template = None if self.prompt_template is None else unescape(self.prompt_template)
        return RecordPrompts(meta, template, self.raw, self.prompt_field)


def generate(opts: GenerateOptions) -> int:
    """Run ``statetune generate``; returns the exit status."""
    rt = load_runtime(opts, opts.state, opts.state_scale)
    check_stop_tokens(opts.stop_token, rt.model.config.vocab_size)
    strings, ids = stops(rt.metadata, rt.tokenizer, *opts.stop_lists())
    prompts = opts.prompts(rt.metadata)
    if opts.input is None:
        tokens = rt.tokenizer.encode(prompts.from_text(unescape(opts.prompt)))
        if not tokens:
            raise OptionError("--prompt: empty; the model needs at least one token to continue from")
        stream_one(rt, tokens, opts.sampling_params(strings, ids))
    else:
        records = read_records(opts.input, prompts, rt.tokenizer)
        generate_records(rt, records, opts.out, opts.batch_size, lambda i: opts.sampling_params(strings, ids, i))
    return 0
