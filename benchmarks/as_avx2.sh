#!/usr/bin/env bash
# Run a command with every engine held to AVX2 on an AVX-512 x86 CPU: an AVX2 CPU's registers and
# instructions at this CPU's clock, caches and memory (not an AVX2 machine). benchmarks/NOTES.md, round 8.
# minivq's int16 screen then takes AVX2's vpmaddwd (kernels/nearest_int16.py, product madd-256). With
# --vnni first, AVX2 plus AVX-VNNI: an Intel client core since Alder Lake (AVX-512 off), whose screen
# takes vpdpwssd on ymm (vnni-256; NOTES round 12).
#
#   bash benchmarks/as_avx2.sh python benchmarks/bench_quantizer.py --threads 1 --out results/...-avx2-on-avx512-....json
#   bash benchmarks/as_avx2.sh --vnni python benchmarks/bench_quantizer.py ...
#
# The benchmarks record these variables in their JSON (machine.isa_env).
set -euo pipefail
vnni=0
if [ "${1:-}" = "--vnni" ]; then
    vnni=1
    shift
fi
if [ "$#" -eq 0 ]; then
    echo "usage: bash benchmarks/as_avx2.sh [--vnni] COMMAND [ARG ...]" >&2
    exit 2
fi
export OPENBLAS_CORETYPE=Haswell        # NumPy's (and faiss's) OpenBLAS: its AVX2 kernels
export MINIVQ_NUMBA_WIDE=0              # minivq's AVX2 tiles
export MINIVQ_NUMBA_AMX=0               # and no AMX screen (an AVX2 CPU has no tiles; the features below
                                        # also leave out AVX-512, so the int16 screen runs on ymm)
export NUMBA_CPU_NAME=haswell           # Numba compiles for Haswell, AVX-512 off
features="+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt,-avx512f,-avx512bw,-avx512dq,-avx512vl,-avx512cd,-avx512vnni,-avx512bf16,-avx512fp16,-avx512vbmi,-avx512vbmi2,-avx512ifma,-avx512bitalg,-avx512vpopcntdq"
export ATEN_CPU_CAPABILITY=avx2         # PyTorch's own kernels
export ONEDNN_MAX_CPU_ISA=AVX2          # its convolutions (oneDNN)
if [ "$vnni" = 1 ]; then
    export NUMBA_CPU_NAME=alderlake     # AVX-VNNI: the VEX-encoded int16 products on ymm
    features="$features,+avxvnni"
    export ONEDNN_MAX_CPU_ISA=AVX2_VNNI
fi
export NUMBA_CPU_FEATURES="$features"
export MKL_ENABLE_INSTRUCTIONS=AVX2     # its GEMMs, where MKL runs them
export FAISS_SIMD_LEVEL=AVX2            # faiss's own loops
exec "$@"
