"""Steps/second for 1 process vs 2 local workers (same per-replica batch), on demo shards.

    python benchmarks/multiworker_scaling.py [--steps 30] [--per_replica_batch 32]

Both runs use the same code path (`strategy.run(model.train_step)`); the 2-worker run
adds the all-gather of features and the all-reduce of gradients over loopback gRPC
and shares the machine's cores between the workers. The difference in step time
between the runs is reported as the communication + sharing overhead. The 2-worker
run is followed by `benchmarks/collectives.py` on the same 2 workers, which times
the step's collectives on their own: the features' all-gather with its gradient,
and the gradient all-reduce, at the step's sizes.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--per_replica_batch", type=int, default=32)
    parser.add_argument("--preset", default="clip_vit_tiny")
    parser.add_argument("--collective_steps", type=int, default=30,
                        help="repetitions of each collective when timed alone (2 workers)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from keras_clip import demo_data

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data"
        demo_data.write_demo_dataset(str(data), num_train=4 * args.steps * args.per_replica_batch,
                                     num_val=8, num_zero_shot=12)
        common = [f"--preset={args.preset}", f"--train_data={data / 'train-*.tfrecord'}",
                  "--val_data=", f"--steps={args.steps}", "--checkpoint_every=100000"]
        results = {}
        for workers in (1, 2):
            model_dir = pathlib.Path(tmp) / f"w{workers}"
            flags = common + [f"--model_dir={model_dir}",
                              f"--global_batch_size={workers * args.per_replica_batch}"]
            if workers == 1:
                cmd = [sys.executable, str(ROOT / "training" / "run.py"), *flags, "--strategy=one_device"]
            else:
                cmd = [sys.executable, str(ROOT / "training" / "launch.py"), f"--num_workers={workers}",
                       "--", *flags, "--strategy=multiworker"]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            summary = json.loads((model_dir / "summary.json").read_text())
            results[workers] = summary
            step_s = summary["train_seconds"] / (summary["steps"] - 1)
            print(f"{workers} worker(s): global batch {summary['global_batch_size']}, "
                  f"{1 / step_s:.3f} steps/s, {summary['samples_per_second']:.1f} pairs/s, "
                  f"{1000 * step_s:.0f} ms/step")
        one = results[1]["train_seconds"] / (results[1]["steps"] - 1)
        two = results[2]["train_seconds"] / (results[2]["steps"] - 1)
        print(f"2-worker step time / 1-worker step time: {two / one:.2f}; each step does twice the "
              f"compute on the same {os.cpu_count()} cores, so 2-worker step - 2 x 1-worker step = "
              f"{1000 * (two - 2 * one):+.0f} ms/step is what communication adds net of overlap "
              "and of the two processes' different threading")
        collectives_file = pathlib.Path(tmp) / "collectives.json"
        subprocess.run([sys.executable, str(ROOT / "training" / "launch.py"), "--num_workers=2",
                        f"--script={ROOT / 'benchmarks' / 'collectives.py'}", "--",
                        f"--preset={args.preset}", f"--global_batch_size={2 * args.per_replica_batch}",
                        f"--steps={args.collective_steps}", f"--output={collectives_file}"],
                       env=env, check=True, capture_output=True)
        c = json.loads(collectives_file.read_text())
        print(f"Collectives alone, 2 workers, {c['steps']} repetitions each (after training, same "
              f"machine): all-gather of features + its gradient {c['all_gather_ms']:.1f} ms/step "
              f"({c['gathered_bytes'] / 1024:.0f} KiB gathered), gradient all-reduce "
              f"{c['gradient_all_reduce_ms']:.1f} ms/step ({c['all_reduced_bytes'] / 2**20:.1f} MiB, "
              f"token-embedding gradient as {c['sparse_gradient_rows']} rows), "
              f"empty step {c['empty_ms']:.1f} ms; all-gather share of the 2-worker step "
              f"{100 * c['all_gather_ms'] / (1000 * two):.1f}%")


if __name__ == "__main__":
    main()
