#!/usr/bin/env bash
# Compares the SASS (cuobjdump -sass) of the default CUDA forward and backward kernels between two commits,
# with register names and instruction encodings normalised away, so a refactor can be checked for what it
# changed in the machine code without a GPU.
#
#   bash benchmarks/compare_sass.sh OLD NEW                 # e.g. 0698097 HEAD, at sm_90a
#   ARCH=80 bash benchmarks/compare_sass.sh OLD NEW         # another architecture
#   FILES="segment_attn_fwd_bf16_hdim128.cu" bash benchmarks/compare_sass.sh OLD NEW   # fewer files
#
# The default kernels are the FA2-class forward and the backward with its big dK/dV tiles
# (csrc/cuda/segment_attn_{fwd,bwd}_<dtype>_hdim<d>.cu). Needs nvcc and cuobjdump (CUDA toolkit, or
# `pip install nvidia-cuda-cuobjdump` and CUOBJDUMP=<its bin>/cuobjdump). Prints, per file, "same" or the
# number of differing lines and a unified diff of the normalised SASS (first 60 lines); exits 1 when a file
# differs. Everything is built in a temporary folder from `git archive` of each commit: the tree is untouched.
set -euo pipefail

old=${1:?usage: compare_sass.sh OLD_COMMIT NEW_COMMIT}
new=${2:?usage: compare_sass.sh OLD_COMMIT NEW_COMMIT}
arch=${ARCH:-90a}
nvcc=${NVCC:-nvcc}
cuobjdump=${CUOBJDUMP:-cuobjdump}
root=$(git rev-parse --show-toplevel)
files=${FILES:-$(cd "$root/csrc/cuda" && ls segment_attn_fwd_*_hdim*.cu segment_attn_bwd_*_hdim*.cu | grep -v _small_)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Register numbers (R12, UR4, P1, UP0, B2) and the /* 0x... */ encodings change with any register
# allocation; the instruction stream, operands' kinds, immediates and control flow are what is compared.
normalise() {
  sed -E -e 's#/\* *0x[0-9a-f]+ *\*/##g' -e 's#/\*[0-9a-f]{4}\*/##g' \
         -e 's/\bU?R[0-9]+\b/R/g' -e 's/\bU?P[0-9]\b/P/g' -e 's/\bB[0-9]+\b/B/g' -e 's/[[:space:]]+/ /g' \
    | grep -v -E '^ ?$'
}

for rev in "$old" "$new"; do
  mkdir -p "$work/$rev"
  git -C "$root" archive "$rev" csrc | tar -x -C "$work/$rev"
done

status=0
for f in $files; do
  for rev in "$old" "$new"; do
    src="$work/$rev/csrc/cuda/$f"
    [ -f "$src" ] || { echo "$f: missing at $rev"; status=1; continue 2; }
    "$nvcc" -cubin -std=c++17 -O3 --expt-relaxed-constexpr -I"$work/$rev/csrc" \
      -gencode "arch=compute_${arch},code=sm_${arch}" "$src" -o "$work/$rev/$f.cubin"
    "$cuobjdump" -sass "$work/$rev/$f.cubin" | normalise >"$work/$rev/$f.sass"
  done
  if cmp -s "$work/$old/$f.sass" "$work/$new/$f.sass"; then
    echo "$f: same"
  else
    changed=$(diff "$work/$old/$f.sass" "$work/$new/$f.sass" | grep -c '^[<>]' || true)
    echo "$f: $changed differing lines"
    diff -u "$work/$old/$f.sass" "$work/$new/$f.sass" | head -60 || true
    status=1
  fi
done
exit $status
