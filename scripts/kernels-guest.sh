#!/bin/bash
# Runs as PID 1 in the guest of `cargo xtask kernels`, on the host's root
# (read-only, tmpfs on /tmp, /run and /var/tmp): mounts what the root tests
# expect, asks the agent to load every program, runs the tests of the plan
# ($TGK_PLAN: label, executable, test name; tab-separated) one at a time and
# powers off. Lines starting with "TGK " are for the host; everything else
# on the console is the tests' own output, kept in the log.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root RUST_BACKTRACE=0

# Each test must finish well inside the host's timeout for the whole guest.
TEST_TIMEOUT=240

mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
ip link set lo up
echo "TGK boot $(uname -r) $(cut -d' ' -f1 /proc/uptime)"

seconds_since() {
  echo "$EPOCHREALTIME $1" | awk '{printf "%.2f", $1 - $2}'
}

if "$TGK_AGENT" help verify >/dev/null 2>&1; then
  "$TGK_AGENT" verify --json | sed -u 's/^/TGK verify /'
  echo "TGK verify-exit ${PIPESTATUS[0]}"
else
  echo "TGK verify-missing"
fi

# libtest runs tests from their package's directory; so does this.
cd "$(dirname "$0")/../tests" || echo "TGK error no tests directory"
while IFS=$'\t' read -r label exe name; do
  echo "TGK start $label"
  start=$EPOCHREALTIME
  timeout "$TEST_TIMEOUT" "$exe" --exact "$name" --include-ignored --test-threads=1 \
    --color=never </dev/null 2>&1
  status=$?
  echo "TGK test $label $status $(seconds_since "$start")"
done <"$TGK_PLAN"
echo "TGK done $(cut -d' ' -f1 /proc/uptime)"
echo o >/proc/sysrq-trigger
sleep 60
