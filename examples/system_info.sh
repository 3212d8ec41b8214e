#!/bin/sh
# Collect basic system information from a device.
set -eu
echo "host: $(hostname)"
echo "kernel: $(uname -srm)"
echo "uptime: $(uptime)"
if [ -r /etc/os-release ]; then . /etc/os-release; echo "os: ${PRETTY_NAME:-unknown}"; fi
echo "memory:"; free -m 2>/dev/null || cat /proc/meminfo | head -3
