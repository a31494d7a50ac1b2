"""Start N local worker processes of training/run.py with a correct TF_CONFIG each.

    python training/launch.py --num_workers=2 -- --strategy=multiworker --steps=20

Each worker gets the same cluster spec (free loopback ports) and its own task index;
logs are streamed with a `[worker i]` prefix. If any worker exits non-zero (or is
killed), the others are stopped and the launcher exits non-zero naming the dead
worker. Rerunning the same command resumes from the chief's last checkpoint.

Each worker runs in its own process group. SIGTERM, SIGINT or SIGHUP to the
launcher is forwarded to every worker's group; workers still alive after
`--kill_timeout_seconds` get SIGKILL, so no worker outlives the launcher (unless
the launcher itself is SIGKILLed, which no program can handle).

Addresses: the launcher logs the `host:port` of each worker. TensorFlow (2.21)
cannot be made to bind loopback only: with `127.0.0.1:<port>` in TF_CONFIG its
gRPC server still listens on every interface (measured: `/proc/net/tcp6` shows
`[::]:<port>` in LISTEN state; tensorflow/core/distributed_runtime/rpc/
grpc_server_lib.cc builds the listening address from the port alone). TF_CONFIG
only decides where workers *connect*; on a shared or exposed machine, keep the
ports behind a firewall while the job runs.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

flags.DEFINE_integer("num_workers", 2, "Worker processes to start.")
flags.DEFINE_string("host", "127.0.0.1", "Loopback address the workers listen on.")
flags.DEFINE_float("kill_timeout_seconds", 10.0,
                   "After forwarding a stop signal, seconds to wait before SIGKILLing workers.")
flags.DEFINE_string("script", os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"),
                    "Training script each worker runs.")
FLAGS = flags.FLAGS


def free_ports(count, host="127.0.0.1"):
    """`count` distinct free TCP ports on `host` (bound then released)."""
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind((host, 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def cluster_configs(num_workers, host="127.0.0.1"):
    """One TF_CONFIG dict per worker (worker 0 acts as chief)."""
    workers = [f"{host}:{port}" for port in free_ports(num_workers, host)]
    return [{"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
            for i in range(num_workers)]


def _stream(prefix, pipe, out):
    for line in iter(pipe.readline, ""):
        out.write(f"{prefix} {line}")
        out.flush()
    pipe.close()


class _Stop(Exception):
    """A stop signal reached the launcher."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_workers(processes, signum, timeout, out):
    """Sends `signum` to every live worker's process group, waits up to `timeout`
    seconds in all, then SIGKILLs the groups still alive."""
    for proc in processes:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for proc in processes:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            pass
    for index, proc in enumerate(processes):
        # Decided before the SIGKILL: afterwards the worker may already be reaped.
        ignored = proc.poll() is None
        try:  # the whole group: also children a worker may have started
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if ignored:
            out.write(f"[launcher] worker {index} (pid {proc.pid}) ignored signal {signum}; "
                      "sent SIGKILL\n")
        proc.wait()


def launch(run_args, num_workers, host="127.0.0.1", script=None, out=sys.stdout, poll_seconds=0.2,
           kill_timeout_seconds=10.0):
    """Runs the workers to completion; returns (exit_code, message).

    A SIGTERM/SIGINT/SIGHUP received meanwhile (in the main thread) is forwarded
    to every worker; workers still alive after `kill_timeout_seconds` are
    SIGKILLed; the exit code is then 128 + the signal number.
    """
    script = script or FLAGS.script
    configs = cluster_configs(num_workers, host)
    addresses = configs[0]["cluster"]["worker"]
    out.write(f"[launcher] {num_workers} workers at {', '.join(addresses)} (TensorFlow's gRPC server "
              "listens on all interfaces at these ports)\n")
    out.flush()

    def on_signal(signum, frame):
        del frame
        raise _Stop(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in _STOP_SIGNALS}
    processes = []
    stop_signal = signal.SIGTERM
    try:
        for index, tf_config in enumerate(configs):
            env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), PYTHONUNBUFFERED="1")
            proc = subprocess.Popen([sys.executable, script, *run_args], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # own process group
            processes.append(proc)
            threading.Thread(target=_stream, args=(f"[worker {index}]", proc.stdout, out),
                             daemon=True).start()
            out.write(f"[launcher] worker {index}: pid {proc.pid}, {addresses[index]}\n")
        while True:
            codes = [p.poll() for p in processes]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = failed[0]
                how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                message = (f"worker {index} (pid {processes[index].pid}) {how}; stopping the "
                           "other workers. Rerun the same command to resume from the last checkpoint.")
                return 1, message
            if all(c == 0 for c in codes):
                return 0, f"all {num_workers} workers finished"
            time.sleep(poll_seconds)
    except _Stop as stop:
        stop_signal = stop.signum
        return 128 + stop.signum, (f"received signal {stop.signum}; stopped all {len(processes)} workers. "
                                   "Rerun the same command to resume from the last checkpoint.")
    finally:
        # Signals that arrive while stopping must not interrupt the stopping.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        _stop_workers(processes, stop_signal, kill_timeout_seconds, out)
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv):
    code, message = launch(argv[1:], FLAGS.num_workers, FLAGS.host,
                           kill_timeout_seconds=FLAGS.kill_timeout_seconds)
    print(f"[launcher] {message}", file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    app.run(main)
