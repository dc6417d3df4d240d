#!/usr/bin/env bash
# Gather, on a machine WITH network, what benchmarks/gpu_check.py needs on a GPU machine WITHOUT it, into
# benchmarks/gpu/vendor/ (git-ignored; carried with the run):
#   wheels/      flash-linear-attention + fla-core, and statetune's own dependencies the GPU image lacks
#   FlashRWKV2/  the StateTune recurrent op's sources, at a pinned commit
#   RWKV-PEFT/   the RWKV-7 state-tuning CUDA kernel's sources, at a pinned commit
# Usage: bash benchmarks/gpu/prepare.sh   (FLASHRWKV2_GIT / RWKV_PEFT_GIT may name local clones)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENDOR=benchmarks/gpu/vendor
PYTHON=${PYTHON:-python3}
FLASHRWKV2_GIT=${FLASHRWKV2_GIT:-https://github.com/rwkv-rs/FlashRWKV2}
FLASHRWKV2_COMMIT=3a8307ddcc66dfbeb95676eba2159f5466ec1594
RWKV_PEFT_GIT=${RWKV_PEFT_GIT:-https://github.com/Joluck/RWKV-PEFT}
RWKV_PEFT_COMMIT=5704c39f8ab1d2ac63936ab392aadb6ba526e1a5

rm -rf "$VENDOR" && mkdir -p "$VENDOR/wheels"

# The GPU image has Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers, einops, numpy,
# safetensors, tqdm, httpx/anyio/h11/click, prometheus-client; these are what it lacks (pure-Python wheels but
# two, pydantic-core and pyrwkv-tokenizer, built for CPython 3.12 on manylinux x86_64).
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$VENDOR/wheels" \
  flash-linear-attention==0.6.0 fla-core==0.6.0 \
  pyrwkv-tokenizer==0.9.1 tensorboardX==2.6.5 \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  opentelemetry-api==1.45.2

# Only the files the check builds: the peers' repositories stay outside this one.
fetch() {  # fetch URL COMMIT DEST PATH...
  local url=$1 commit=$2 dest=$3 tmp
  shift 3
  tmp=$(mktemp -d)
  git clone --quiet --no-checkout "$url" "$tmp/repo"
  git -C "$tmp/repo" checkout --quiet "$commit" -- "$@"
  mkdir -p "$dest"
  (cd "$tmp/repo" && tar cf - "$@") | tar xf - -C "$dest"
  git -C "$tmp/repo" show "$commit:LICENSE" > "$dest/LICENSE"
  echo "$url $commit" > "$dest/SOURCE"
  rm -rf "$tmp"
}
fetch "$FLASHRWKV2_GIT" "$FLASHRWKV2_COMMIT" "$VENDOR/FlashRWKV2" \
  csrc/sm90/tmix/wkv7/statetune_recurrent_fp32io16_forward.cu \
  csrc/sm90/tmix/wkv7/statetune_recurrent_fp32io16_forward.cpp \
  csrc/sm90/tmix/wkv7/statetune_recurrent_fp32io16_backward.cu \
  csrc/sm90/tmix/wkv7/statetune_recurrent_fp32io16_backward.cpp \
  csrc/sm120/tmix/wkv7/recurrent_decay.cuh
fetch "$RWKV_PEFT_GIT" "$RWKV_PEFT_COMMIT" "$VENDOR/RWKV-PEFT" \
  cuda/rwkv7_state_clampw.cu cuda/rwkv7_state_clampw.cpp

ls -l "$VENDOR/wheels"
du -sh "$VENDOR" "$VENDOR"/*
