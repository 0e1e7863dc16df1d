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
