# Helpers for long builds on the lent GPU machine (sourced by benchmarks/gpu/libmegafusion.sh and ort_sdxl.sh):
# a build started with `detach NAME CMD...` runs in its own session, so it outlives the device call that
# started it (while the machine stays warm); `wait_detached SECONDS` waits for every started build to end, or
# for the deadline. Logs and exit codes go to /tmp/mfjobs/NAME.log and NAME.rc.
JOBS=/tmp/mfjobs
mkdir -p $JOBS

detach() {
  local name=$1; shift
  [ -e "$JOBS/$name.started" ] && { echo "$name: already started"; return 0; }
  touch "$JOBS/$name.started"
  setsid bash -c "( $* ) > $JOBS/$name.log 2>&1; echo \$? > $JOBS/$name.rc" < /dev/null > /dev/null 2>&1 &
  echo "$name: started"
}

wait_detached() {  # $1: seconds at most; returns 0 when all ended with status 0
  local deadline=$((SECONDS + $1)) s
  while [ $SECONDS -lt $deadline ]; do
    local pending=0
    for s in $JOBS/*.started; do [ -e "$s" ] && [ ! -e "${s%.started}.rc" ] && pending=1; done
    [ $pending -eq 0 ] && break
    sleep 5
  done
  local bad=0
  for s in $JOBS/*.started; do
    [ -e "$s" ] || continue
    local n=${s%.started}
    if [ -e "$n.rc" ]; then echo "$(basename $n): exit $(cat $n.rc)"; [ "$(cat $n.rc)" = 0 ] || bad=1
    else echo "$(basename $n): still running"; bad=1; fi
    tail -n 2 "$n.log"
  done
  return $bad
}

pack_jobs() {  # pack_jobs RES TARBALL: the jobs' logs, the GPU and the commit into RES, then RES into TARBALL
  # (previews stay behind: images made a tarball too big to come back)
  cp $JOBS/*.log "$1"/ 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader > "$1/gpu.txt"
  echo "${MEGAFUSION_COMMIT:-unknown}" > "$1/commit.txt"
  tar czf "$2" --exclude='*.png' -C "$1" .
}
