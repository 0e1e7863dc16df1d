# Issue 6 on the lent H100, from the repository root with .whl carried: `bash benchmarks/h100_libmegafusion.sh build`
# then, on the same warm machine, `... bench`. Engines and the C++ build live in /tmp (kept while the machine
# stays warm); logs and results go to $OUT.
#   build: libmegafusion with CUDA (background) and the SDXL 2048 plan's AOTInductor packages, three
#          mf-build-engines processes at once on disjoint --networks into one folder (each stops at 560 s;
#          what finished is committed, a rerun builds the rest).
#   bench: whatever is still missing, then benchmarks.cpp_vs_python (C++ against the Python paths).
source benchmarks/h100_env.sh
ENG=/tmp/mf-aoti-sdxl
BUILD=/tmp/mfbuild
COMMON="--model sdxl --random-weights --size 2048x2048 --backend aoti --precision fp16 --vae-precision fp16 --device cuda --output $ENG"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)

build_lib() {
  cmake -S . -B $BUILD -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$(command -v python3)" \
    -DCMAKE_CUDA_COMPILER="$NVCC" && cmake --build $BUILD --target mf-generate-cpp -j 6
}

build_engines() {  # $1: seconds each process may take, $2: folder for the logs
  local pids=()
  for nets in unet-standard unet-dilated text_encoder,text_encoder_2,vae_decoder,vae_encoder; do
    timeout "$1" python3 -m megafusion.engine.cli $COMMON --networks $nets > "$2/build-${nets%%,*}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}

case "$1" in
  build)
    nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/gpu.txt"
    (time build_lib) > "$OUT/cmake.log" 2>&1 &
    lib=$!
    (time build_engines 560 "$OUT") 2> "$OUT/build-time.log"
    wait $lib
    ls -la $ENG $BUILD/cpp/mf-generate-cpp >> "$OUT/build-time.log" 2>&1
    du -sh $ENG/* >> "$OUT/build-time.log" 2>&1 ;;
  bench)
    [ -x $BUILD/cpp/mf-generate-cpp ] || build_lib > "$OUT/cmake.log" 2>&1
    mkdir -p /tmp/mflogs
    build_engines 300 /tmp/mflogs  # a no-op when the build step finished everything
    tail -n 3 /tmp/mflogs/*.log > "$OUT/bench.log"
    timeout 570 python3 -m megafusion.benchmarks.cpp_vs_python --model sdxl --engines $ENG --size 2048x2048 \
      --cpp-bin $BUILD/cpp/mf-generate-cpp --output /tmp/cvp --repeats 3 2>&1 | tee -a "$OUT/bench.log"
    cp /tmp/cvp/cpp_vs_python.json /tmp/cvp/cpp_vs_python.md "$OUT"/ ;;
  *) echo "usage: bash benchmarks/h100_libmegafusion.sh build|bench"; exit 2 ;;
esac
