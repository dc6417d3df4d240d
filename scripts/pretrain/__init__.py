"""The pieces of ``scripts/pretrain_small.py``, which pretrains statetune's tiny byte-level RWKV-7.

- :mod:`.model`: the RWKV-7 config of a size and the official trainer's initialisation;
- :mod:`.data`: the byte corpus, random training windows, the training loss and held-out measures;
- :mod:`.decode`: greedy and sampled continuations through statetune's engine;
- :mod:`.loop`: the budget-driven training loop (resumable);
- :mod:`.finish`: the shipped files (weights, tokenizer, loss curve) and the comparison with ``rwkv``;
- :mod:`.card`: ``MODEL_CARD.md``.

Everything generic comes from statetune itself: the model, atomic writes (``statetune.fileio``), the
learning-rate schedule (``statetune.train.schedule``), the metrics log (``statetune.train.metrics``), the
decoder (``statetune.infer.engine``) and the loss plot (``statetune.evaluate.plot``).
"""
