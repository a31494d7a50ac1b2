"""Per-pair against per-image reading of a small caption table whose captions say nothing
about the images (the default test tier's made-up Flickr8k: 48 images x 5 captions).

    python benchmarks/small_table_reading.py [--simulations 200]
        [--train --steps 72 --seeds 0 1] [--out_dir /tmp/small_table_reading]

On such a table the training loss can only fall on pairs seen before. The first part
simulates the two readings' data orders (no model): one record per image-caption pair,
each pass a permutation of the table (keras_clip's default); one record per image, each
pass a permutation of the images with one caption drawn per image (`group_captions=True`).
It prints the share of rows repeating a pair already seen, per 12 steps, and how many
steps before that pair was last seen. `--train` then trains the tests' tiny model with
`tests/test_training_run.py`'s settings (batch 16, lr 2e-3, 3 warm-up steps) reading
each way and prints the mean training loss per 12 steps. docs/bf16_training_quality.md,
"The runs, in order" (the small-table finding).
"""
import argparse
import csv
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGES, CAPTIONS, BATCH, WINDOW = 48, 5, 16, 12


def data_order(reading, steps, rng):
    """The `(image, caption)` rows of `steps` batches, in the order `reading` gives."""
    rows = []
    while len(rows) < steps * BATCH:
        if reading == "pair":
            rows += [divmod(int(k), CAPTIONS) for k in rng.permutation(IMAGES * CAPTIONS)]
        else:
            rows += [(int(i), int(rng.integers(CAPTIONS))) for i in rng.permutation(IMAGES)]
    return rows[:steps * BATCH]


def repeats(rows, steps):
    """Per step, the share of rows whose pair came before; and each repeat's gap in steps."""
    last, shares, gaps = {}, [], []
    for step in range(steps):
        batch = rows[step * BATCH:(step + 1) * BATCH]
        seen = [step - last[pair] for pair in batch if pair in last]
        shares.append(len(seen) / BATCH)
        gaps += seen
        last.update((pair, step) for pair in batch)
    return np.array(shares), np.array(gaps)


def simulate(steps, simulations):
    for reading in ("pair", "image"):
        results = [repeats(data_order(reading, steps, np.random.default_rng(k)), steps)
                   for k in range(simulations)]
        shares = np.mean([r[0] for r in results], axis=0)
        gaps = np.concatenate([r[1] for r in results])
        windows = " / ".join(f"{shares[i:i + WINDOW].mean():.2f}" for i in range(0, steps, WINDOW))
        print(f"per {reading}: rows repeating a seen pair, per {WINDOW} steps: {windows}; steps since "
              f"last seen: median {np.median(gaps):.0f}, within 5 steps {np.mean(gaps <= 5):.0%}")


def train(steps, seeds, out_dir):
    import keras

    from keras_clip import CLIP
    from keras_clip.training import TrainConfig, run
    from tests import harness

    flickr = pathlib.Path(out_dir) / "flickr8k"
    if not (flickr / "captions.tsv").exists():
        harness.write_flickr8k(flickr, seed=0)
    names = set((flickr / "splits" / "train.txt").read_text().split()[:IMAGES])
    table = pathlib.Path(out_dir) / "table.tsv"
    with open(flickr / "captions.tsv", newline="") as f, open(table, "w", newline="") as out:
        reader = csv.DictReader(f, delimiter="\t")
        writer = csv.DictWriter(out, reader.fieldnames, delimiter="\t", quoting=csv.QUOTE_NONE,
                                escapechar="\\")
        writer.writeheader()
        writer.writerows(row for row in reader if row["image"] in names)
    preset = pathlib.Path(out_dir) / "tiny"
    keras.utils.set_random_seed(0)  # the tests' tiny preset
    CLIP(**harness.TINY_VIT_TRAIN).save_to_preset(str(preset))
    for seed in seeds:
        for reading in ("pair", "image"):
            with tempfile.TemporaryDirectory() as model_dir:
                config = TrainConfig(
                    preset=str(preset), train_data=str(table), val_data="", image_root=str(flickr / "images"),
                    global_batch_size=BATCH, steps=steps, learning_rate=2e-3, warmup_steps=3,
                    model_dir=model_dir, checkpoint_every=steps, seed=seed,
                    group_captions=reading == "image")
                losses = run(config)["loss_history"]
            windows = [round(float(np.mean(losses[i:i + WINDOW])), 3) for i in range(0, steps, WINDOW)]
            print(json.dumps({"reading": reading, "seed": seed, "loss_per_12_steps": windows}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=36, help="steps simulated (and trained)")
    parser.add_argument("--simulations", type=int, default=200)
    parser.add_argument("--train", action="store_true", help="also train the tiny model each way")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out_dir", default=os.path.join(tempfile.gettempdir(), "small_table_reading"))
    args = parser.parse_args()
    simulate(args.steps, args.simulations)
    if args.train:
        train(args.steps, args.seeds, args.out_dir)


if __name__ == "__main__":
    main()
