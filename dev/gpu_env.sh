# Sourced by dev/gpu_check.sh and dev/gpu_profile.sh on the GPU machine: the libraries its image
# lacks. cJSON from the Debian packages dev/gpu_prepare.sh put in .gpudeps/ (carried with the
# working tree), NCCL from the pip package nvidia-nccl-cu13 when the toolkit has no nccl.h, and
# the toolkit's libraries on the loader's path. Returns 1 (after a FAIL line) when cJSON is missing.
if [ ! -f /usr/include/cjson/cJSON.h ]; then
    if ls .gpudeps/*.deb > /dev/null 2>&1; then
        for f in .gpudeps/*.deb; do dpkg -x "$f" /tmp/gpudeps; done
        export CPATH=/tmp/gpudeps/usr/include${CPATH:+:$CPATH}
        export LIBRARY_PATH=/tmp/gpudeps/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}
        export LD_LIBRARY_PATH=/tmp/gpudeps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    else
        echo "FAIL setup: cJSON is missing here; run dev/gpu_prepare.sh on the development machine and carry .gpudeps"
        return 1
    fi
fi
cuda_lib=$(dirname "$(command -v nvcc)")/../lib64
[ -d "$cuda_lib" ] && export LD_LIBRARY_PATH=$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nccl_dir=""
if [ ! -f "$(dirname "$(command -v nvcc)")/../include/nccl.h" ] && [ ! -f /usr/include/nccl.h ]; then
    nccl_dir=$(python3 -c "import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])" 2>/dev/null || true)
    if [ -n "$nccl_dir" ]; then
        export CPATH=$nccl_dir/include${CPATH:+:$CPATH}
        export LIBRARY_PATH=$nccl_dir/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
        export LD_LIBRARY_PATH=$nccl_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        # the wheel ships libnccl.so.2 only: -lnccl needs the unversioned name
        if [ ! -e "$nccl_dir/lib/libnccl.so" ]; then
            mkdir -p /tmp/gpudeps/nccl
            ln -sf "$(ls "$nccl_dir"/lib/libnccl.so.* | head -1)" /tmp/gpudeps/nccl/libnccl.so
            export LIBRARY_PATH=/tmp/gpudeps/nccl:$LIBRARY_PATH
        fi
    fi
fi
