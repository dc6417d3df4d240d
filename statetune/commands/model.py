"""``statetune model convert``: move a model between the official layout and a Hugging Face directory."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from statetune.errors import OptionError
from statetune.model.convert import LAYOUTS, TOKENIZER_CHOICES, convert_checkpoint
from statetune.model.hf_layouts import DEFAULT_LAYOUT
from statetune.model.hf_layouts import LAYOUTS as HF_LAYOUTS
from statetune.options import h
from statetune.outpaths import check_not_input, check_output

DTYPES = ("keep", "fp32", "bf16", "fp16")
_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str, flag: str) -> int | None:
    """``"5GB"`` -> bytes; ``""`` -> None (no sharding)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    unit = m.group(2) if m else ""
    if not m or (unit and unit not in _UNITS):
        raise OptionError(f"{flag}: expected a size such as 5GB or 500MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class ModelConvertOptions:
    """Convert a model between the official layout (.pth/.safetensors file) and a Hugging Face directory."""

    input: str = field(metadata=h("Model to read: an official .pth/.safetensors file or an HF directory.",
                                   positional=True))
    output: str = field(metadata=h("Where to write: a file for --to pth, a new directory for --to hf.",
                                    positional=True))
    to: str = field(default="", metadata=h(f"Output layout: {', '.join(LAYOUTS)} (default: the other one)."))
    dtype: str = field(default="keep", metadata=h(f"Weight dtype to write: {', '.join(DTYPES)}."))
    max_shard_size: str = field(default="", metadata=h("--to hf: split the weights into safetensors shards "
                                                        "of at most this size (e.g. 5GB); default one file."))
    layout: str = field(default=DEFAULT_LAYOUT, metadata=h(
        f"--to hf: which Hugging Face layout: {', '.join(HF_LAYOUTS)} (flash-linear-attention's "
        f"RWKV7ForCausalLM, or the transformers-native Rwkv7ForCausalLM)."))
    tokenizer: str = field(default="auto", metadata=h(
        f"--to hf: tokenizer files to write: {', '.join(TOKENIZER_CHOICES)} (auto: by the vocabulary size)."))

    def __post_init__(self) -> None:
        if not self.to:
            self.to = "pth" if Path(self.input).is_dir() else "hf"
        if self.to not in LAYOUTS:
            raise OptionError(f"--to: unknown layout {self.to!r}; choose from {', '.join(LAYOUTS)}")
        if self.dtype not in DTYPES:
            raise OptionError(f"--dtype: unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        parse_size(self.max_shard_size, "--max-shard-size")
        if self.layout not in HF_LAYOUTS:
            raise OptionError(f"--layout: unknown layout {self.layout!r}; choose from {', '.join(HF_LAYOUTS)}")
        if self.tokenizer not in TOKENIZER_CHOICES:
            raise OptionError(f"--tokenizer: unknown choice {self.tokenizer!r}; "
                              f"choose from {', '.join(TOKENIZER_CHOICES)}")
        if self.to == "pth":
            check_output(self.output, "OUTPUT", [("INPUT", self.input)])
        else:  # a directory: a trailing separator is fine, and an existing non-empty one is refused when written
            check_not_input(self.output, "OUTPUT", [("INPUT", self.input)])


def convert(opts: ModelConvertOptions) -> int:
    """Run the conversion and say where it went."""
    import torch

    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opts.dtype]
    out = convert_checkpoint(opts.input, opts.output, opts.to, dtype,
                             parse_size(opts.max_shard_size, "--max-shard-size"), opts.layout, opts.tokenizer)
    what = f"hf, {opts.layout} layout" if opts.to == "hf" else opts.to
    print(f"wrote {out} ({what})")
    return 0
