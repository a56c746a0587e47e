#!/usr/bin/env bash
# Compile every kernels/*.cu to PTX for sm_80 (A100) and sm_90 (H100), with and without
# <cuda_fp16.h> (the loader's NVRTC fallback), so a kernel that does not compile fails CI on
# machines without a GPU. Skips (exit 0) when nvcc is not on PATH. Usage: .ci/nvcc-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${NVCC}" ]]; then
  echo "nvcc-check: SKIP (nvcc not on PATH; set NVCC=/path/to/nvcc to run it)"
  exit 0
fi

shopt -s nullglob
sources=(kernels/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "nvcc-check: no kernels/*.cu found" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "${out}"' EXIT
status=0
for src in "${sources[@]}"; do
  for arch in sm_80 sm_90; do
    for define in "" "-DGPUBATCH_NO_FP16_HEADER"; do
      name="$(basename "${src}" .cu)_${arch}${define:+_nofp16}.ptx"
      if "${NVCC}" --ptx -arch="${arch}" ${define} "${src}" -o "${out}/${name}"; then
        echo "nvcc-check: ok   ${src} ${arch} ${define}"
      else
        echo "nvcc-check: FAIL ${src} ${arch} ${define}" >&2
        status=1
      fi
    done
  done
done
echo "nvcc-check: $("${NVCC}" --version | tail -1)"
exit "${status}"
