# Run (bash benchmarks/fa4_install.sh) on the lent H100 from the repository root, after
# `source benchmarks/h100_env.sh`: installs flash-attn-4 (FlashAttention 4, CuTe DSL; the `fa4` UNet attention
# kernel) into /tmp/site. Its 92 MiB CUDA 13 DSL library travels split in two git-ignored folders, one per
# call: .fa4a/ (part00), then .fa4b/ (part01 and the small wheels: flash-attn-4 4.0.0b36, nvidia-cutlass-dsl
# 4.8.1 and its base/core libraries, quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext, einops). Their other
# dependencies (torch, cuda-bindings, protobuf, typing-extensions) are in the image: --no-deps. Copies the parts
# present into /tmp/fa4parts (kept while the machine stays warm); installs once all are there.
LIB=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
SHA256=50191a381d8cc1393373ae0bc879b0aefa9a256c23c22d4fa1c2fe3dfe57bc90
PARTS=/tmp/fa4parts

fa4_ok() {
  python3 -c "import flash_attn.cute" 2>/dev/null  # PYTHONPATH from h100_env.sh names the DSL's folder
}

source benchmarks/carried_parts.sh
gather_parts "$PARTS" .fa4a .fa4b
if fa4_ok; then
  echo "flash-attn-4 already installed in /tmp/site"
  exit 0
fi
if ! ls "$PARTS"/flash_attn_4-*.whl > /dev/null 2>&1; then
  echo "the small wheels are not in $PARTS yet; carry .fa4b"
  exit 1
fi
join_parts "$PARTS" "$LIB" 2 "/tmp/$LIB" "$SHA256" || exit 1
python3 -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "/tmp/$LIB" "$PARTS"/*.whl 2>&1 | grep -v WARNING
if fa4_ok; then
  echo "flash-attn-4 installed in /tmp/site"
  rm -f "/tmp/$LIB"
else
  python3 -c "import flash_attn.cute"  # shows why the import fails
  exit 1
fi
