# The SDXL 2048 plan through ONNX Runtime's CUDA EP on the lent GPU machine, from the repository root, one warm
# machine (onnxruntime-gpu, the engines and the jobs live in /tmp, kept while it stays warm). onnxruntime-gpu
# travels in parts: here, `bash benchmarks/gpu/split_parts.sh WHEEL ortgpu N` (see ort_gpu_install.sh), with N
# such that .whl, one part and the tree fit the 64 MiB of one call. Then, on the GPU machine:
#   bash benchmarks/gpu/ort_sdxl.sh part    (carry .whl and one .ortgpuK; then one more .ortgpuK per call,
#                                             all but one of them)
#   bash benchmarks/gpu/ort_sdxl.sh build   (carry the last .ortgpuK: installs onnxruntime-gpu, starts the builds)
#   bash benchmarks/gpu/ort_sdxl.sh wait    (as often as needed: the two UNets take about 20 minutes)
#   bash benchmarks/gpu/ort_sdxl.sh bench   (waits for the builds, then benchmarks/lab/ort_gpu.py on them)
#   bash benchmarks/gpu/ort_sdxl.sh graphs  (instead of build/wait/bench, carrying the last part: SD1.5 fused
#                                             engines, then its UNet through ORT's CUDA graphs; a few minutes)
# A trailing number is the seconds to wait for the builds. The build is mf-build-engines for the SDXL 2048
# plan (fp16, fused for the CUDA EP) as two processes on disjoint --networks into one folder, each in its own
# session so it outlives the call (detached.sh). The two UNets build one after the other: ORT's fusion of one
# fp32 SDXL UNet peaked near 70 GB of RAM on a 128 GB machine (2026-11-26), and two at once got one killed
# (exit 137).
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
ROOT=/tmp/mf-ort
COMMON="--model sdxl --random-weights --size 2048x2048 --backend onnxruntime --precision fp16 --device cuda --ort-optimize cuda --output $ROOT/sdxl"
case "$1" in
  part) bash benchmarks/gpu/ort_gpu_install.sh ;;
  build)
    bash benchmarks/gpu/ort_gpu_install.sh || exit 1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    # mf-build-engines is not on PATH: pip --target leaves its scripts in /tmp/site/bin.
    BUILD="cd $PWD && PYTHONPATH=$PYTHONPATH python3 -m megafusion.cli.build_engines $COMMON --networks"
    detach ort-unet "$BUILD unet-standard && $BUILD unet-dilated"
    detach ort-text_encoder "$BUILD text_encoder,text_encoder_2,vae_decoder,vae_encoder"
    wait_detached "${2:-540}" ;;
  wait) wait_detached "${2:-560}" ;;
  bench)
    wait_detached "${2:-15}" || exit 1
    cp $JOBS/*.log "$OUT"/ 2>/dev/null
    timeout 580 python3 benchmarks/lab/ort_gpu.py --model sdxl --engine-dir $ROOT --skip-export \
      --skip-sd15-export --conv-algo-search HEURISTIC --cuda-graph --output "$OUT/ort-gpu-sdxl" ;;
  graphs)
    bash benchmarks/gpu/ort_gpu_install.sh || exit 1
    timeout 580 python3 benchmarks/lab/ort_gpu.py --model sd15 --engine-dir $ROOT --ort-optimize cuda \
      --skip-generation --cuda-graph --conv-algo-search HEURISTIC --output "$OUT/ort-gpu-sd15-graphs" ;;
  *) echo "usage: bash benchmarks/gpu/ort_sdxl.sh part|build|wait|bench|graphs [seconds]"; exit 2 ;;
esac
