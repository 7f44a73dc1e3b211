#!/usr/bin/env bash
# The CUDA engine built for the CPU emulation of test/emu_cuda/ (what test/test_model_cuda_emu.py
# builds for its tiny checks), as programs to run by hand on a machine without a GPU:
#
#   DIR/rollout_emu [GGUF]   dev/cuda/rollout_check.cu, with the SmolLM2 part when given the GGUF
#                            (about 33 minutes on two cores)
#   DIR/train_mora           ./train_mora whose --device cuda runs the emulated model and rollout
#                            engine (no NCCL), e.g. for the MORA device check (about 17 minutes):
#                              MORA_DEVICE_NO_NCCL=1 python3 dev/cuda/mora_device_check.py DIR/train_mora DIR/work
#
# Run them with EMU_STREAMS=shuffle to catch missing waits and edges between streams, EMU_BLOCKS=shuffle
# to run each launch's blocks in random orders, TRAIN_MORA_FLASH_TUNE=0 (timings mean nothing here) and
# OMP_NUM_THREADS set to the cores to use.
#
#   bash dev/emu_build.sh DIR
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: bash dev/emu_build.sh DIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
# every kernel header, the model and the rollout engine with their launches rewritten
(cd "$root/test" && python3 - "$out" <<'PY'
import sys
from pathlib import Path
from gpu_emu import rewrite_launches
out, llmc = Path(sys.argv[1]), Path("../llmc")
for f in sorted(llmc.glob("*.cuh")) + [llmc / "cuda_common.h"]:
    (out / f.name).write_text(rewrite_launches(f.read_text(), 0))
(out / "model_cuda_launched.cu").write_text(rewrite_launches((llmc / "model_cuda.cu").read_text(), 1))
(out / "rollout_launched.cu").write_text(rewrite_launches(Path("../rollout.cu").read_text(), 1))
PY
)
cd "$out"
# EMU_SANITIZE=address,undefined builds everything with those sanitizers (test/gpu_emu.py)
# (a value it refuses stops the build: the substitution's failure ends the script under set -e)
flags=$(cd "$root/test" && python3 -c "from gpu_emu import sanitizer_flags; print(*sanitizer_flags())")
read -r -a san <<< "$flags"
cxx=(g++ -std=c++17 -O2 -U_FORTIFY_SOURCE -fno-strict-aliasing -w "${san[@]}")
emu=(-I "$out" -I "$root/test/emu_cuda" -I "$root/test" -I "$root/llmc" -I "$root")
cc=(gcc -O2 -std=gnu11 -fopenmp "${san[@]}" -I "$root/llmc" -I "$root")
# with mpicc, as the Makefile does: train_mora then runs as ranks under mpirun, each on a device
# of its own (EMU_DEVICES=N makes N of them)
mpi=()
if command -v mpicc > /dev/null; then mpi=(-DUSE_MPI); cc[0]=mpicc; fi
echo "emu_build: compiling into $out"
"${cxx[@]}" "${emu[@]}" -c -x c++ "$root/test/model_cuda_emu.cpp" -o model_cuda_emu.o &
"${cxx[@]}" "${emu[@]}" -c -x c++ "$root/test/rollout_emu.cpp" -o rollout_emu.o
wait
"${cxx[@]}" -DEMU_PROGRAM='"rollout_check"' -I "$root/test/emu_cuda" -I "$root/test" -I "$root/llmc" -I "$root" \
    -c -x c++ "$root/dev/cuda/rollout_check.cu" -o rollout_check.o
# the C sources: what rollout_check links (the CPU reference, generator and loaders), and every
# one with -DUSE_CUDA for train_mora
plain=()
for b in model ops_cpu matmul utils generate checkpoint gguf safetensors chat_template unicode_tables; do
    "${cc[@]}" -c "$root/llmc/$b.c" -o "plain_$b.o"
    plain+=("plain_$b.o")
done
"${cc[@]}" -c "$root/tokenizer.c" -o plain_tokenizer.o
plain+=(plain_tokenizer.o)
cuda=()
for src in "$root"/llmc/*.c "$root"/*.c; do
    b=$(basename "$src" .c)
    [ "$b" = train_mora ] && continue
    "${cc[@]}" "${mpi[@]}" -DUSE_CUDA -c "$src" -o "cuda_$b.o"
    cuda+=("cuda_$b.o")
done
g++ -fopenmp "${san[@]}" -o rollout_emu rollout_emu.o rollout_check.o "${plain[@]}" -lcjson -lm
"${cc[@]}" "${mpi[@]}" -DUSE_CUDA -o train_mora "$root/train_mora.c" "${cuda[@]}" model_cuda_emu.o rollout_emu.o -lstdc++ -lcjson -lm -lpthread
echo "emu_build: $out/rollout_emu and $out/train_mora"
