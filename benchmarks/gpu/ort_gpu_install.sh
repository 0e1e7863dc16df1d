# Run on the lent GPU machine from the repository root, after `source benchmarks/gpu/env.sh`:
#   bash benchmarks/gpu/ort_gpu_install.sh
# Installs onnxruntime-gpu into /tmp/site, which env.sh puts first on PYTHONPATH, so it shadows the image's
# CPU onnxruntime. The wheel is too big for one carry: here, `bash benchmarks/gpu/split_parts.sh WHEEL ortgpu`
# splits it into the git-ignored folders .ortgpu1/, .ortgpu2/, ... (PARTS.sha256 in .ortgpu1/ names the wheel),
# one per call. Every call that carries a part runs this: it copies the parts present into /tmp/ortparts/
# (which lives as long as the machine stays warm); once all are there it rejoins the wheel under its original
# name, checks it and installs it. Its dependencies (flatbuffers, numpy, packaging, protobuf) are already in
# the image: --no-deps.
# No `set -e`: a missing part is a message and exit status 1, never a dead shell.
PARTS=/tmp/ortparts

ort_gpu_ok() {  # what the benchmarks need, whatever the version: ORT's CUDA EP
  PYTHONPATH=/tmp/site python3 -c "import onnxruntime as o, sys; \
sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null
}

ort_gpu_show() {
  PYTHONPATH=/tmp/site python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, 'in', \
o.__file__.rsplit('/', 2)[0], o.get_available_providers())"
}

source benchmarks/gpu/carried_parts.sh
gather_parts "$PARTS" .ortgpu*/
if ort_gpu_ok; then
  echo -n "already importable: "
  ort_gpu_show
  exit 0
fi
join_parts "$PARTS" /tmp .ortgpu1 || exit 1
python3 -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --upgrade --target /tmp/site "$JOINED" \
  2>&1 | grep -v WARNING
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "pip could not install $JOINED (its name's tags say which Python and platform it needs)"
  exit 1
fi
if ort_gpu_ok; then
  ort_gpu_show
  rm -f "$JOINED"
else
  echo "$JOINED installed in /tmp/site, but its onnxruntime does not list CUDAExecutionProvider"
  exit 1
fi
