"""The facts-vs-format probe's tasks (``probe_facts_format.py``): invented facts as Q/A, and E2E MRs as JSON."""
