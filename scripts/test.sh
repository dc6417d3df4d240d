#!/usr/bin/env bash
# The one test command (README, CI): install the test extras, lint, run the fla tests under Triton's
# interpreter in a process of their own, then the suite. Arguments go to the suite's pytest, e.g.
#   scripts/test.sh -m "not slow"      the fast loop
#   scripts/test.sh --no-install -k serve
# --no-install skips the pip and browser steps (for a second run in the same environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
INSTALL=1
if [ "${1:-}" = "--no-install" ]; then INSTALL=0; shift; fi
if [ "$INSTALL" = 1 ]; then
    # The CPU build of torch when none is installed: an unpinned torch would pull a multi-GB CUDA build.
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --quiet torch==2.13.0
    # dev: the test tools; hf-test: rwkv7-hf, the reference for Hugging Face directories; fla-test: fla
    # under Triton's interpreter, the CUDA path checked on CPU; lm-eval-test: the harness against serve;
    # ray: serve --ray on a local Ray instance (tests/test_serve_ray.py)
    "$PY" -m pip install --quiet -e ".[dev,ray,hf-test,fla-test,lm-eval-test]"
    # the headless browser of the playground test (skipped where it cannot be installed)
    scripts/install_browser.sh
fi
"$PY" -m ruff check .
# triton must start with TRITON_INTERPRET=1 set, so these run in their own process (they skip otherwise)
STATETUNE_FLA_TESTS=1 "$PY" -m pytest -x -q tests/test_fla_interpret.py
"$PY" -m pytest -x --durations=15 "$@"
