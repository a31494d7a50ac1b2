"""Start N local worker processes of training/run.py with a correct TF_CONFIG each.

    python training/launch.py --num_workers=2 -- --strategy=multiworker --steps=20

Each worker gets the same cluster spec (free loopback ports) and its own task index;
logs are streamed with a `[worker i]` prefix. If any worker exits non-zero (or is
killed), the others are stopped and the launcher exits non-zero naming the dead
worker. Rerunning the same command resumes from the chief's last checkpoint.
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


def launch(run_args, num_workers, host="127.0.0.1", script=None, out=sys.stdout, poll_seconds=0.2):
    """Runs the workers to completion; returns (exit_code, message)."""
    script = script or FLAGS.script
    processes = []
    for index, tf_config in enumerate(cluster_configs(num_workers, host)):
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, script, *run_args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        threading.Thread(target=_stream, args=(f"[worker {index}]", proc.stdout, out),
                         daemon=True).start()
        processes.append(proc)
    try:
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
    finally:
        for proc in processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def main(argv):
    code, message = launch(argv[1:], FLAGS.num_workers, FLAGS.host)
    print(f"[launcher] {message}", file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    app.run(main)
