# Helpers the benchmark scripts share (sourced, not run): a free loopback port, waiting for a
# port to open, a process's CPU time, and the processes a script started, stopped when it exits.

# A port no one listens on now (the kernel's pick for an ephemeral bind).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits up to 10 s for 127.0.0.1:$1 to accept a connection.
wait_port() {
  for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2
  return 1
}

# CPU time (user + system) process $1 has used, in microseconds.
cpu_us() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%d", ($14 + $15) * 1000000 / hz }' "/proc/$1/stat"; }

# Started processes: add each one's PID to PIDS; all are killed when the script exits.
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
