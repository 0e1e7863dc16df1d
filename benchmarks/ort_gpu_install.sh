# Run (bash benchmarks/ort_gpu_install.sh) on the lent H100 from the repository root, after
# `source benchmarks/h100_env.sh`. The onnxruntime-gpu wheel is too big for one carry, so it travels split
# in parts, one git-ignored folder per call (.ortgpu1/ ... .ortgpu5/). Every call that carries a part runs
# this: it copies the parts present into /tmp/ortparts/ (which lives as long as the machine stays warm);
# once all are there it rebuilds the wheel under its exact original name, checks its sha256 and installs it
# into /tmp/site, which h100_env.sh puts first on PYTHONPATH, so it shadows the image's CPU onnxruntime.
# Its dependencies (flatbuffers, numpy, packaging, protobuf) are already in the image: --no-deps.
# No `set -e`: a missing part is a message and exit status 1, never a dead shell.
WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
SHA256=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
NPARTS=5
PARTS=/tmp/ortparts

ort_gpu_ok() {
  PYTHONPATH=/tmp/site python3 -c "import onnxruntime as o, sys; sys.exit(not (o.__version__ == '1.31.1' and \
'CUDAExecutionProvider' in o.get_available_providers()))" 2>/dev/null
}

source benchmarks/carried_parts.sh
gather_parts "$PARTS" .ortgpu*/
if ort_gpu_ok; then
  echo "onnxruntime-gpu 1.31.1 already installed in /tmp/site"
  exit 0
fi
join_parts "$PARTS" onnxruntime_gpu-1.31.1.whl "$NPARTS" "/tmp/$WHEEL" "$SHA256" || exit 1
python3 -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --upgrade --target /tmp/site "/tmp/$WHEEL" \
  2>&1 | grep -v WARNING
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "pip could not install /tmp/$WHEEL (needs CPython 3.12 on x86_64 Linux)"
  exit 1
fi
if ort_gpu_ok; then
  PYTHONPATH=/tmp/site python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
  rm -f "/tmp/$WHEEL"
else
  echo "onnxruntime-gpu installed in /tmp/site but its CUDA EP is not listed"
  exit 1
fi
