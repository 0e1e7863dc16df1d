# libmegafusion on --weights-apart SDXL UNets (issue #15) beside the same plan's UNets with their weights inside, on
# the lent GPU machine, from the repository root, after `bash benchmarks/gpu/libmegafusion.sh build` on the same warm
# machine (SDXL 2048 fp16 packages in /tmp/mf-aoti-sdxl, libmegafusion with CUDA in /tmp/mfbuild):
#   bash benchmarks/gpu/libmegafusion_apart.sh build [S]  a copy of that folder without its UNets, which are built
#        again there with --weights-apart (detached; a later `build` call only waits for it)
#   bash benchmarks/gpu/libmegafusion_apart.sh bench [S]  benchmarks/lab/cpp_vs_python.py --modes cpp on each folder
#        (engine load, generate times, graph counters) with the GPU's memory sampled meanwhile, and the two C++
#        images compared; results in $OUT/apart-bench.tar.gz
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
ENG=/tmp/mf-aoti-sdxl
APART=/tmp/mf-aoti-sdxl-apart
BUILD=/tmp/mfbuild
RES=/tmp/mf-apart
mkdir -p $RES

# The copy's manifest without the UNets that hold their weights (tests/cpp/test_libmegafusion_apart.py
# drop_inside_unets; the test module imports pytest, which this machine may lack). Their folders are not copied.
cat > $RES/drop.py <<'PY'
import json, shutil, sys
from pathlib import Path
d = Path(sys.argv[1])
m = json.loads((d / "manifest.json").read_text())
inside = [e for e in m["entries"] if e["key"]["network"] == "unet" and "constants" not in e["key"]]
m["entries"] = [e for e in m["entries"] if e not in inside]
(d / "manifest.json").write_text(json.dumps(m, indent=1))
for e in inside:
    shutil.rmtree(d / Path(e["files"][0]["path"]).parent, ignore_errors=True)
print(len(inside), "UNets with their weights inside dropped")
PY

bench_one() {  # bench_one NAME FOLDER: C++ on FOLDER, GPU memory sampled every 100 ms
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > $RES/$1-memory.csv &
  local smi=$!
  python3 benchmarks/lab/cpp_vs_python.py --model sdxl --engines $2 --size 2048x2048 --cpp-bin $BUILD/cpp/mf-generate-cpp \
    --output $RES/$1 --repeats 3 --modes cpp
  kill $smi
  echo "$1: peak GPU memory $(sort -n $RES/$1-memory.csv | tail -n 1) MiB"
}

case "$1" in
  build)
    [ -d $ENG ] && [ -x $BUILD/cpp/mf-generate-cpp ] || { echo "run bash benchmarks/gpu/libmegafusion.sh build first"; exit 1; }
    # Everything but the UNet folders copied (disk: the apart entries keep 4.9 GB of weights each).
    if [ ! -e $JOBS/apart-unets.started ]; then
      rm -rf $APART && mkdir -p $APART && cp $ENG/*.json $APART/
      for d in $ENG/*/; do case $(basename $d) in unet-*) ;; *) cp -r $d $APART/ ;; esac; done
      python3 $RES/drop.py $APART
    fi
    detach apart-unets "cd $PWD && python3 -m megafusion.cli.build_engines --model sdxl --random-weights \
      --size 2048x2048 --backend aoti --precision fp16 --device cuda --networks unet --weights-apart --output $APART"
    wait_detached "${2:-540}"
    du -sh $ENG $APART ;;
  bench)
    wait_detached "${2:-300}" || exit 1
    bench_one inside $ENG
    bench_one apart $APART
    python3 -c "
import numpy as np; from PIL import Image
a, b = (np.asarray(Image.open('$RES/' + n + '/cpp.png').convert('RGB')).astype(int) for n in ('apart', 'inside'))
print('C++ apart against inside: max', np.abs(a - b).max(), 'mean', np.abs(a - b).mean())" | tee $RES/compare.txt
    pack_jobs $RES "$OUT/apart-bench.tar.gz" ;;
  *) echo "usage: bash benchmarks/gpu/libmegafusion_apart.sh build|bench [seconds]"; exit 2 ;;
esac
