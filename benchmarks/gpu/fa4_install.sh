# Run on the lent GPU machine from the repository root, after `source benchmarks/gpu/env.sh`:
#   bash benchmarks/gpu/fa4_install.sh
# Installs flash-attn-4 (FlashAttention 4, CuTe DSL; the `fa4` UNet attention kernel) into /tmp/site. Its CUDA
# DSL library wheel (nvidia-cutlass-dsl-libs-cu13, ~92 MiB) is too big for one carry: here,
# `bash benchmarks/gpu/split_parts.sh WHEEL fa4- 2` splits it into the git-ignored .fa4-1/ and .fa4-2/
# (PARTS.sha256 in .fa4-1/ names it); copy the small wheels (flash-attn-4, nvidia-cutlass-dsl and its
# base/core libraries, quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext, einops) into .fa4-2/ beside its
# part. Carry one folder per call and run this each time: it copies what arrived into /tmp/fa4parts (kept
# while the machine stays warm) and installs once all is there. Their other dependencies (torch,
# cuda-bindings, protobuf, typing-extensions) are in the image: --no-deps.
PARTS=/tmp/fa4parts

fa4_ok() {
  python3 -c "import flash_attn.cute" 2>/dev/null  # PYTHONPATH from env.sh names the DSL's folder
}

source benchmarks/gpu/carried_parts.sh
gather_parts "$PARTS" .fa4-*/
if fa4_ok; then
  echo "flash-attn-4 already installed in /tmp/site"
  exit 0
fi
if ! ls "$PARTS"/flash_attn_4-*.whl > /dev/null 2>&1; then
  echo "the small wheels (flash_attn_4-*.whl, ...) are not in $PARTS yet; carry the folder they went into (.fa4-2)"
  exit 1
fi
join_parts "$PARTS" /tmp .fa4-1 || exit 1
python3 -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$JOINED" "$PARTS"/*.whl 2>&1 | grep -v WARNING
if fa4_ok; then
  echo "flash-attn-4 installed in /tmp/site"
  rm -f "$JOINED"
else
  python3 -c "import flash_attn.cute"  # shows why the import fails
  exit 1
fi
