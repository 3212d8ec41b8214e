#!/bin/sh
# Check free disk space; exit 1 (ERROR) when any mount is fuller than THRESHOLD percent.
set -eu
THRESHOLD="${THRESHOLD:-90}"
df -P | awk -v limit="$THRESHOLD" '
  NR > 1 {
    pct = $5; sub("%", "", pct)
    if (pct + 0 >= limit) { print "FULL: " $6 " at " $5; full = 1 } else { print "ok: " $6 " at " $5 }
  }
  END { exit full }'
