"""The tables `benchmarks/train_vs_open_clip.py` trains both libraries on.

`--keras_data open_clip_rows` (issue 14's caption-sampling ablation) claims keras_clip
then reads exactly open_clip's rows: one record per row, the same image file and the
same caption, in the same number. Checked here through keras_clip's own table reader
on a synthetic set (no Flickr8k needed).
"""
import csv
import importlib.util
import json
import os
import pathlib

import numpy as np

from keras_clip.data import pipeline

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_vs_open_clip.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("train_vs_open_clip", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_set(image_dir, num_images=7, captions_per_image=5):
    os.makedirs(image_dir)
    train = []
    for i in range(num_images):
        name = f"img{i}.jpg"
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(b"\xff\xd8\xff" + bytes([i]))  # only names and existence matter here
        train.append((name, [f"caption {j} of image {i} ." for j in range(captions_per_image)]))
    return train


def test_open_clip_table_gives_each_image_a_different_caption_each_pass(tmp_path):
    bench = _benchmark()
    train = _train_set(str(tmp_path / "images"))
    table = str(tmp_path / "open_clip.csv")
    num_rows = 3 * len(train) + 4  # three whole passes and part of a fourth
    passes = bench.write_open_clip_table(train, str(tmp_path / "images"), num_rows, seed=0, path=table)
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert passes == 4 and len(rows) == num_rows
    for p in range(3):
        chunk = rows[p * len(train):(p + 1) * len(train)]
        assert sorted(os.path.basename(r["filepath"]) for r in chunk) == sorted(n for n, _ in train)
    by_image = {}
    for row in rows[: 3 * len(train)]:
        by_image.setdefault(os.path.basename(row["filepath"]), []).append(row["title"])
    assert all(len(set(captions)) == 3 for captions in by_image.values())


def test_rows_table_reads_back_as_open_clips_rows_one_record_each(tmp_path):
    bench = _benchmark()
    image_dir = str(tmp_path / "images")
    train = _train_set(image_dir)
    table = str(tmp_path / "open_clip.csv")
    num_rows = 3 * len(train) + 4
    bench.write_open_clip_table(train, image_dir, num_rows, seed=1, path=table)
    root, rows_table = str(tmp_path / "rows_images"), str(tmp_path / "rows.tsv")
    written = bench.write_keras_clip_rows_table(table, len(train), image_dir, root, rows_table)

    records, paths, counts, missing = pipeline.read_table_records(
        rows_table, root, image_column="image", caption_column="caption")

    with open(table, newline="", encoding="utf-8") as f:
        expected = [(os.path.basename(r["filepath"]), r["title"]) for r in csv.DictReader(f, delimiter="\t")]
    assert written == len(records) == num_rows and missing == 0
    assert all(len(captions) == 1 for _, _, captions in records)
    got = [(os.path.basename(os.path.realpath(path)), captions[0]) for path, (_, _, captions) in zip(paths, records)]
    assert sorted(got) == sorted(expected)
    # Each path resolves to the original file.
    assert all(os.path.realpath(p) == os.path.realpath(os.path.join(image_dir, os.path.basename(p))) for p in paths)
    assert np.unique([p for p in paths]).size == num_rows


def test_heldout_contrastive_loss_matches_open_clips_loss():
    """The benchmark's held-out loss against open_clip's `ClipLoss` formula (numpy form:
    mean of the image->text and text->image cross-entropies, per batch, then averaged)."""
    bench = _benchmark()
    rng = np.random.default_rng(0)
    num_images, per_image, dim, batch, scale = 12, 3, 8, 4, 14.3

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    images = unit(rng.normal(size=(num_images, dim)))
    texts = unit(rng.normal(size=(num_images * per_image, dim)))
    text_to_image = np.repeat(np.arange(num_images), per_image)
    permutation = rng.permutation(len(texts))  # captions need not be grouped
    got = bench.heldout_contrastive_loss(images, texts[permutation], text_to_image[permutation], scale, batch)

    # The k-th caption of an image is its k-th in the order given.
    shuffled_texts, shuffled_owner = texts[permutation], text_to_image[permutation]
    captions_of = [[t for t, owner in zip(shuffled_texts, shuffled_owner) if owner == i] for i in range(num_images)]
    expected = []
    for k in range(per_image):
        slot = np.stack([captions_of[i][k] for i in range(num_images)])
        for start in range(0, num_images, batch):
            logits = scale * images[start:start + batch] @ slot[start:start + batch].T
            labels = np.arange(batch)
            log_softmax_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            log_softmax_cols = logits.T - np.log(np.exp(logits.T).sum(1, keepdims=True))
            expected.append(-(log_softmax_rows[labels, labels].mean() + log_softmax_cols[labels, labels].mean()) / 2)
    np.testing.assert_allclose(got, np.mean(expected), rtol=1e-12)
    # Perfectly matched pairs at a large scale: loss near 0; shuffled pairs: near log(batch).
    assert bench.heldout_contrastive_loss(images, np.repeat(images, per_image, 0), text_to_image, 100.0, batch) < 0.05


def test_step_log_of_a_resumed_run_keeps_each_steps_last_entry_and_leaves_out_process_starts(tmp_path):
    """A keras_clip run killed after its step-4 checkpoint, with steps 5-6 logged, then
    resumed from step 4: steps 5-6 are redone and their new entries count; each process's
    first step has no duration and is left out of pairs/second."""
    bench = _benchmark()
    path = tmp_path / "steps.jsonl"
    first = [(1, 3.0, None), (2, 2.5, 1.0), (3, 2.4, 1.1), (4, 2.3, 0.9), (5, 2.2, 1.0), (6, 2.1, 1.2)]
    second = [(5, 2.25, None), (6, 2.15, 2.0), (7, 2.0, 2.0), (8, 1.9, 4.0)]

    def write(entries):
        with open(path, "a") as f:
            for step, loss, seconds in entries:
                f.write(f'{{"step": {step}, "loss": {loss}, "seconds": {"null" if seconds is None else seconds}}}\n')

    write(first)
    with open(path, "a") as f:
        f.write('{"step": 7, "loss": 2.')  # a line cut by the kill
        f.write("\n")  # what the resumed process writes first
    write(second)
    losses, seconds, starts, steps = bench.read_step_log(str(path))
    assert steps == list(range(1, 9))
    assert losses == [3.0, 2.5, 2.4, 2.3, 2.25, 2.15, 2.0, 1.9]
    assert seconds == [None, 1.0, 1.1, 0.9, None, 2.0, 2.0, 4.0]
    assert starts == [1, 5]
    # Steps 2-8 after skipping one, step 5 untimed: 6 steps of batch 10 in 11.0 s; the
    # median step (1.1 + 2.0) / 2.
    overall, median = bench.throughput(seconds, batch_size=10, skip=1)
    np.testing.assert_allclose([overall, median], [60 / 11.0, 10 / 1.55])


def test_interrupted_run_resumes_only_with_its_key_and_a_step_log_up_to_its_checkpoint(tmp_path):
    bench = _benchmark()
    run_dir = tmp_path / "seed_0"
    (run_dir / "model" / "checkpoints").mkdir(parents=True)
    key = {"model": "issue14", "seed": 0, "code_hash": bench.code_hash()}
    (run_dir / "run_key.json").write_text(json.dumps(key))
    (run_dir / "model" / "checkpoints" / "ckpt-4.index").write_bytes(b"")
    log = "".join(json.dumps({"step": k, "loss": 1.0, "seconds": None if k == 1 else 1.0}) + "\n"
                  for k in (1, 2, 4, 5))
    (run_dir / "steps.jsonl").write_text(log)
    assert not bench._resumable(str(run_dir), key)  # step 3 missing: start afresh
    (run_dir / "steps.jsonl").write_text(log + json.dumps({"step": 3, "loss": 1.0, "seconds": 1.0}) + "\n")
    assert bench._resumable(str(run_dir), key)
    assert not bench._resumable(str(run_dir), dict(key, seed=1))
    assert not bench._resumable(str(run_dir), dict(key, code_hash="0" * 64))  # other code
    (run_dir / "result.json").write_text("{}")
    assert not bench._resumable(str(run_dir), key)  # finished: --reuse takes it, or it reruns
