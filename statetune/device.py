"""The one check that turns a ``--device`` value into a torch device, with an error a person can act on."""

from __future__ import annotations

import torch

from statetune.errors import OptionError


def resolve_device(spec: str | torch.device, flag: str = "--device") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` -> a device that exists on this machine.

    A malformed name, CUDA when torch has no usable GPU, or a GPU index past the last one is an
    :class:`OptionError` naming ``flag``, instead of a failure deep inside the first tensor copy.
    """
    try:
        dev = spec if isinstance(spec, torch.device) else torch.device(str(spec).strip())
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"{flag}: {spec!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise OptionError(f"{flag} {spec}: CUDA is not available here (torch {torch.__version__} is {built}, "
                              f"or no GPU is visible); use --device cpu or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise OptionError(f"{flag} {spec}: this machine has {count} CUDA device(s), numbered 0..{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError(f"{flag} {spec}: Apple's MPS backend is not available on this machine")
    elif dev.type != "cpu":
        raise OptionError(f"{flag}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N or mps")
    return dev
