# Issue 3's SDXL run through ONNX Runtime's CUDA EP on the lent H100, from the repository root, one warm machine:
#   bash benchmarks/h100_ort_sdxl.sh part    (carry .whl and .ortgpu1; then .ortgpu2, 3, 4: one part per call)
#   bash benchmarks/h100_ort_sdxl.sh build   (carry .ortgpu5: installs onnxruntime-gpu, starts the builds)
#   bash benchmarks/h100_ort_sdxl.sh bench   (waits for the builds, then benchmarks.ort_gpu on them)
# The build is `mf-build-engines` for the SDXL 2048 plan (fp16, fused for the CUDA EP) as three processes on
# disjoint --networks into one folder, each in its own session so it outlives the call (h100_detached.sh).
source benchmarks/h100_env.sh
source benchmarks/h100_detached.sh
ROOT=/tmp/mf-ort
COMMON="--model sdxl --random-weights --size 2048x2048 --backend onnxruntime --precision fp16 --device cuda --ort-optimize cuda --output $ROOT/sdxl"
case "$1" in
  part) bash benchmarks/ort_gpu_install.sh ;;
  build)
    bash benchmarks/ort_gpu_install.sh || exit 1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    for nets in unet-standard unet-dilated text_encoder,text_encoder_2,vae_decoder,vae_encoder; do
      detach "ort-${nets%%,*}" "cd $PWD && PYTHONPATH=$PYTHONPATH python3 -m megafusion.engine.cli $COMMON --networks $nets"
    done
    wait_detached "${2:-540}" ;;
  bench)
    wait_detached "${2:-400}" || exit 1
    cp $JOBS/*.log "$OUT"/ 2>/dev/null
    timeout 580 python3 -m megafusion.benchmarks.ort_gpu --model sdxl --engine-dir $ROOT --skip-export \
      --skip-sd15-export --conv-algo-search HEURISTIC --output "$OUT/ort-gpu-sdxl" ;;
  *) echo "usage: bash benchmarks/h100_ort_sdxl.sh part|build|bench [seconds]"; exit 2 ;;
esac
