# libmegafusion (the C API: C++, no Python) beside the Python runtime on the lent GPU machine, from the
# repository root, one warm machine (engines, the C++ build and the jobs live in /tmp, kept while it stays warm):
#   bash benchmarks/gpu/libmegafusion.sh build [S]  (carry .whl) libmegafusion with CUDA, and the SDXL 2048
#        plan's AOTInductor packages as three mf-build-engines processes on disjoint --networks into one folder
#   bash benchmarks/gpu/libmegafusion.sh bench [S]  benchmarks/lab/cpp_vs_python.py on them: each package
#        against its torch module, then C++, Python on the same packages (plain and CUDA-graphed), Python
#        eager, and the compiled fast path, one process (MODES=a,b,... picks the modes)
#   bash benchmarks/gpu/libmegafusion.sh wait [S]   more time for a bench that outlasted its call
#   bash benchmarks/gpu/libmegafusion.sh graphs [S] one call: starts the engine builds (as `build`) unless done,
#        builds libmegafusion with CUDA, then C++ CUDA-graphed, C++ --no-graphs and Python graphed on the same
#        packages (MODES=cpp,cpp-no-graphs,python-aoti-graphs): times, capture/replay counters, image differences
#        against the graphed C++ image. If the SDXL package builds outlast the call, call `graphs` again (the
#        builds go on and nothing starts twice); `wait` collects a benchmark that outlasted its call.
# S: seconds to wait for the detached jobs. Builds and the benchmark run in their own sessions (detached.sh),
# so a call's limit never kills them; what they write is copied to $OUT.
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
ENG=/tmp/mf-aoti-sdxl
BUILD=/tmp/mfbuild
COMMON="--model sdxl --random-weights --size 2048x2048 --backend aoti --precision fp16 --vae-precision fp16 --device cuda --output $ENG"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)

build_lib() {
  cmake -S "${LIBSRC:-.}" -B $BUILD -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$(command -v python3)" \
    -DCMAKE_CUDA_COMPILER="$NVCC" && cmake --build $BUILD --target mf-generate-cpp -j 6
}

collect() {
  wait_detached "$1"
  cp /tmp/cvp/cpp_vs_python.json /tmp/cvp/cpp_vs_python.md $JOBS/cvp*.log "$OUT"/ 2>/dev/null
}

start_engine_builds() {
  # mf-build-engines is not on PATH: pip --target leaves its scripts in /tmp/site/bin.
  for nets in unet-standard unet-dilated text_encoder,text_encoder_2,vae_decoder,vae_encoder; do
    detach "aoti-${nets%%,*}" "cd $PWD && python3 -m megafusion.cli.build_engines $COMMON --networks $nets"
  done
}

case "$1" in
  graphs)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    start_engine_builds
    [ -x $BUILD/cpp/mf-generate-cpp ] || (time build_lib) > "$OUT/cmake.log" 2>&1
    tail -n 3 "$OUT/cmake.log" 2>/dev/null
    # S (default 560) bounds the whole call, lib build included: each wait gets what is left of it.
    wait_detached $(( ${2:-560} - SECONDS - 60 )) || exit 1
    MODES=${MODES:-cpp,cpp-no-graphs,python-aoti-graphs}
    detach cvp-graphs "cd $PWD && python3 benchmarks/lab/cpp_vs_python.py --model sdxl --engines $ENG --size 2048x2048 \
      --cpp-bin $BUILD/cpp/mf-generate-cpp --output /tmp/cvp --repeats 3 --modes $MODES"
    collect $(( ${2:-560} - SECONDS )) ;;
  build)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    start_engine_builds
    (time build_lib) > "$OUT/cmake.log" 2>&1
    tail -n 3 "$OUT/cmake.log"
    wait_detached "${2:-540}"
    cp $JOBS/aoti-*.log "$OUT"/ ;;
  bench)
    [ -x $BUILD/cpp/mf-generate-cpp ] || build_lib > "$OUT/cmake.log" 2>&1
    wait_detached "${2:-300}" || exit 1
    detach cvp "cd $PWD && python3 benchmarks/lab/cpp_vs_python.py --model sdxl --engines $ENG --size 2048x2048 \
      --cpp-bin $BUILD/cpp/mf-generate-cpp --output /tmp/cvp --repeats 3 ${MODES:+--modes $MODES}"
    collect 560 ;;
  wait) collect "${2:-560}" ;;
  *) echo "usage: bash benchmarks/gpu/libmegafusion.sh build|bench|wait [seconds]"; exit 2 ;;
esac
