#!/bin/sh
# Rotate an application log: keep KEEP compressed generations. Params: LOG_FILE, KEEP.
set -eu
LOG_FILE="${LOG_FILE:-/var/log/app/app.log}"
KEEP="${KEEP:-5}"
[ -f "$LOG_FILE" ] || { echo "no log at $LOG_FILE, nothing to rotate"; exit 0; }
i=$KEEP
while [ "$i" -gt 1 ]; do
  prev=$((i - 1))
  [ -f "$LOG_FILE.$prev.gz" ] && mv -f "$LOG_FILE.$prev.gz" "$LOG_FILE.$i.gz"
  i=$prev
done
cp "$LOG_FILE" "$LOG_FILE.1" && : > "$LOG_FILE" && gzip -f "$LOG_FILE.1"
echo "rotated $LOG_FILE, kept $KEEP generations"
