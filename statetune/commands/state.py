"""``statetune state info|convert|merge|capture|average``: inspect and move states around the ecosystem
(the work is in :mod:`statetune.tuning.tools` and :mod:`statetune.tuning.formats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from statetune.errors import OptionError, StateFileError
from statetune.options import h
from statetune.outpaths import check_output
from statetune.runtime import DEVICE_HELP, ModelOptions
from statetune.tuning.formats import FORMATS, format_for, read_any, write_as

__all__ = ["AverageOptions", "CaptureOptions", "ConvertOptions", "InfoOptions", "MergeOptions", "average",
           "capture", "convert", "info", "merge"]


def _load_model(path: str | None, device: str):
    """The model a state is checked against (None without ``--model``)."""
    if path is None:
        return None
    from statetune.device import resolve_device
    from statetune.model.checkpoint import load_model

    return load_model(path, device=resolve_device(device))


# -- info ----------------------------------------------------------------------------------------------------
@dataclass
class InfoOptions:
    """Print a state's shapes, per-layer norms and metadata, and whether it fits --model."""

    file: str = field(metadata=h("State file (.safetensors, .pth dict or list).", positional=True))
    model: str | None = field(default=None, metadata=h("Check that the state fits this model."))
    device: str = field(default="cpu", metadata=h(DEVICE_HELP))


def info(opts: InfoOptions) -> int:
    from statetune.tuning.statefile import check_fits
    from statetune.tuning.tools import describe

    sf = read_any(opts.file)
    print(describe(sf, opts.file))
    model = _load_model(opts.model, opts.device)
    if model is not None:
        try:
            check_fits(sf, model, opts.file)
            print(f"fits {opts.model}: yes")
        except StateFileError as e:
            print(f"fits {opts.model}: no: {e}")
            return 1
    return 0


# -- convert -------------------------------------------------------------------------------------------------
@dataclass
class ConvertOptions:
    """Convert a state between statetune's file and the ecosystem's formats (see docs/states.md)."""

    input: str = field(metadata=h("State file to read.", positional=True))
    output: str = field(metadata=h("File to write.", positional=True))
    to: str = field(default="", metadata=h(f"Output format: {', '.join(FORMATS)} (default: from the output's "
                                           f"extension: .safetensors → statetune, .pth → pth)."))
    model: str | None = field(default=None, metadata=h("Check the state against this model (and record its "
                                                        "fingerprint when writing statetune files)."))
    device: str = field(default="cpu", metadata=h(DEVICE_HELP))

    def __post_init__(self) -> None:
        self.to = format_for(self.output, self.to, "OUTPUT")
        check_output(self.output, "OUTPUT", [("INPUT", self.input), ("--model", self.model)])


def convert(opts: ConvertOptions) -> int:
    model = _load_model(opts.model, opts.device)
    write_as(read_any(opts.input, model), opts.output, opts.to, model)
    print(f"wrote {opts.output} ({opts.to})")
    return 0


# -- merge ---------------------------------------------------------------------------------------------------
@dataclass
class MergeOptions:
    """Write a state into a copy of the model checkpoint as blocks.N.att.time_state keys."""

    model: str = field(metadata=h("Base model checkpoint."))
    state: str = field(metadata=h("State file to merge."))
    out: str = field(metadata=h("Merged checkpoint to write (.pth or .safetensors)."))
    device: str = field(default="cpu", metadata=h(DEVICE_HELP))

    def __post_init__(self) -> None:
        check_output(self.out, "--out", [("--model", self.model), ("--state", self.state)])


def merge(opts: MergeOptions) -> int:
    from statetune.tuning.tools import merge_into_checkpoint

    model = _load_model(opts.model, opts.device)
    merge_into_checkpoint(model, opts.model, read_any(opts.state, model), opts.out, opts.state)
    print(f"wrote {opts.out}")
    return 0


# -- capture -------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CaptureOptions(ModelOptions):
    """Save the state a prompt leaves behind, without training (a zero-cost system-prompt state)."""

    prompt: str = field(metadata=h("Text to read (\\n escapes are interpreted)."))
    out: str = field(metadata=h("State file to write: .safetensors (statetune, keeps the token-shift states) "
                                "or .pth (RWKV-Runner, WKV states only)."))

    def __post_init__(self) -> None:
        self.check_model_options()
        format_for(self.out, None, "--out")
        check_output(self.out, "--out", [("--model", self.model)])


def capture(opts: CaptureOptions) -> int:
    from statetune.runtime import pick_tokenizer, prompt_state
    from statetune.tuning.statefile import StateFile

    model = opts.load_model()
    tok = pick_tokenizer(opts.tokenizer, {}, model.config.vocab_size)
    text = opts.prompt.encode().decode("unicode_escape") if "\\" in opts.prompt else opts.prompt
    ids = tok.encode(text)
    sf = StateFile(prompt_state(model, ids), {"tokenizer": tok.name, "captured_prompt": text}, has_shift=True)
    write_as(sf, opts.out, format_for(opts.out, None, "--out"), model)
    print(f"wrote {opts.out} (state after {len(ids)} tokens)")
    return 0


# -- average -------------------------------------------------------------------------------------------------
@dataclass
class AverageOptions:
    """Interpolate states of the same model: sum of weight_i * state_i (task arithmetic)."""

    states: list[str] = field(metadata=h("State files to combine.", positional=True))
    out: str = field(metadata=h("State file to write (.safetensors for statetune, .pth for RWKV-Runner)."))
    weights: list[float] | None = field(default=None, metadata=h("One weight per state (default: equal, "
                                                                 "summing to 1)."))
    model: str | None = field(default=None, metadata=h("Check every state against this model."))
    device: str = field(default="cpu", metadata=h(DEVICE_HELP))

    def __post_init__(self) -> None:
        if len(self.states) < 1:
            raise OptionError("STATES: give at least one state file")
        if self.weights is not None and len(self.weights) != len(self.states):
            raise OptionError(f"--weights: {len(self.weights)} weights for {len(self.states)} states")
        format_for(self.out, None, "--out")
        check_output(self.out, "--out", [*(("STATES", s) for s in self.states), ("--model", self.model)])


def average(opts: AverageOptions) -> int:
    from statetune.tuning.tools import average_states

    model = _load_model(opts.model, opts.device)
    mixed = average_states([read_any(p, model) for p in opts.states], opts.states, opts.weights)
    write_as(mixed, opts.out, format_for(opts.out, None, "--out"), model)
    print(f"wrote {opts.out}")
    return 0
