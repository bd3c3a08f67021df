# Sourced by demo.sh and demo_mole.sh. new_samples_folder: a new folder for this run's samples, never one that
# exists: $OUT/samples, else $OUT/samples-2, -3, ... The toy check counts every image in it, and an earlier run's
# samples or a user's own files in $OUT are never deleted or mixed in.
new_samples_folder() {
  local folder="$OUT/samples" n=1
  until mkdir "$folder" 2>/dev/null; do  # mkdir, not a test then mkdir: it fails on any name that exists
    [ -e "$folder" ] || { echo "error: cannot create $folder; choose another OUT=" >&2; exit 2; }
    n=$((n + 1))
    folder="$OUT/samples-$n"
  done
  echo "$folder"
}
