#!/usr/bin/env bash
# Kinetics-400 from the public tarball mirror the official GOCA README uses (s3 .../kinetics/400/<split>/part_N.tar.gz),
# with the annotation CSVs, extracted and arranged into class folders for `goca-prepare --dataset kinetics400`.
#
#   scripts/download_k400.sh DEST [train] [val] [test]        (default: all three splits; ~450 GB of tarballs)
#
# Resumable: wget -c continues partial downloads, each extracted tarball leaves a .done marker, and clips already
# moved into class folders stay put. Set K400_MIRROR to use another copy of the same layout.
# Result:  DEST/annotations/{train,val,test}.csv   DEST/{train,val,test}/<class>/<youtube_id>_<start>_<end>.mp4
# Then:    goca-prepare --dataset kinetics400 --src DEST --splits-dir DEST/annotations --out PREPARED
set -euo pipefail

DEST=${1:?usage: scripts/download_k400.sh DEST [train] [val] [test]}
shift || true
SPLITS=${*:-train val test}
BASE=${K400_MIRROR:-https://s3.amazonaws.com/kinetics/400}
HERE=$(cd "$(dirname "$0")/.." && pwd)

command -v wget >/dev/null || { echo "download_k400.sh: error: wget not found" >&2; exit 2; }
mkdir -p "$DEST/annotations" "$DEST/tars"

for s in $SPLITS; do
  case $s in train|val|test) ;; *) echo "download_k400.sh: error: unknown split '$s' (train, val, test)" >&2; exit 2;; esac
  wget -c -nv -O "$DEST/annotations/$s.csv" "$BASE/annotations/$s.csv"
  wget -c -nv -O "$DEST/tars/k400_${s}_path.txt" "$BASE/$s/k400_${s}_path.txt"
  mkdir -p "$DEST/tars/$s" "$DEST/flat/$s" "$DEST/$s"
  wget -c -nv -P "$DEST/tars/$s" -i "$DEST/tars/k400_${s}_path.txt"
  for t in "$DEST/tars/$s"/*.tar.gz; do
    [ -e "$t.done" ] && continue
    tar -xzf "$t" -C "$DEST/flat/$s" --strip-components=0
    touch "$t.done"
  done
  # tarballs unpack flat (sometimes under a sub-folder): move every clip next to the others, then into classes
  find "$DEST/flat/$s" -mindepth 2 -type f \( -name '*.mp4' -o -name '*.webm' -o -name '*.mkv' \) \
       -exec mv -n {} "$DEST/flat/$s/" \;
  PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" python -m goca_fast.prepare.datasets arrange-k400 \
       "$DEST/flat/$s" "$DEST/annotations/$s.csv" "$DEST/$s"
done
echo "download_k400.sh: done. Next: goca-prepare --dataset kinetics400 --src $DEST --splits-dir $DEST/annotations --out <prepared>"
