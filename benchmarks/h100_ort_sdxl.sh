# Issue 3's SDXL run through ONNX Runtime's CUDA EP on the lent H100, from the repository root, one warm machine:
#   bash benchmarks/h100_ort_sdxl.sh part    (carry .whl and .ortgpu5; then .ortgpu1, 2, 3: one part per call;
#                                             .whl and a 60 MiB part together pass the 64 MiB carry limit)
#   bash benchmarks/h100_ort_sdxl.sh build   (carry .ortgpu4: installs onnxruntime-gpu, starts the builds)
#   bash benchmarks/h100_ort_sdxl.sh wait    (as often as needed: the two UNets take about 20 minutes)
#   bash benchmarks/h100_ort_sdxl.sh bench   (waits for the builds, then benchmarks.ort_gpu on them)
#   bash benchmarks/h100_ort_sdxl.sh graphs  (instead of build/wait/bench, carrying the last part: SD1.5 fused
#                                             engines, then its UNet through ORT's CUDA graphs; a few minutes)
# The build is `mf-build-engines` for the SDXL 2048 plan (fp16, fused for the CUDA EP) as two processes on
# disjoint --networks into one folder, each in its own session so it outlives the call (h100_detached.sh).
# The two UNets build one after the other: ORT's fusion of one fp32 SDXL UNet peaked near 70 GB of RAM on the
# 128 GB machine (2026-11-26), and two at once got one killed (exit 137).
source benchmarks/h100_env.sh
source benchmarks/h100_detached.sh
ROOT=/tmp/mf-ort
COMMON="--model sdxl --random-weights --size 2048x2048 --backend onnxruntime --precision fp16 --device cuda --ort-optimize cuda --output $ROOT/sdxl"
case "$1" in
  part) bash benchmarks/ort_gpu_install.sh ;;
  build)
    bash benchmarks/ort_gpu_install.sh || exit 1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    BUILD="cd $PWD && PYTHONPATH=$PYTHONPATH python3 -m megafusion.engine.cli $COMMON --networks"
    detach ort-unet "$BUILD unet-standard && $BUILD unet-dilated"
    detach ort-text_encoder "$BUILD text_encoder,text_encoder_2,vae_decoder,vae_encoder"
    wait_detached "${2:-540}" ;;
  wait) wait_detached "${2:-560}" ;;
  bench)
    wait_detached "${2:-15}" || exit 1
    cp $JOBS/*.log "$OUT"/ 2>/dev/null
    timeout 580 python3 -m megafusion.benchmarks.ort_gpu --model sdxl --engine-dir $ROOT --skip-export \
      --skip-sd15-export --conv-algo-search HEURISTIC --cuda-graph --output "$OUT/ort-gpu-sdxl" ;;
  graphs)
    bash benchmarks/ort_gpu_install.sh || exit 1
    timeout 580 python3 -m megafusion.benchmarks.ort_gpu --model sd15 --engine-dir $ROOT --ort-optimize cuda \
      --skip-generation --cuda-graph --conv-algo-search HEURISTIC --output "$OUT/ort-gpu-sd15-graphs" ;;
  *) echo "usage: bash benchmarks/h100_ort_sdxl.sh part|build|wait|bench|graphs [seconds]"; exit 2 ;;
esac
