#!/usr/bin/env bash
# Run on the development machine before a GPU run: the GPU machine has the CUDA toolkit but not
# every library the C side builds against, and it reaches no package registry. This fetches the
# Debian packages it lacks (cJSON) into .gpudeps/, which git ignores and the device tool carries;
# dev/gpu_check.sh unpacks them there.
#
#   bash dev/gpu_prepare.sh
#   then on the GPU machine, carrying .gpudeps:   bash dev/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpudeps
cd .gpudeps
rm -f ./*.deb
apt-get download libcjson1 libcjson-dev
ls -la
