# Run HERE (the machine that calls the lent GPU machine, not on it), from the repository root:
#   bash benchmarks/gpu/split_parts.sh FILE PREFIX [N]
# One call to the GPU machine carries at most 64 MiB, the repository's ~5 MiB included, so a bigger FILE (a
# wheel) travels in N parts of at most 60 MiB (by default as few as fit; more leave room for .whl or the tree
# on the same call), one per call: part k (FILE's name + .partNN, from 00) goes into the folder .PREFIX<k+1>.
# .PREFIX1 also gets PARTS.sha256 (FILE's name and sha256, N, each part's sha256), so join_parts
# (carried_parts.sh) on the GPU machine needs no name or checksum written into a script.
# The folders must be git-ignored: otherwise they would travel with every call and could end up committed.
set -euo pipefail
MAX=$((60 * 1024 * 1024))
if [ $# -lt 2 ] || [ ! -s "$1" ] || ! [[ $2 =~ ^[A-Za-z0-9_-]+$ ]]; then  # PREFIX: plain, for carry and .gitignore
  echo "usage: bash benchmarks/gpu/split_parts.sh FILE PREFIX [N]  (a non-empty FILE; makes .PREFIX1 ... .PREFIXN)"
  exit 2
fi
file=$(realpath "$1") prefix=$2 name=$(basename "$1")
size=$(stat -c %s "$file")
least=$(( (size + MAX - 1) / MAX ))
n=${3:-$least}
# split -n K/N gives every part size/N bytes and the last also the remainder, so the last is the largest.
if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt "$least" ] || [ "$n" -gt 99 ]; then
  echo "N must be a number from $least (parts of at most 60 MiB) to 99, not '$n'"
  exit 2
fi
# The folders sit at the root, where the GPU scripts look for them (outside git, e.g. a scratch test: here).
git rev-parse --is-inside-work-tree > /dev/null 2>&1 && cd "$(git rev-parse --show-toplevel)"
shopt -s nullglob
old=(".$prefix"[0-9]*)
if [ ${#old[@]} -gt 0 ]; then  # stale parts from an earlier split would be carried and gathered with the new ones
  echo "${old[*]} left from an earlier split: remove them first (rm -r ${old[*]})"
  exit 1
fi
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  for ((k = 1; k <= n; k++)); do
    if ! git check-ignore -q ".$prefix$k/"; then
      echo ".$prefix$k/ would not be git-ignored: add the line '/.$prefix*/' to .gitignore or .git/info/exclude"
      exit 1
    fi
  done
fi

list=".${prefix}1/PARTS.sha256"
mkdir ".${prefix}1"
{
  echo "# $name in $n parts, .${prefix}1/ ... .$prefix$n/: written by benchmarks/gpu/split_parts.sh,"
  echo "# read by join_parts (benchmarks/gpu/carried_parts.sh) on the GPU machine."
  echo "name=$name"
  echo "sha256=$(sha256sum < "$file" | cut -c1-64)"
  echo "parts=$n"
  echo "prefix=$prefix"
} > "$list"
for ((k = 1; k <= n; k++)); do
  part=$(printf '%s.part%02d' "$name" $((k - 1)))
  mkdir -p ".$prefix$k"
  split -n "$k/$n" "$file" > ".$prefix$k/$part"
  echo "part$(printf %02d $((k - 1)))=$(sha256sum < ".$prefix$k/$part" | cut -c1-64)" >> "$list"
done
du -sb ".$prefix"[0-9]*/ | awk '{ printf "%s  %.1f MiB\n", $2, $1 / 1048576 }'
echo "carry one folder per call (PARTS.sha256 is in .${prefix}1); keep each call under 64 MiB with the tree"
