"""Pretrain the tiny byte-level RWKV-7 that statetune ships, from scratch, on CPU, within a wall-clock budget.

The model is statetune's own ``RWKV7`` module (official x070 parameter names) with ``requires_grad_(True)``;
the initialisation follows the recipe of the official trainer (BlinkDL/RWKV-LM ``RWKV_Tmix_x070``), written
out in ``scripts/pretrain/model.py``. Training: AdamW, linear warmup then cosine decay, fp32, random
contiguous byte windows of the corpus built by ``scripts/build_corpus.py`` with documents joined by the
end-of-text id 0.

The budget (``--minutes``) drives the schedule, so that the cosine ends when the budget does (planned
from the measured speed and revised as it changes); a resumable training state is written every few
minutes and on SIGTERM/SIGINT, and ``--resume`` continues a killed run (``scripts/pretrain/loop.py``).

At the end it writes, into ``--out`` (default ``statetune/assets/tiny-rwkv7/``): ``model.pth`` (a plain
dict of tensors in the official key format, bf16), ``tokenizer.json``, ``loss.png`` and ``MODEL_CARD.md``
with the held-out bits per byte on ``corpus/val.txt``, a comparison of logits with the official ``rwkv``
package (when installed) and a greedy sample.

``--bench 4x256,6x256`` measures training tokens/s of a few sizes and exits (how the size was chosen).

The pieces live in ``scripts/pretrain/`` (see its ``__init__``); this file is the command.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # statetune from this checkout

from pretrain.cli import main  # noqa: E402  (scripts/ is on the path: it holds this file)

if __name__ == "__main__":
    main()
