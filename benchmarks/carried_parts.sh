# Sourced by the install scripts that bring a wheel too big for one carry onto the lent H100 in parts, one
# git-ignored folder per call (benchmarks/ort_gpu_install.sh, benchmarks/fa4_install.sh). /tmp keeps what
# earlier calls left while the machine stays warm.

# gather_parts DEST DIR...: copies every file of the carried folders present into DEST.
gather_parts() {
  local dest=$1 d
  shift
  mkdir -p "$dest"
  for d in "$@"; do
    [ -d "$d" ] && cp -p "$d"/* "$dest"/ 2>/dev/null
  done
  return 0
}

# join_parts DEST PREFIX NPARTS OUTPUT SHA256: once DEST holds all NPARTS files PREFIX.partNN, writes them in
# order to OUTPUT and checks its sha256; otherwise, or on a damaged part (OUTPUT removed), says so and returns 1.
join_parts() {
  local dest=$1 prefix=$2 nparts=$3 output=$4 sha=$5 have
  have=$(ls "$dest" | grep -c "^$prefix.part")
  if [ "$have" -ne "$nparts" ]; then
    echo "have $have of $nparts parts of $prefix in $dest ($(ls "$dest" | tr '\n' ' ')); carry the others first"
    return 1
  fi
  cat "$dest/$prefix".part* > "$output"  # part00, part01, ...: the glob sorts them in order
  if ! echo "$sha  $output" | sha256sum -c --quiet -; then
    echo "reassembled $output does not match its sha256; a part is damaged (removed it)"
    rm -f "$output"
    return 1
  fi
}
