# Issue #19 on the lent GPU machine, from the repository root (one warm machine across calls; carry .whl on the
# first call). The runs go one after another in one detached job, so that they outlive a call:
#   bash benchmarks/gpu/issue19.sh start [S]   SDXL 4096 (pixel relay, latent relay, direct) under --max-memory 32,
#        then SD1.5 2048 (pixel, latent, direct) and SD1.5 4096 (pixel, latent) under 32 GiB; waits S seconds
#   bash benchmarks/gpu/issue19.sh big [S]     SDXL 8192 (latent, pixel) with the VAE tiled and parked
#   bash benchmarks/gpu/issue19.sh wait [S]    more time for what is still running
# Results are packed into $OUT/issue19-<phase>.tar.gz (benchmarks/lab/large_sizes.py writes JSON, markdown and
# 1024-pixel previews per size).
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
RES=/tmp/mf-issue19
mkdir -p $RES
L="python3 benchmarks/lab/large_sizes.py --repeats 2"

pack() {
  cp $JOBS/*.log $RES/ 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader > $RES/gpu.txt
  git rev-parse HEAD > $RES/commit.txt 2>/dev/null
  tar czf "$OUT/issue19-$1.tar.gz" -C $RES .
}

case "$1" in
  start)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    detach large "$L --model sdxl --size 4096x4096 --runs pixel,latent,direct --max-memory 32 --output $RES/sdxl4096 && \
      $L --model sd15 --size 2048x2048 --runs pixel,latent,direct --max-memory 32 --output $RES/sd15-2048 && \
      $L --model sd15 --size 4096x4096 --runs pixel,latent --max-memory 32 --output $RES/sd15-4096"
    wait_detached "${2:-500}"
    pack start ;;
  big)
    detach big "python3 benchmarks/lab/large_sizes.py --repeats 1 --model sdxl --size 8192x8192 --runs latent,pixel \
      --max-memory 64 --output $RES/sdxl8192"
    wait_detached "${2:-500}"
    pack big ;;
  wait)
    wait_detached "${2:-500}"
    pack wait ;;
  *) echo "usage: bash benchmarks/gpu/issue19.sh start|big|wait [SECONDS]"; exit 2 ;;
esac
