# Sourced on the lent GPU machine by the scripts that install a file too big for one carry
# (benchmarks/gpu/ort_gpu_install.sh, benchmarks/gpu/fa4_install.sh). benchmarks/gpu/split_parts.sh cut it
# into parts, one git-ignored folder per call, and put PARTS.sha256 into the first folder: the name, sha256
# and number of parts travel with the parts, so no script here pins a version or a checksum.
# /tmp keeps what earlier calls left while the machine stays warm.

# gather_parts DEST DIR...: copies every file of the carried folders present into DEST (a folder carried
# again replaces what an earlier call left, a damaged part included).
gather_parts() {
  local dest=$1 d
  shift
  mkdir -p "$dest"
  for d in "$@"; do
    [ -d "$d" ] && cp -p "$d"/* "$dest"/ 2>/dev/null
  done
  return 0
}

parts_field() {  # parts_field DEST KEY: KEY's value in DEST/PARTS.sha256
  sed -n "s/^$2=//p" "$1/PARTS.sha256" | head -n 1
}

# join_parts DEST OUTDIR [FIRST]: once DEST holds PARTS.sha256 and every part it lists, each matching its
# sha256, writes them in order to OUTDIR/NAME (the original name: pip reads a wheel's tags from it), checks
# that file's sha256 and sets JOINED to its path. Otherwise it says which folders to carry (again; FIRST names
# the first one, which brings PARTS.sha256), leaves no OUTDIR/NAME behind and returns 1.
join_parts() {
  local dest=$1 name sha n prefix out i part missing="" bad="" parts=()
  JOINED=
  if [ ! -f "$dest/PARTS.sha256" ]; then
    echo "no PARTS.sha256 in $dest yet: carry ${3:-the first folder split_parts.sh made}, which holds it"
    return 1
  fi
  name=$(parts_field "$dest" name) sha=$(parts_field "$dest" sha256)
  n=$(parts_field "$dest" parts) prefix=$(parts_field "$dest" prefix)
  if [ -z "$name" ] || [ ${#sha} -ne 64 ] || ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
    echo "$dest/PARTS.sha256 lacks name=, sha256= or parts=: split the file again"
    return 1
  fi
  mkdir -p "$2"
  out=$2/$name
  rm -f "$out"  # what an earlier, failed call left is never taken for the file
  for ((i = 0; i < n; i++)); do
    part=$(printf '%s.part%02d' "$name" "$i")
    parts+=("$dest/$part")
    if [ ! -f "$dest/$part" ]; then
      missing+=" .$prefix$((i + 1))"
    elif [ "$(sha256sum < "$dest/$part" | cut -c1-64)" != "$(parts_field "$dest" "${part##*.}")" ]; then
      bad+=" .$prefix$((i + 1))"
    fi
  done
  [ -n "$missing" ] && echo "$name: $dest lacks the parts in$missing; carry those folders"
  [ -n "$bad" ] && echo "$name: the parts from$bad do not match PARTS.sha256 (damaged, or from another split);" \
    "carry those folders again"
  [ -z "$missing$bad" ] || return 1
  cat "${parts[@]}" > "$out"
  if [ "$(sha256sum < "$out" | cut -c1-64)" != "$sha" ]; then  # every part was right: a short write, or an edit
    echo "$out, joined from parts that match, does not match the sha256 in PARTS.sha256 (removed it): is $2 full?"
    rm -f "$out"
    return 1
  fi
  JOINED=$out
}
