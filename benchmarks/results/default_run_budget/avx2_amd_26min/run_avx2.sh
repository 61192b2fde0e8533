#!/usr/bin/env bash
# The default `nestling run` from a fresh clone with every AVX-512 path turned off: llama.cpp built for AVX2
# (GGML_NATIVE=OFF, AVX512 off) and torch held to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA).
set -u
cd /work/avx2 && rm -rf repo && git clone -q /work/main repo && cd repo
git rev-parse --short HEAD > ../commit.txt
s0=$(date +%s); bash scripts/setup.sh > ../setup.log 2>&1; echo "setup $(( $(date +%s) - s0 )) s rc $?" > ../setup.txt
export PYTHONPATH=/work/avx2/lib ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
python3 - > ../isa.txt 2>&1 <<'PY'
import llama_cpp, torch
print("llama_cpp", llama_cpp.__file__)
print("llama.cpp system info:", llama_cpp.llama_print_system_info().decode())
print("torch cpu capability:", torch.backends.cpu.get_cpu_capability())
PY
rm -rf /work/runs/avx2
date +%s > ../start.txt
/usr/bin/time -v nestling run --out /work/runs/avx2 > ../run.log 2> ../run.err
echo $? > ../rc.txt
date +%s > ../end.txt
