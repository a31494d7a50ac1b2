"""Trains one CLIP with keras_clip and with open_clip's own trainer on Flickr8k, in float32
and/or bf16, then evaluates every model with the same keras_clip code.

    python benchmarks/train_vs_open_clip.py [--model tiny|issue14] [--steps N] [--batch_size B]
        [--seeds 0 1] [--precision float32 bf16] [--settings own matched]
        [--matched_recipe open_clip|paper] [--cifar_images 2000] [--cifar_templates simple|openai]
        [--frameworks keras_clip open_clip] [--keras_data pairs|images|open_clip_rows]
        [--reuse] [--checkpoint_every 50] [--out_dir /tmp/train_vs_open_clip]

`--model` names the architecture with its run defaults (`MODELS`): `tiny` is keras_clip's
`clip_vit_tiny` at 64 px (120 steps x 64, lr 1e-3, decay 0.1: a check that nothing is
broken), `issue14` the configuration of issue 14 (6-layer 128 px ViT-16 width 256, 6-layer
text width 256, context 32, embedding 256, GELU; 702 steps x 128, lr 5e-4, 100 warm-up
steps, decay 0.2). The architecture is registered with open_clip as a model config
(`keras_clip.convert.writers.open_clip_model_config`); parameter counts are checked equal.

Kept the same for both frameworks: the architecture, batch size, number of optimiser
steps, peak learning rate, linear warm-up then cosine decay to 0 (the same formula), the
weight decay value, the seeds, the training transform (RandomResizedCrop scale (0.9, 1),
bicubic, OpenAI mean/std), the tokenizer and context length, the symmetric contrastive
loss with the temperature capped at 100, and the precision (`--precision float32`: both
fp32; `bf16`: keras_clip `mixed_bfloat16`, open_clip `amp_bf16`). `--settings`:

* `own`: each library's defaults: keras_clip's `TrainConfig` (the paper recipe: betas
  0.9/0.98, epsilon 1e-6, token/positional embeddings not decayed), open_clip_train's
  (betas 0.9/0.999, epsilon 1e-8, every matrix decayed; its defaults for model names
  without "vit", passed explicitly);
* `matched`: both with `--matched_recipe`'s betas and epsilon (open_clip's by default),
  every matrix decayed in both (open_clip cannot exclude the embeddings).

Left as each trainer does it (printed with the results): the initial weights drawn
(the same scheme, each framework's own random draws), data order and crops (same seed
values, different random generators), and the input pipeline (tf.data vs a torch
DataLoader with one worker process). Keras' Adam adds epsilon to sqrt(v) before bias
correction, torch's after (docs/bf16_training_quality.md).

Training data: the 6,000 Flickr8k `train` images with their 5 captions each. keras_clip
reads a table of them (`--keras_data`): `pairs` (default, keras_clip's default reading)
one record per image-caption pair, every pair once per epoch, fully shuffled; `images`
(`--group_captions=true`, keras_clip's default before issue 14) one record per image, one
caption drawn per image per epoch. open_clip reads a CSV that this script writes with
exactly `steps * batch_size` rows (passes over the images, a different caption per pass),
so that one open_clip epoch is the step budget. `--keras_data open_clip_rows` (an
ablation of caption sampling and data order) gives keras_clip open_clip's very rows for
the same seed instead, one record per row, fully shuffled, one epoch. Evaluation,
identical for both (the open_clip checkpoint is loaded into keras_clip, float32):
recall@1/5/10 both ways on the 1,000 Flickr8k test images and their 5,000 captions, and
zero-shot top-1 on `--cifar_images` CIFAR-10 test images (the seeded subset that
`python -m keras_clip.evaluate --max_examples` evaluates) with 4 simple
templates (`SIMPLE_TEMPLATES`) or OpenAI's 18; and a held-out loss, the contrastive loss
on the Flickr8k test pairs in batches of 125 at the trained temperature (less noisy than
recall@K; `heldout_contrastive_loss`).

Each training run is a fresh process (keras_clip: a spawned worker that loads no torch;
open_clip: `open_clip_train_wrapper.py`, which loads no TensorFlow), and the runs take
turns: for each seed, each precision and each setting, keras_clip then open_clip.
Pairs/second counts the training steps after the first `--warmup_skip` ones, each step
timed from the end of the one before (data wait included), as open_clip's own "Batch (t)"
log figure; a second figure uses the median step time, which other jobs on the same
cores disturb less.

Output: one row per run, then per framework/precision/settings the mean and the seed
spread (max - min) of every figure, keras_clip - open_clip per figure against keras_clip's
spread (issue 14's acceptance test), and the same as a Markdown table (`table.md`).

Measured on the 2-core development machine (README, "Training benchmark against
open_clip's trainer"): `--model tiny --steps 1000` at commit e1e9438 (67.0 min): keras_clip
had the lower loss and the better CIFAR-10 zero-shot, the recall figures split within the
seed-to-seed spread. `--model issue14`: docs/bf16_training_quality.md.

A keras_clip run that is interrupted (the machine's session ends, the process is
killed) resumes from its last checkpoint (`--checkpoint_every`) when the same command is
run again; the resume is exact, only its timing has a gap (`train_keras_clip`).

Temporary tables, logs, checkpoints and `results.json` go to `--out_dir` (outside the
repository by default: Flickr8k's captions must not be published).
"""
import argparse
import contextlib
import csv
import hashlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRAPPER = ROOT / "benchmarks" / "open_clip_train_wrapper.py"
DEFAULT_DATA_DIR = (pathlib.Path("/work/shared/data") if os.path.isdir("/work/shared/data")
                    else ROOT.parent / "shared" / "data")
FRAMEWORKS = ("keras_clip", "open_clip")
PRECISIONS = {"float32": ("float32", "fp32"), "bf16": ("mixed_bfloat16", "amp_bf16")}
# Named architectures (keras_clip `CLIP` kwargs, or a preset name) and their run defaults.
MODELS = {
    # keras_clip's `clip_vit_tiny` (4-layer 64 px ViT-8, width 128): the README's first table.
    "tiny": {"preset": "clip_vit_tiny", "kwargs": {}, "image_size": 64, "steps": 120,
             "batch_size": 64, "learning_rate": 1e-3, "warmup_steps": None, "weight_decay": 0.1},
    # Issue 14's model: 6-layer 128 px ViT-16 width 256 (4 heads), 6-layer text width 256
    # (4 heads), context 32, embedding 256, exact GELU (22.5M parameters); 702 steps x 128
    # pairs (3 passes over the 30,000 Flickr8k training pairs), lr 5e-4, 100 warm-up steps,
    # weight decay 0.2.
    "issue14": {"preset": None, "kwargs": dict(
        embed_dim=256, image_size=128, vision_architecture="vit", vision_patch_size=16,
        vision_num_layers=6, vision_hidden_dim=256, vision_num_heads=4, context_length=32,
        text_hidden_dim=256, text_num_layers=6, text_num_heads=4, activation="gelu"),
        "image_size": 128, "steps": 702, "batch_size": 128, "learning_rate": 5e-4,
        "warmup_steps": 100, "weight_decay": 0.2},
}
# AdamW settings of each setting name (see `--settings`): (beta_1, beta_2, epsilon, decay rule).
OPEN_CLIP_DEFAULTS = (0.9, 0.999, 1e-8, "all_matrices")  # open_clip_train's, non-"vit" names
PAPER = (0.9, 0.98, 1e-6, "except_embeddings")  # keras_clip's TrainConfig defaults (ViT)
SETTINGS = ("own", "matched")
# CIFAR-10 zero-shot templates: OpenAI's 18, or 4 simple ones.
SIMPLE_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.",
                    "a picture of a {}.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny",
                        help="architecture and its run defaults (steps, batch, lr, warm-up, decay)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per run")
    parser.add_argument("--batch_size", type=int, default=None, help="pairs per step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--image_size", type=int, default=None,
                        help="input side (default: the model's; the patch size must divide it)")
    parser.add_argument("--learning_rate", type=float, default=None, help="peak learning rate")
    parser.add_argument("--warmup_steps", type=int, default=None, help="default: the model's, or 10%% of --steps")
    parser.add_argument("--weight_decay", type=float, default=None)
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS), default=["float32"],
                        help="one or both: float32 (both fp32) and bf16 (keras_clip mixed_bfloat16, "
                             "open_clip amp_bf16)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=["matched"],
                        help="own: each library's defaults (keras_clip: the paper recipe, betas "
                             "0.9/0.98, eps 1e-6, embeddings not decayed; open_clip_train: 0.9/0.999, "
                             "1e-8, every matrix decayed); matched: both with --matched_recipe")
    parser.add_argument("--matched_recipe", choices=("open_clip", "paper"), default="open_clip",
                        help="AdamW betas/epsilon of --settings matched (both libraries decay every "
                             "matrix: open_clip cannot exclude the embeddings)")
    parser.add_argument("--cifar_images", type=int, default=2000,
                        help="CIFAR-10 test images (evaluate.py's seeded subset; 0: all 10,000)")
    parser.add_argument("--cifar_templates", choices=("simple", "openai"), default="simple",
                        help="simple: 4 templates (SIMPLE_TEMPLATES); openai: OpenAI's 18")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--keras_data", choices=KERAS_DATA, default="pairs",
                        help="what keras_clip trains on. pairs (keras_clip's default reading): "
                             "one record per image-caption pair, every pair once per epoch, fully "
                             "shuffled; images (--group_captions=true, the default before issue "
                             "14): one record per image, one of its captions drawn per pass; "
                             "open_clip_rows (an ablation of caption sampling and data order): the "
                             "very rows of open_clip's table for that seed, one record each, fully "
                             "shuffled, one epoch (runs saved under keras_clip_<keras_data>/; images "
                             "under keras_clip/)")
    parser.add_argument("--warmup_skip", type=int, default=5,
                        help="first steps left out of pairs/second (at most a quarter of the steps)")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                        help="folder holding flickr8k/ and cifar10_test/")
    parser.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=False,
                        help="reuse a run's <out_dir>/<framework>/<precision>/<settings>/seed_N/"
                             "result.json written by an earlier invocation with the same run "
                             "arguments (RUN_KEYS) instead of training it again, so the runs of a "
                             "full comparison can be spread over several sittings")
    parser.add_argument("--checkpoint_every", type=int, default=50,
                        help="keras_clip runs checkpoint every N steps; a run interrupted (killed, "
                             "machine stopped) resumes from its last checkpoint when started again "
                             "with the same arguments, exactly (see train_keras_clip)")
    parser.add_argument("--out_dir", default=os.path.join(tempfile.gettempdir(), "train_vs_open_clip"))
    args = parser.parse_args(argv)
    model = MODELS[args.model]
    for name in ("steps", "batch_size", "image_size", "learning_rate", "weight_decay"):
        if getattr(args, name) is None:
            setattr(args, name, model[name])
    if args.warmup_steps is None:
        args.warmup_steps = model["warmup_steps"] if model["warmup_steps"] is not None else args.steps // 10
    if args.steps < 2 or args.batch_size < 2:
        parser.error(f"--steps and --batch_size must be at least 2. Received: {args.steps}, {args.batch_size}")
    return args


def optimizer_settings(framework, settings, matched_recipe):
    """`(beta_1, beta_2, epsilon, weight-decay rule)` of one run."""
    if settings == "own":
        return PAPER if framework == "keras_clip" else OPEN_CLIP_DEFAULTS
    betas_eps = OPEN_CLIP_DEFAULTS[:3] if matched_recipe == "open_clip" else PAPER[:3]
    return (*betas_eps, "all_matrices")


# ----------------------------------------------------------------------------------
# Machine and run description
# ----------------------------------------------------------------------------------


def describe_machine():
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(
        f"{name} {importlib.metadata.version(dist)}"
        for name, dist in [("tensorflow", "tensorflow"), ("keras", "keras"), ("torch", "torch"),
                           ("open_clip", "open_clip_torch")]
    )
    return f"{usable} usable CPU cores ({os.cpu_count()} online), {cpu}; {versions}"


def throughput(step_seconds, batch_size, skip):
    """Pairs per second over the steps after the first `skip` ones: `(overall, median step)`.

    The median-step figure is less sensitive to other jobs taking the cores for a while.
    """
    timed = [x for x in step_seconds[skip:] if x is not None]  # None: a resumed process's first step
    return len(timed) * batch_size / max(sum(timed), 1e-9), batch_size / max(float(np.median(timed)), 1e-9)


def load_average():
    return "load average {:.2f} {:.2f} {:.2f} (1/5/15 min)".format(*os.getloadavg())


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------


def read_flickr(flickr_dir):
    """`{split: [(image name, [captions in caption_idx order])]}` from captions.tsv."""
    groups = {}
    with open(os.path.join(flickr_dir, "captions.tsv"), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = sorted(reader, key=lambda row: int(row["caption_idx"]))  # stable: file order per index
    for row in rows:
        groups.setdefault(row["split"], {}).setdefault(row["image"], []).append(row["caption"])
    return {split: list(images.items()) for split, images in groups.items()}


# The arguments a saved run's result depends on; `--reuse` takes a run only if all match.
RUN_KEYS = ("model", "steps", "batch_size", "image_size", "learning_rate", "warmup_steps",
            "weight_decay", "matched_recipe", "cifar_images", "cifar_templates", "data_dir", "keras_data")
# Keys added after runs were saved, with the value those runs had.
_RUN_KEY_DEFAULTS = {"keras_data": "images"}
KERAS_DATA = ("images", "pairs", "open_clip_rows")


def _run_key(args):
    return {key: getattr(args, key) for key in RUN_KEYS}


def write_result(args, run_dir, result):
    """`run_dir/result.json`: one run's figures with the arguments that produced them."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump({"run_key": _run_key(args), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "result": result}, f, indent=1)


def reusable_result(args, run_dir):
    """The saved result of this run under `--reuse` when its arguments match, else None."""
    path = os.path.join(run_dir, "result.json")
    if not args.reuse or not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if {**_RUN_KEY_DEFAULTS, **saved.get("run_key", {})} != _run_key(args):
        print(f"Not reusing {path}: it was trained with {saved.get('run_key')}, this run has "
              f"{_run_key(args)}", flush=True)
        return None
    return {**saved["result"], "finished_at": saved["finished_at"]}


def write_keras_clip_table(train, path):
    """`image<TAB>caption`, one row per caption (keras_clip groups them by image).

    keras_clip reads tab-separated files without quote handling, so captions are
    written as they are.
    """
    with open(path, "w", encoding="utf-8") as f:
        f.write("image\tcaption\n")
        for image, captions in train:
            f.writelines(f"{image}\t{caption}\n" for caption in captions)


def write_keras_clip_rows_table(open_clip_table, num_images, image_dir, root, path):
    """open_clip's rows as a keras_clip table with one record per row.

    keras_clip's table reader makes one record of all rows naming the same image, so
    each pass's rows name their image through their own folder, `root/pNN`, a symbolic
    link to `image_dir`: the same files, one caption per record, as open_clip reads
    them. `write_open_clip_table` writes passes of `num_images` rows in order.

    Returns:
        Number of rows.
    """
    with open(open_clip_table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    os.makedirs(root, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("image\tcaption\n")
        for index, row in enumerate(rows):
            folder = f"p{index // num_images:03d}"
            link = os.path.join(root, folder)
            if not os.path.islink(link):
                os.symlink(os.path.abspath(image_dir), link)
            caption = " ".join(row["title"].split())  # keras_clip reads tabs unquoted
            f.write(f"{folder}/{os.path.basename(row['filepath'])}\t{caption}\n")
    return len(rows)


def write_open_clip_table(train, image_dir, num_rows, seed, path):
    """open_clip's CSV: `filepath<TAB>title`, exactly `num_rows` rows.

    Consecutive passes over the training images, each image in a pass with one of
    its captions (a different one each pass until all are used), in a fresh random
    order per pass; the table is cut after `num_rows` rows. open_clip's DataLoader
    then shuffles the rows. Standard CSV quoting (pandas reads it).

    Returns:
        Number of passes (the last one possibly partial).
    """
    rng = np.random.default_rng(seed)
    caption_orders = [rng.permutation(len(captions)) for _, captions in train]
    passes = math.ceil(num_rows / len(train))
    rows = []
    for p in range(passes):
        for i in rng.permutation(len(train)):
            image, captions = train[i]
            order = caption_orders[i]
            rows.append((os.path.join(image_dir, image), captions[order[p % len(order)]]))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows[:num_rows])
    return passes


def load_test_sets(data_dir, flickr, cifar_images=None, cifar_templates="simple"):
    """Encoded images, captions and labels of the two evaluation sets (`cifar_images`
    CIFAR-10 test images: the seeded subset of `keras_clip.evaluate --max_examples`)."""
    from keras_clip.evaluation.datasets import _select
    from keras_clip.zero_shot_data import load_dataset_prompts

    image_dir = os.path.join(data_dir, "flickr8k", "images")
    test = flickr["test"]
    retrieval = {
        "images": [open(os.path.join(image_dir, image), "rb").read() for image, _ in test],
        "captions": [caption for _, captions in test for caption in captions],
        "text_to_image": np.array([i for i, (_, captions) in enumerate(test) for _ in captions]),
    }
    cifar_dir = os.path.join(data_dir, "cifar10_test")
    class_names, templates = load_dataset_prompts("cifar10")
    with open(os.path.join(cifar_dir, "classes.txt")) as f:
        on_disk = [line.strip() for line in f if line.strip()]
    if on_disk != class_names:
        raise ValueError(f"CIFAR-10 classes.txt {on_disk} differs from keras_clip's {class_names}")
    with open(os.path.join(cifar_dir, "labels.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    # The seeded random subset `python -m keras_clip.evaluate --max_examples` uses (labels.csv
    # is sorted by class: its first rows would be one class).
    rows = [rows[i] for i in _select(len(rows), cifar_images, seed=0)]
    if cifar_templates == "simple":
        templates = list(SIMPLE_TEMPLATES)
    cifar = {
        "images": [open(os.path.join(cifar_dir, row["path"]), "rb").read() for row in rows],
        "labels": np.array([int(row["label"]) for row in rows]),
        "class_names": class_names,
        "templates": templates,
    }
    return retrieval, cifar


# ----------------------------------------------------------------------------------
# Architecture: keras_clip's preset as an open_clip model config
# ----------------------------------------------------------------------------------


def open_clip_model_config(model):
    """open_clip's model-config JSON for a keras_clip ViT `CLIP` (the converter's own)."""
    from keras_clip.convert.writers import open_clip_model_config as config_of

    return config_of(model)


def open_clip_param_counts(checkpoint_path):
    """`{"visual", "text", "total"}` parameter counts of an open_clip training checkpoint."""
    import torch

    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    visual = sum(v.numel() for k, v in state.items() if k.startswith("visual."))
    total = sum(v.numel() for v in state.values())
    return {"visual": visual, "text": total - visual, "total": total}


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------


def initial_model(args):
    """A keras_clip `CLIP` of `--model` at `--image_size`, weights drawn from the current seed."""
    import keras_clip

    spec = MODELS[args.model]
    if spec["preset"]:
        return keras_clip.CLIP.from_preset(spec["preset"], image_size=args.image_size)
    return keras_clip.CLIP(**dict(spec["kwargs"], image_size=args.image_size))


def train_keras_clip(args, run, table, image_dir, run_dir, group_captions=True):
    """One keras_clip run in a fresh process (as open_clip's), so no torch is loaded in it.
    keras_clip shuffles a table whole every pass, so no shuffle buffer is set.

    The run checkpoints every `--checkpoint_every` steps and logs each step's loss and time
    to `run_dir/steps.jsonl`. A run that was interrupted (no result.json) resumes from its
    last checkpoint when it was started with the same arguments (`run_dir/run_key.json`);
    keras_clip's resume is exact (tests/test_training_run.py), so the trained model and the
    losses are those of an uninterrupted run. The key holds the benchmark's arguments and a
    hash of keras_clip's code (`code_hash`): `training.run` itself refuses a checkpoint of
    another model or data reading, but not of another learning rate or optimizer setting.
    Only the timing has gaps: the first step of each process is left out of the step times
    (None), and `wall_seconds` is NaN. Otherwise the run starts afresh.
    """
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_train_keras_clip, (args, run, table, image_dir, run_dir, group_captions))
    # Process start-up included, as for open_clip; unknown across processes.
    result["wall_seconds"] = float("nan") if result["resumed"] else time.perf_counter() - start
    return result


def code_hash():
    """sha256 of keras_clip's sources and this script: a resume needs the same code."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "keras_clip").rglob("*.py")) + [pathlib.Path(__file__).resolve()]:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _keras_run_key(args, run, table, group_captions):
    return {**_run_key(args), **run, "table": os.path.abspath(table), "group_captions": group_captions,
            "checkpoint_every": args.checkpoint_every, "code_hash": code_hash()}


def _resumable(run_dir, key):
    """True when `run_dir` holds an interrupted run started with `key` whose step log
    covers every step up to its newest checkpoint."""
    path = os.path.join(run_dir, "run_key.json")
    if not os.path.exists(path) or os.path.exists(os.path.join(run_dir, "result.json")):
        return False
    with open(path) as f:
        if json.load(f) != key:
            return False
    folder = os.path.join(run_dir, "model", "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    checkpoints = [int(m.group(1)) for m in (re.fullmatch(r"ckpt-(\d+)\.index", n) for n in names) if m]
    if not checkpoints:
        return False
    steps = read_step_log(os.path.join(run_dir, "steps.jsonl"))[3]
    return set(range(1, max(checkpoints) + 1)) <= set(steps)


def read_step_log(path):
    """`steps.jsonl` -> `(losses, step_seconds, process_starts, steps)` in step order: a step
    logged twice (redone after a resume) keeps its last entry."""
    steps = {}
    if not os.path.exists(path):
        return [], [], [], []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                entry = json.loads(line)
                steps[entry["step"]] = entry
    ordered = [steps[k] for k in sorted(steps)]
    starts = [entry["step"] for entry in ordered if entry["seconds"] is None]
    return [e["loss"] for e in ordered], [e["seconds"] for e in ordered], starts, sorted(steps)


def _train_keras_clip(args, run, table, image_dir, run_dir, group_captions):
    key = _keras_run_key(args, run, table, group_captions)
    resuming = _resumable(run_dir, key)
    if not resuming:
        shutil.rmtree(run_dir, ignore_errors=True)  # run() would resume from old checkpoints
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "run_key.json"), "w") as f:
            json.dump(key, f, indent=1)
    # This process only trains: its output (progress bar, TF's logs) goes to the log.
    log = open(os.path.join(run_dir, "train.log"), "a" if resuming else "w")
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)

    import keras

    from keras_clip import training

    preset = os.path.join(run_dir, "initial_preset")
    if not resuming:
        keras.utils.set_random_seed(run["seed"])  # the initial weights, as run() would draw them
        initial_model(args).save_to_preset(preset)
    else:
        print(f"Resuming the interrupted run in {run_dir}", flush=True)
    beta_1, beta_2, epsilon, rule = optimizer_settings("keras_clip", run["settings"], args.matched_recipe)
    config = training.TrainConfig(
        preset=preset, train_data=table, val_data="", image_root=image_dir,
        global_batch_size=args.batch_size, steps=args.steps, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        precision=PRECISIONS[run["precision"]][0], seed=run["seed"],
        model_dir=os.path.join(run_dir, "model"), checkpoint_every=args.checkpoint_every,
        beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, weight_decay_rule=rule,
        group_captions=group_captions,
    )
    step_log = os.path.join(run_dir, "steps.jsonl")
    if resuming:
        with open(step_log, "a") as f:
            f.write("\n")  # ends a line the kill may have cut
    last_end = [None]

    # Step k's duration: from the end of step k-1 (data wait included), as open_clip's
    # "Batch (t)"; the first step of a process (tracing) is timed by the library.
    def on_step(step, logs):
        now = time.perf_counter()
        seconds = None if last_end[0] is None else now - last_end[0]
        last_end[0] = now
        with open(step_log, "a") as f:  # before the step's checkpoint is written
            f.write(json.dumps({"step": step, "loss": float(logs["loss"]), "seconds": seconds}) + "\n")

    summary = training.run(config, step_callback=on_step)
    sys.stdout.flush(), sys.stderr.flush()
    losses, step_seconds, starts, _ = read_step_log(step_log)
    if len(losses) != args.steps:
        os.remove(os.path.join(run_dir, "run_key.json"))  # the next invocation starts afresh
        raise RuntimeError(f"{step_log} has {len(losses)} steps, expected {args.steps}")
    if not resuming:  # one process: step 1 as the library timed it
        step_seconds[0] = summary["first_step_seconds"]
    return {
        "step_seconds": step_seconds,
        "losses": losses,
        "resumed": resuming,
        "resumed_at_steps": starts[1:],  # every process start after the first
        "library_samples_per_second": summary["samples_per_second"],
        "model_path": os.path.join(config.model_dir, "preset"),
    }


_OPEN_CLIP_STEP = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): [\d.]+, ([\d.e+-]+)/s, .*? Loss: ([\d.]+) \("
)


def train_open_clip(args, run, table, config_dir, model_name, run_dir):
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    beta_1, beta_2, epsilon, _ = optimizer_settings("open_clip", run["settings"], args.matched_recipe)
    flags = [
        "--dataset-type", "csv", "--train-data", table, "--csv-separator", "\t",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--model", model_name, "--batch-size", str(args.batch_size), "--epochs", "1",
        "--lr", str(args.learning_rate), "--warmup", str(args.warmup_steps),
        "--wd", str(args.weight_decay), "--lr-scheduler", "cosine",
        "--beta1", str(beta_1), "--beta2", str(beta_2), "--eps", str(epsilon),
        "--precision", PRECISIONS[run["precision"]][1], "--device", "cpu", "--workers", "1",
        "--seed", str(run["seed"]), "--logs", os.path.join(run_dir, "logs"), "--name", "run",
        "--log-every-n-steps", "1", "--save-frequency", "1", "--report-to", "",
    ]
    command = [sys.executable, str(WRAPPER), "--model_config_dir", config_dir, "--", *flags]
    log_path = os.path.join(run_dir, "train.log")
    with open(log_path, "w") as log:
        start = time.perf_counter()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        wall = time.perf_counter() - start
    if result.returncode:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-30:])
        raise RuntimeError(f"open_clip training failed (exit {result.returncode}); {log_path} ends:\n{tail}")
    steps = {}
    with open(os.path.join(run_dir, "logs", "run", "out.log")) as log:
        for match in _OPEN_CLIP_STEP.finditer(log.read()):
            seen, per_second, loss = int(match[1]), float(match[2]), float(match[3])
            steps[seen // args.batch_size] = (args.batch_size / per_second, loss)
    if sorted(steps) != list(range(1, args.steps + 1)):
        raise RuntimeError(f"Expected {args.steps} logged open_clip steps, parsed {len(steps)} ({log_path})")
    return {
        "step_seconds": [steps[k][0] for k in sorted(steps)],
        "losses": [steps[k][1] for k in sorted(steps)],
        "wall_seconds": wall,
        "model_path": os.path.join(run_dir, "logs", "run", "checkpoints", "epoch_1.pt"),
    }


# ----------------------------------------------------------------------------------
# Evaluation (the same code for both frameworks)
# ----------------------------------------------------------------------------------


def heldout_contrastive_loss(image_embeddings, text_embeddings, text_to_image, logit_scale, batch_size):
    """CLIP's symmetric cross-entropy on held-out pairs, in float64 numpy: for each caption
    slot k (every image's k-th caption), the images in order in batches of `batch_size`
    against their k-th captions; the mean over all batches. A loss is less noisy than
    recall@K: every pair counts with its margin, not only whether it ranks first.
    """
    images = np.asarray(image_embeddings, np.float64)
    texts = np.asarray(text_embeddings, np.float64)
    text_to_image = np.asarray(text_to_image)
    per_image = np.bincount(text_to_image, minlength=len(images))
    if per_image.min() != per_image.max():
        raise ValueError(f"Every image needs as many captions; counts range {per_image.min()}-{per_image.max()}")

    def cross_entropy(logits):  # (n, n), targets on the diagonal
        logits = logits - logits.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - np.diag(logits)))

    order = np.argsort(text_to_image, kind="stable")  # captions grouped by image, in order
    losses = []
    for k in range(per_image[0]):
        slot = texts[order[k::per_image[0]]]  # (N, E): the k-th caption of each image
        for start in range(0, len(images) - batch_size + 1, batch_size):
            logits = logit_scale * images[start:start + batch_size] @ slot[start:start + batch_size].T
            losses.append((cross_entropy(logits) + cross_entropy(logits.T)) / 2)
    return float(np.mean(losses))


def evaluate(model, retrieval, cifar, loss_batch_size=125):
    from keras_clip.evaluation import evaluate_retrieval
    from keras_clip.evaluation.retrieval import encode_images, encode_texts
    from keras_clip.zero_shot import ZeroShotClassifier

    metrics = evaluate_retrieval(model, retrieval["images"], retrieval["captions"],
                                 retrieval["text_to_image"], image_batch_size=250, text_batch_size=500)
    # Held-out loss at the trained logit scale, batches of 125 (8 per caption slot).
    images = encode_images(model, retrieval["images"], batch_size=250)
    texts = encode_texts(model, retrieval["captions"], batch_size=500)
    metrics["test_loss"] = heldout_contrastive_loss(
        images, texts, retrieval["text_to_image"], float(np.asarray(model.logit_scale())), loss_batch_size)
    classifier = ZeroShotClassifier(model, cifar["class_names"], templates=cifar["templates"])
    predictions = classifier.predict_labels(cifar["images"], batch_size=500)
    metrics["cifar10_top1"] = 100.0 * float(np.mean(predictions == cifar["labels"]))
    return metrics


# ----------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------

_COLUMNS = [
    ("pairs/s", "pairs_per_second", "{:.1f}"),
    ("median", "median_pairs_per_second", "{:.1f}"),
    ("train s", "train_seconds", "{:.1f}"),
    ("wall s", "wall_seconds", "{:.1f}"),
    ("loss", "final_loss", "{:.3f}"),
    ("I2T R@1", "image_to_text_R@1", "{:.1f}"),
    ("R@5", "image_to_text_R@5", "{:.1f}"),
    ("R@10", "image_to_text_R@10", "{:.1f}"),
    ("T2I R@1", "text_to_image_R@1", "{:.1f}"),
    ("R@5", "text_to_image_R@5", "{:.1f}"),
    ("R@10", "text_to_image_R@10", "{:.1f}"),
    ("CIFAR-10", "cifar10_top1", "{:.1f}"),
    ("test loss", "test_loss", "{:.3f}"),
]


_FIGURES = [key for _, key, _ in _COLUMNS if key in (
    "final_loss", "image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
    "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "cifar10_top1")]


def _group(result):
    framework = result["framework"]
    if framework == "keras_clip" and result.get("keras_data", "images") != "images":
        framework += "+" + result["keras_data"]
    return (framework, result["precision"], result["settings"])


def format_table(results, frameworks):
    """Per run, then per (framework, precision, settings): mean and seed spread (max - min)
    of every figure, then keras_clip - open_clip per figure against keras_clip's spread.

    Returns:
        `(text, summary)`: summary maps "framework/precision/settings" to
        `{"mean": {...}, "spread": {...}, "seeds": [...]}`.
    """
    label_width = 28
    header = f"{'run':<{label_width}} {'seed':>4} " + " ".join(f"{title:>8}" for title, _, _ in _COLUMNS)
    lines = [header, "-" * len(header)]

    def label(group):
        return "/".join(group)

    for result in results:
        cells = " ".join(f"{fmt.format(result.get(key, float('nan'))):>8}" for _, key, fmt in _COLUMNS)
        lines.append(f"{label(_group(result)):<{label_width}} {result['seed']:>4} {cells}")
    lines.append("-" * len(header))
    summary = {}
    for group in dict.fromkeys(_group(r) for r in results):
        runs = [r for r in results if _group(r) == group]
        mean = {key: float(np.mean([r.get(key, float("nan")) for r in runs])) for _, key, _ in _COLUMNS}
        spread = {key: float(np.ptp([r.get(key, float("nan")) for r in runs])) for _, key, _ in _COLUMNS}
        summary[label(group)] = {"mean": mean, "spread": spread, "seeds": [r["seed"] for r in runs]}
        cells = " ".join(f"{fmt.format(mean[key]):>8}" for _, key, fmt in _COLUMNS)
        lines.append(f"{label(group):<{label_width}} {'mean':>4} {cells}")
        cells = " ".join(f"{fmt.format(spread[key]):>8}" for _, key, fmt in _COLUMNS)
        lines.append(f"{'':<{label_width}} {'sprd':>4} {cells}")
    lines.append("spread: max - min over the seeds of that row's runs.")
    # keras_clip - open_clip per figure (same precision and settings).
    for keras_label, precision, settings in dict.fromkeys(
            g for g in map(_group, results) if g[0].startswith("keras_clip")):
        k, o = summary.get(f"{keras_label}/{precision}/{settings}"), summary.get(f"open_clip/{precision}/{settings}")
        if not (k and o):
            continue
        parts = []
        for key in _FIGURES:
            delta = k["mean"][key] - o["mean"][key]
            better = delta <= 0 if key == "final_loss" else delta >= 0
            verdict = "ok" if better or abs(delta) < k["spread"][key] else "SHORT"
            parts.append(f"{key} {delta:+.2f} (spread {k['spread'][key]:.2f}, {verdict})")
        ratio = k["mean"]["pairs_per_second"] / o["mean"]["pairs_per_second"]
        lines.append(f"{keras_label} - open_clip, {precision}/{settings}: " + "; ".join(parts)
                     + f"; training pairs/s {ratio:.2f}x")
    return "\n".join(lines), summary


def markdown_table(summary):
    """The README table: mean (seed spread) per figure, one row per framework/precision/settings."""
    keys = ["image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1",
            "text_to_image_R@5", "text_to_image_R@10", "cifar10_top1", "final_loss"]
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, row in summary.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row['mean'][k]:.{3 if k == 'final_loss' else 1}f} ({row['spread'][k]:.{3 if k == 'final_loss' else 1}f})"
            for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    print("Command: python benchmarks/train_vs_open_clip.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    print(f"Hardware: {describe_machine()}")
    print(f"At start: {load_average()}")
    start_time = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)

    import keras_clip  # noqa: F401

    flickr_dir = os.path.join(args.data_dir, "flickr8k")
    image_dir = os.path.join(flickr_dir, "images")
    flickr = read_flickr(flickr_dir)
    train = flickr["train"]
    pairs = args.steps * args.batch_size
    steps_per_epoch = len(train) // args.batch_size

    # Architecture, and its twin among open_clip's model configs.
    reference = initial_model(args)
    counts = reference.count_params_by_tower()
    activation = reference.activation
    model_name = f"keras-clip-{args.model}-{args.image_size}"
    config_dir = os.path.join(args.out_dir, "open_clip_configs")
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, f"{model_name}.json"), "w") as f:
        json.dump(open_clip_model_config(reference), f, indent=2)
    print(f"Model: {args.model} at {args.image_size}px (open_clip config {model_name!r}); keras_clip "
          f"parameters {counts['total']:,} (visual {counts['visual']:,}, text {counts['text']:,})")
    del reference

    keras_table = os.path.join(args.out_dir, "train_keras_clip.tsv")
    write_keras_clip_table(train, keras_table)
    print(f"Schedule: {args.steps} steps x {args.batch_size} pairs = {pairs:,} pairs; AdamW, peak lr "
          f"{args.learning_rate}, {args.warmup_steps} warm-up steps then cosine to 0, weight decay "
          f"{args.weight_decay}; precisions {args.precision} (bf16: keras_clip mixed_bfloat16, "
          f"open_clip amp_bf16); seeds {args.seeds}")
    for settings in args.settings:
        for framework in args.frameworks:
            b1, b2, eps, rule = optimizer_settings(framework, settings, args.matched_recipe)
            print(f"Settings {settings}, {framework}: betas {b1}/{b2}, epsilon {eps}, weight decay "
                  f"on {'every matrix (embeddings included)' if rule == 'all_matrices' else 'matrices but not the embeddings'}")
    if args.keras_data == "images":
        keras_seen = (f"the {len(train):,} Flickr8k train images, one of their 5 captions drawn per "
                      f"image per epoch, epochs of {steps_per_epoch} steps (reshuffled, last partial "
                      "batch dropped)")
    elif args.keras_data == "pairs":
        num_pairs = sum(len(captions) for _, captions in train)
        keras_seen = (f"the {num_pairs:,} Flickr8k train image-caption pairs, one record each "
                      f"(--group_captions=false), every pair once per epoch of "
                      f"{num_pairs // args.batch_size} steps, fully shuffled")
    else:
        keras_seen = "open_clip's rows below for the same seed, one record each, fully shuffled, one epoch"
    print(f"Data seen: keras_clip: {keras_seen}. open_clip: a CSV of {pairs:,} rows written per seed "
          f"({math.ceil(pairs / len(train))} pass(es) over the {len(train):,} images, a different "
          f"caption each pass), one open_clip epoch of {args.steps} steps, DataLoader shuffle.")
    print("Aligned: the initialisation scheme (the reference's). Not aligned (each trainer's own "
          "random draws and choices): the initial weights drawn, data order and crops, input "
          "pipeline (tf.data vs DataLoader with 1 worker).")
    skip = max(min(args.warmup_skip, args.steps // 4), 0)
    print(f"pairs/s: training steps {skip + 1}-{args.steps} (first {skip} left out); median: "
          "batch size / median step time of the same steps; train s: all steps; wall s: the whole "
          "training process (start-up, imports, data setup, saving included); loss: mean of the "
          "last 10 steps' training losses.")
    retrieval, cifar = load_test_sets(args.data_dir, flickr, args.cifar_images, args.cifar_templates)
    print("Evaluation (keras_clip code for both, float32; open_clip checkpoints loaded with "
          f"CLIP.from_preset): Flickr8k test {len(flickr['test']):,} images / "
          f"{len(retrieval['captions']):,} captions recall@K; CIFAR-10 zero-shot top-1 on "
          f"{len(cifar['labels']):,} test images (per class {np.bincount(cifar['labels']).tolist()}), "
          f"{len(cifar['templates'])} templates {cifar['templates'] if len(cifar['templates']) < 5 else ''}",
          flush=True)

    import keras_clip

    results = []
    for seed in args.seeds:
        for precision in args.precision:
            for settings in args.settings:
                for framework in args.frameworks:
                    run = {"seed": seed, "precision": precision, "settings": settings}
                    name = f"{framework}/{precision}/{settings} seed {seed}"
                    folder = framework
                    if framework == "keras_clip" and args.keras_data != "images":
                        folder = f"keras_clip_{args.keras_data}"
                    run_dir = os.path.join(args.out_dir, folder, precision, settings, f"seed_{seed}")
                    saved = reusable_result(args, run_dir)
                    if saved is not None:
                        results.append(saved)
                        print(f"[{name}] reused {run_dir}/result.json (trained {saved['finished_at']})",
                              flush=True)
                        continue
                    print(f"[{name}] training ({run_dir}/train.log) ...", flush=True)
                    table = os.path.join(args.out_dir, f"train_open_clip_seed_{seed}.csv")
                    if framework == "keras_clip" and args.keras_data == "open_clip_rows":
                        write_open_clip_table(train, image_dir, pairs, seed, table)
                        rows_table = os.path.join(args.out_dir, f"train_keras_clip_rows_seed_{seed}.tsv")
                        write_keras_clip_rows_table(
                            table, len(train), image_dir, os.path.join(args.out_dir, "rows_images"), rows_table)
                        trained = train_keras_clip(args, run, rows_table, os.path.join(args.out_dir, "rows_images"),
                                                   run_dir)
                    elif framework == "keras_clip" and args.keras_data == "pairs":
                        trained = train_keras_clip(args, run, keras_table, image_dir, run_dir,
                                                   group_captions=False)
                    elif framework == "keras_clip":
                        trained = train_keras_clip(args, run, keras_table, image_dir, run_dir)
                    else:
                        write_open_clip_table(train, image_dir, pairs, seed, table)
                        trained = train_open_clip(args, run, table, config_dir, model_name, run_dir)
                        open_clip_counts = open_clip_param_counts(trained["model_path"])
                        if open_clip_counts != counts:
                            raise RuntimeError(f"Parameter counts differ: open_clip {open_clip_counts}, "
                                               f"keras_clip {counts}")
                    # open_clip's .pt files do not record the activation; keras_clip presets do.
                    overrides = {"activation": activation} if framework == "open_clip" else {}
                    model = keras_clip.CLIP.from_preset(trained["model_path"], dtype="float32", **overrides)
                    if model.count_params_by_tower() != counts:
                        raise RuntimeError(f"Reloaded {framework} model has {model.count_params_by_tower()} parameters")
                    start = time.perf_counter()
                    metrics = evaluate(model, retrieval, cifar)
                    del model
                    pairs_per_second, median = throughput(trained["step_seconds"], args.batch_size, skip)
                    result = {
                        "framework": framework, **run, "keras_data": args.keras_data,
                        "pairs_per_second": pairs_per_second, "median_pairs_per_second": median,
                        "train_seconds": float(sum(x for x in trained["step_seconds"] if x is not None)),
                        "wall_seconds": trained["wall_seconds"],
                        "final_loss": float(np.mean(trained["losses"][-10:])),
                        **metrics,
                        "eval_seconds": time.perf_counter() - start,
                        "losses": trained["losses"], "step_seconds": [None if x is None else float(x) for x in trained["step_seconds"]],
                        "resumed_at_steps": trained.get("resumed_at_steps", []),  # keras_clip only
                    }
                    results.append(result)
                    write_result(args, run_dir, result)
                    print(f"[{name}] {pairs_per_second:.1f} pairs/s, loss {result['final_loss']:.3f}, "
                          f"I2T R@1/5/10 {result['image_to_text_R@1']:.1f}/{result['image_to_text_R@5']:.1f}/"
                          f"{result['image_to_text_R@10']:.1f}, T2I R@1 {result['text_to_image_R@1']:.1f}, "
                          f"CIFAR-10 {result['cifar10_top1']:.1f}% (evaluated in {result['eval_seconds']:.0f} s)",
                          flush=True)

    table, summary = format_table(results, args.frameworks)
    print()
    print(table)
    print("Chance: CIFAR-10 top-1 10.0; R@1/5/10 about 0.1/0.5/1.0 both ways (K in 1,000).")
    print()
    print(markdown_table(summary))
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "parameters": counts, "results": results, "summary": summary},
                  f, indent=2)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(markdown_table(summary) + "\n")
    print(f"At end: {load_average()}; total time {(time.perf_counter() - start_time) / 60:.1f} min")
    print(f"Results written to {os.path.join(args.out_dir, 'results.json')} and table.md")


if __name__ == "__main__":
    main()
