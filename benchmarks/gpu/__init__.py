"""The parts of ``benchmarks/gpu_check.py``: statetune's sections, the 7.2B memory run, serve under load, the
peers' kernels, the part runner and the printed table. ``benchmarks/gpu/README.md`` says how to run it on a
GPU machine without network."""
