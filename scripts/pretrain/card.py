"""``MODEL_CARD.md`` of the tiny model, written from the numbers of the run that made it."""

from __future__ import annotations

from pathlib import Path

from statetune.fileio import atomic_write


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def write_card(out: Path, info: dict) -> None:
    """``MODEL_CARD.md`` from the numbers of this run."""
    a = info["args"]
    src = info["sources"]
    rows = "\n".join(
        f"| {name} | `{s['package']}` {s['version']} | {s['licence']} | {fmt_bytes(s['bytes'])} | {s['documents']:,} |"
        for name, s in src.get("sources", {}).items())
    cmp_ = info["compare"]
    if cmp_.get("ran"):
        cmp_text = (f"The official `rwkv` package ({cmp_['rwkv_version']}, `RWKV_V7_ON=1`, strategy `cpu fp32`) "
                    f"loads `model.pth` unchanged; over {cmp_['tokens']} tokens its logits differ from "
                    f"`statetune.load_model` by at most {cmp_['max_abs_diff']:.2e} (logits up to "
                    f"{cmp_['logit_scale']:.1f}; argmax agreement {cmp_['argmax_agree']:.0%}).")
    else:
        cmp_text = f"Not compared with the official `rwkv` package: {cmp_.get('why')}."
    samples = "\n\n".join(f"Prompt `{p!r}`:\n\n```text\n{p}{s}\n```" for p, s in info["samples"].items())
    sampled = "\n\n".join(f"Prompt `{p!r}`:\n\n```text\n{p}{s}\n```" for p, s in info["sampled"].items())
    cfg = info["config"]
    speed_row = (f"median {info['tokens_per_s']:.0f} tokens/s on {a['threads']} threads ({info['machine']}); "
                 f"the machine was shared, so it ranged {info['tokens_per_s_min']:.0f} to "
                 f"{info['tokens_per_s_max']:.0f}")
    model_row = (f"a plain `torch.save` dict of {info['n_tensors']} tensors with the official RWKV-7 key "
                 f"names, {info['save_dtype']} ({info['file_mb']:.1f} MB)")
    optim_row = (f"AdamW, betas (0.9, 0.99), weight decay {a['weight_decay']} on matrices, `w0` at 2× LR, "
                 f"grad clip {a['grad_clip']}")
    steps_row = (f"{info['steps']:,} / {info['tokens_seen'] / 1e6:.1f}M bytes "
                 f"({info['tokens_seen'] / info['train_bytes']:.2f} epochs)")
    text = f"""# tiny-rwkv7: a small byte-level RWKV-7 for statetune

A {cfg['n_layer']}-layer, {cfg['n_embd']}-wide RWKV-7 ("Goose", x070) language model with
{info['n_params'] / 1e6:.2f}M parameters, pretrained from scratch on {fmt_bytes(info['corpus_bytes'])} of
permissively licensed English text in {info['wall_min']:.0f} minutes on {a['threads']} CPU threads. It ships
inside statetune so that tests, examples and the state-tuning tutorial have a real (if small) language model
without a download. It writes English-looking text, not a useful assistant: treat it as a toy.

## Files

| file | what |
|---|---|
| `model.pth` | the weights, {model_row} |
| `tokenizer.json` | `{{"tokenizer": "bytes"}}`: byte `b` is token `b + 1`, token 0 is end of text |
| `loss.png` | the loss curve |
| `MODEL_CARD.md` | this card |

## Architecture

| | |
|---|---|
| layers × width | {cfg['n_layer']} × {cfg['n_embd']} |
| heads × head size | {cfg['n_head']} × {cfg['head_size']} |
| channel-mix width | {cfg['dim_ffn']} |
| low-rank widths (w, a, v, g) | {cfg['lora']['w']}, {cfg['lora']['a']}, {cfg['lora']['v']}, {cfg['lora']['g']} |
| vocabulary | {cfg['vocab_size']} (bytes + end of text) |
| parameters | {info['n_params']:,} |

**Why a byte tokenizer.** The RWKV World vocabulary has 65,536 tokens: its embedding alone would be
65,536 × {cfg['n_embd']} × 2 bytes = {65536 * cfg['n_embd'] * 2 / 1e6:.1f} MB in bf16 (and as much again for the
output head), over the 20 MB budget of a file shipped in a Python package, before a single layer. With 257
byte tokens the embedding and head together are {2 * cfg['vocab_size'] * cfg['n_embd'] / 1e3:.0f}K parameters,
so a tiny model spends its parameters on layers; it also reads any text, in any language, without unknown
tokens. statetune picks the byte tokenizer from the vocabulary size (257 to 1024 rows).

## Training data

{fmt_bytes(info['corpus_bytes'])} of text ({src['splits']['train']['documents']:,} training and
{src['splits']['val']['documents']:,} held-out documents) built by `scripts/build_corpus.py` from Debian 12
packages whose licences permit redistribution and derived works; each licence was checked in
`/usr/share/doc/<package>/copyright` when the corpus was built:

| source | package | licence | text | documents |
|---|---|---|---|---|
{rows}

Cleaning: whitespace normalised, short and mostly non-letter lines dropped, code listings and navigation
removed from the HTML, repeated boilerplate lines of the HTML help dropped, exact duplicate documents
removed; the documents were shuffled with a fixed seed and 1% held out. Left out on purpose: the
`ascii-art`, `translate-me` and `ethnic` fortune files, and the Python changelog, indexes and licence pages.
No restaurant-domain or E2E data.

## Training

| | |
|---|---|
| objective | next byte, cross-entropy, documents joined with the end-of-text token |
| windows | {a['batch']} random contiguous windows of {a['ctx']} bytes per step |
| optimiser | {optim_row} |
| learning rate | warmup {a['warmup']} steps to {a['lr']}, cosine to {a['lr'] * a['final_lr_frac']:.1e} |
| steps / tokens seen | {steps_row} |
| precision | fp32 (bf16 is slow on this CPU); saved as {info['save_dtype']} |
| speed | {speed_row} |
| wall time | {info['wall_min']:.1f} min |
| initialisation | the official RWKV-7 recipe (see `init_weights` in `scripts/pretrain/model.py`) |

![loss curve](loss.png)

## Evaluation

Held-out bits per byte on `corpus/val.txt` ({fmt_bytes(info['val_bytes'])}, read as 8 streams with the
recurrent state carried through each): **{info['bpb']:.3f}** with the shipped {info['save_dtype']} weights
({info['bpb_fp32']:.3f} with the fp32 training weights). Final training loss (last logged batch mean)
{info['final_train_loss']:.3f} nats; last held-out window loss {info['final_val_loss']:.3f} nats.

{cmp_text}

Greedy continuations (no sampling: a model this small loops):

{samples}

Sampled continuations (temperature 0.8, top-p 0.9, seed 0):

{sampled}

## Limitations

A toy: {info['n_params'] / 1e6:.1f}M parameters that have read {info['tokens_seen'] / 1e6:.1f}M bytes. It spells
English words and short phrases in the styles of its sources (dictionary glosses, quotations, software
documentation), loses the thread within a sentence or two, and repeats itself under greedy decoding. It
knows little beyond that and should be used for tests, demos and experiments with state tuning only.

## How to reproduce

```bash
sudo python scripts/build_corpus.py            # apt-get installs the four packages, writes corpus/
python scripts/pretrain_small.py {info['command_args']}
# killed? the same command with --resume continues from runs/tiny-rwkv7/train_state.pt
```

Sizes were chosen by measurement (`python scripts/pretrain_small.py --bench 4x256,6x256,8x256`) so that
training fits {a['minutes']} minutes on {a['threads']} CPU threads and the file stays under 20 MB. The
schedule adapts to the measured speed, so a rerun on another machine trains for the same time, not the
same number of steps, and gives similar, not identical, weights.

## Licence and attribution

The weights ship with statetune. The training texts are under the licences listed above, all of which permit
redistribution and derived works; their copyright notices are reproduced in statetune's `NOTICE`:
fortune-mod (BSD, © 1991 The Regents of the University of California), WordNet 3.0 (© 2006 Princeton
University), the Python documentation (© Python Software Foundation, PSF License Version 2) and the
LibreOffice help (© LibreOffice contributors, MPL-2.0). The model can reproduce short pieces of these texts.
"""
    atomic_write(out / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
