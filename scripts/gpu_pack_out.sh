# SPDX-License-Identifier: Apache-2.0
# Sourced by gpu_host_run.sh and gpu_kernel_run.sh after OUT is set. The
# device tool brings back at most 8 files from $OUT, so on exit (also when a
# `timeout` ends the script) a folder holding more is packed into one
# archive, $OUT/results.tgz. Give a call's steps to one invocation: a later
# one does not see the files an earlier one packed (e.g. the ceiling log the
# kernel benchmark reads).
pack_out() {
  local count archive
  count=$(find "$OUT" -type f | wc -l)
  [ "$count" -gt 8 ] || return 0
  archive=$(mktemp /tmp/qtip-results.XXXXXX)
  tar czf "$archive" -C "$OUT" . && rm -rf "${OUT:?}"/* &&
    mv "$archive" "$OUT/results.tgz" &&
    echo "packed the $count files of $OUT into $OUT/results.tgz"
}
trap pack_out EXIT
trap 'exit 143' TERM INT
