"""``statetune state info|convert|merge|capture|average``: inspect and move states around the ecosystem."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from statetune.device import resolve_device
from statetune.errors import OptionError, StateFileError
from statetune.fileio import atomic_write
from statetune.model.state import RWKVState
from statetune.runtime import pick_tokenizer, prompt_state
from statetune.tuning.formats import FORMATS, format_for, read_any, write_as
from statetune.tuning.statefile import StateFile, check_fits

log = logging.getLogger("statetune.state")


def _h(text: str, **kw) -> dict:
    return {"help": text, **kw}


def _load_model(path: str | None, device: str = "cpu"):
    if path is None:
        return None
    from statetune.model.checkpoint import load_model

    return load_model(path, device=resolve_device(device))


# -- info ----------------------------------------------------------------------------------------------------
@dataclass
class InfoOptions:
    """Print a state's shapes, per-layer norms and metadata, and whether it fits --model."""

    file: str = field(metadata=_h("State file (.safetensors, .pth dict or list).", positional=True))
    model: str | None = field(default=None, metadata=_h("Check that the state fits this model."))


def info(opts: InfoOptions) -> int:
    sf = read_any(opts.file)
    s = sf.state
    L, _, H, N, _ = s.wkv.shape
    print(f"{opts.file}: {L} layers, {H} heads of {N} (width {H * N}); token-shift states: "
          f"{'yes' if sf.has_shift else 'no'}; {s.wkv.numel() * 4 / 1e6:.2f} MB of WKV state in fp32")
    print("layer  wkv_norm  wkv_absmax  att_shift_norm  ffn_shift_norm")
    for i in range(L):
        print(f"{i:5d}  {s.wkv[i].norm():8.3f}  {s.wkv[i].abs().max():10.3f}  {s.att_shift[i].norm():14.3f}  "
              f"{s.ffn_shift[i].norm():14.3f}")
    for k, v in sorted(sf.metadata.items()):
        print(f"{k}: {v}")
    model = _load_model(opts.model)
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

    input: str = field(metadata=_h("State file to read.", positional=True))
    output: str = field(metadata=_h("File to write.", positional=True))
    to: str = field(default="", metadata=_h(f"Output format: {', '.join(FORMATS)} (default: from the output's "
                                            f"extension: .safetensors → statetune, .pth → pth)."))
    model: str | None = field(default=None, metadata=_h("Check the state against this model (and record its "
                                                         "fingerprint when writing statetune files)."))

    def __post_init__(self) -> None:
        self.to = format_for(self.output, self.to, "OUTPUT")


def convert(opts: ConvertOptions) -> int:
    model = _load_model(opts.model)
    sf = read_any(opts.input, model)
    write_as(sf, opts.output, opts.to, model)
    print(f"wrote {opts.output} ({opts.to})")
    return 0


# -- merge ---------------------------------------------------------------------------------------------------
@dataclass
class MergeOptions:
    """Write a state into a copy of the model checkpoint as blocks.N.att.time_state keys."""

    model: str = field(metadata=_h("Base model checkpoint."))
    state: str = field(metadata=_h("State file to merge."))
    out: str = field(metadata=_h("Merged checkpoint to write (.pth or .safetensors)."))


def merge(opts: MergeOptions) -> int:
    from statetune.model.checkpoint import TIME_STATE, read_state_dict

    model = _load_model(opts.model)
    sf = read_any(opts.state, model)
    sd = {k: v for k, v in read_state_dict(opts.model).items() if not k.endswith(TIME_STATE)}
    dtype = sd["emb.weight"].dtype
    for i in range(sf.state.n_layer):
        sd[f"blocks.{i}{TIME_STATE}"] = sf.state.wkv[i, 0].float().cpu().to(dtype).contiguous()
    if sf.has_shift:
        log.warning("a merged checkpoint holds only the WKV states: the token-shift states are dropped")
    if model.config.version == "rwkv7":
        log.warning("the rwkv package's RWKV-7 class ignores time_state keys in a model file; for RWKV-Runner "
                    "export the state instead: statetune state convert %s STATE.pth --to pth", opts.state)
    if opts.out.endswith(".safetensors"):
        from safetensors.torch import save_file

        atomic_write(opts.out, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp))
    else:
        atomic_write(opts.out, lambda tmp: torch.save(sd, tmp))
    print(f"wrote {opts.out}")
    return 0


# -- capture -------------------------------------------------------------------------------------------------
@dataclass
class CaptureOptions:
    """Save the state a prompt leaves behind, without training (a zero-cost system-prompt state)."""

    model: str = field(metadata=_h("Base model checkpoint."))
    prompt: str = field(metadata=_h("Text to read (\\n escapes are interpreted)."))
    out: str = field(metadata=_h("State file to write: .safetensors (statetune, keeps the token-shift states) "
                                 "or .pth (RWKV-Runner, WKV states only)."))
    tokenizer: str = field(default="auto", metadata=_h("world, bytes, or auto (from the vocabulary size)."))
    device: str = field(default="cpu", metadata=_h("Torch device."))

    def __post_init__(self) -> None:
        format_for(self.out, None, "--out")


def capture(opts: CaptureOptions) -> int:
    model = _load_model(opts.model, opts.device)
    tok = pick_tokenizer(opts.tokenizer, {}, model.config.vocab_size)
    text = opts.prompt.encode().decode("unicode_escape") if "\\" in opts.prompt else opts.prompt
    ids = tok.encode(text)
    state = prompt_state(model, ids)
    sf = StateFile(state, {"tokenizer": tok.name, "captured_prompt": text}, has_shift=True)
    write_as(sf, opts.out, format_for(opts.out, None, "--out"), model)
    print(f"wrote {opts.out} (state after {len(ids)} tokens)")
    return 0


# -- average -------------------------------------------------------------------------------------------------
@dataclass
class AverageOptions:
    """Interpolate states of the same model: sum of weight_i * state_i (task arithmetic)."""

    states: list[str] = field(metadata=_h("State files to combine.", positional=True))
    out: str = field(metadata=_h("State file to write (.safetensors for statetune, .pth for RWKV-Runner)."))
    weights: list[float] | None = field(default=None, metadata=_h("One weight per state (default: equal, "
                                                                  "summing to 1)."))
    model: str | None = field(default=None, metadata=_h("Check every state against this model."))

    def __post_init__(self) -> None:
        if len(self.states) < 1:
            raise OptionError("STATES: give at least one state file")
        if self.weights is not None and len(self.weights) != len(self.states):
            raise OptionError(f"--weights: {len(self.weights)} weights for {len(self.states)} states")
        format_for(self.out, None, "--out")


def average(opts: AverageOptions) -> int:
    model = _load_model(opts.model)
    files = [read_any(p, model) for p in opts.states]
    first = files[0]
    fp = first.metadata.get("model_fingerprint")
    for path, sf in zip(opts.states[1:], files[1:], strict=True):
        if sf.state.wkv.shape != first.state.wkv.shape:
            raise StateFileError(f"{path}: shape {tuple(sf.state.wkv.shape[2:])} x {sf.state.n_layer} layers differs "
                                 f"from {opts.states[0]}")
        other = sf.metadata.get("model_fingerprint")
        if fp is not None and other is not None and other != fp:
            raise StateFileError(f"{path}: trained on a different base model (fingerprint {other}) than "
                                 f"{opts.states[0]} ({fp})")
    weights = opts.weights or [1.0 / len(files)] * len(files)
    mixed = RWKVState(*(sum(w * t for w, t in zip(weights, ts, strict=True))
                        for ts in zip(*(f.state.tensors() for f in files), strict=True)))
    meta = {k: v for k, v in first.metadata.items() if k not in ("format", "statetune_version", "trained")}
    meta["averaged"] = {"states": [Path(p).name for p in opts.states], "weights": weights}
    write_as(StateFile(mixed, meta, any(f.has_shift for f in files)), opts.out, format_for(opts.out, None, "--out"),
             model)
    print(f"wrote {opts.out}")
    return 0
