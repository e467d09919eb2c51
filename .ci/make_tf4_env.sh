#!/usr/bin/env bash
# Build a virtual environment that sees the main environment's packages (torch, safetensors, ...)
# but has transformers 4.57 and the huggingface-hub / tokenizers versions it needs shadowing them.
# Usage: bash .ci/make_tf4_env.sh DIR
set -euo pipefail
dir="${1:-.venv-tf4}"
if [ ! -x "$dir/bin/python" ]; then
    python3 -m venv --system-site-packages "$dir"
fi
"$dir/bin/python" -m pip install -q "transformers==4.57.*" "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<0.23"
"$dir/bin/python" -c "import transformers; assert transformers.__version__.startswith('4.'), transformers.__version__"
