"""Flickr8k quality of the large-batch options: softmax vs sigmoid loss, patch dropout 0 vs 0.5.

Trains the same small model (`clip_vit_tiny`: 4-layer ViT, patch 8, 64 px; 4-layer
text tower) on the 6,000 Flickr8k train images for the same number of steps, once
per variant, one run at a time, with `training/run.py` and its flags; then evaluates
each final preset with `python -m keras_clip.evaluate`: retrieval recall@1/5/10 both
ways on the Flickr8k test split (1,000 images, 5,000 captions) and CIFAR-10 zero-shot
top-1 (10,000 test images, OpenAI's 18 templates). The softmax run is the shared
baseline of both comparisons. Prints every command it runs and a Markdown table.

Needs the real data (`../shared/data`, see its README); a benchmark, never a test.

    python benchmarks/large_batch_quality.py --steps 400 --batch_size 64
"""
import argparse
import csv
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"

VARIANTS = {
    "softmax": [],
    "sigmoid": ["--loss=sigmoid"],
    "patch_dropout_0.5": ["--patch_dropout=0.5"],
}


def write_tables(flickr_dir, out_dir):
    """`image<TAB>caption` tables of the train split and of the test split."""
    with open(os.path.join(flickr_dir, "captions.tsv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    paths = {}
    for split in ("train", "test"):
        paths[split] = os.path.join(out_dir, f"flickr8k_{split}.tsv")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.write("image\tcaption\n")
            f.writelines(f"{r['image']}\t{r['caption']}\n" for r in rows if r["split"] == split)
    return paths


def run(command, log_path):
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup_steps", type=int, default=40)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--out_dir", default="/tmp/large_batch_quality")
    args = parser.parse_args()
    print("Command: python benchmarks/large_batch_quality.py " + shlex.join(sys.argv[1:]))
    os.makedirs(args.out_dir, exist_ok=True)
    flickr_dir = os.path.join(args.data_dir, "flickr8k")
    tables = write_tables(flickr_dir, args.out_dir)
    results = {}
    for name in args.variants:
        run_dir = os.path.join(args.out_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        load_before = os.getloadavg()
        train_seconds = run([
            sys.executable, "training/run.py", "--preset=clip_vit_tiny",
            f"--train_data={tables['train']}", "--val_data=",
            f"--image_root={flickr_dir}/images", f"--global_batch_size={args.batch_size}",
            f"--steps={args.steps}", f"--warmup_steps={args.warmup_steps}",
            f"--learning_rate={args.learning_rate}", f"--checkpoint_every={args.steps}",
            # One record per image, as when the published figures were made (before
            # tables were read one record per pair by default).
            "--group_captions=true",
            "--seed=0", f"--model_dir={run_dir}/model", *VARIANTS[name],
        ], os.path.join(run_dir, "train.log"))
        with open(os.path.join(run_dir, "model", "summary.json")) as f:
            summary = json.load(f)
        preset = os.path.join(run_dir, "model", "preset")
        eval_seconds = run([
            sys.executable, "-m", "keras_clip.evaluate", f"--preset={preset}", "--task=retrieval",
            f"--dataset={tables['test']}", f"--data_dir={flickr_dir}/images",
            f"--output_dir={run_dir}/retrieval",
        ], os.path.join(run_dir, "retrieval.log"))
        eval_seconds += run([
            sys.executable, "-m", "keras_clip.evaluate", f"--preset={preset}", "--task=zero_shot",
            f"--dataset={args.data_dir}/cifar10_test", "--templates=cifar10",
            f"--output_dir={run_dir}/cifar10",
        ], os.path.join(run_dir, "cifar10.log"))
        with open(os.path.join(run_dir, "retrieval", "retrieval.json")) as f:
            retrieval = json.load(f)
        with open(os.path.join(run_dir, "cifar10", "zero_shot.json")) as f:
            zero_shot = json.load(f)
        results[name] = {"summary": summary, "retrieval": retrieval, "zero_shot": zero_shot,
                         "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                         "load_before": load_before, "load_after": os.getloadavg()}
        with open(os.path.join(args.out_dir, f"results_{'+'.join(args.variants)}.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"{name}: trained in {train_seconds:.0f} s, evaluated in {eval_seconds:.0f} s, "
              f"load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    print(json.dumps(results, indent=1, default=str)[:20000])


if __name__ == "__main__":
    main()
