"""The state-tuning quality benchmark on E2E (``benchmarks/quality_e2e.py``), split into parts.

``split``: the fixed train / validation / test split by meaning representation and the tokenized files;
``methods``: one function per compared method; ``measure``: what is measured on each tuned model;
``report``: the JSON, the Markdown report and the validation-curve plot.
"""
