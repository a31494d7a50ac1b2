"""The one test harness: tiny model configs, the PIL reference pipeline, and test data.

Everything the default suite needs is made here, from the repository and its declared
packages only, so a fresh clone runs its tests with no `../shared` beside it:

- Real photographs: `matplotlib` (test extra) ships `grace_hopper.jpg` in its
  `mpl-data/sample_data` (a US Navy portrait, public domain; shipped under matplotlib's
  licence). Crops of it at many positions, scales, flips and colour balances, re-encoded
  as the datasets are encoded, give photos with real structure.
- Captions: sentences in Flickr8k's style (five per image, spaces before punctuation)
  drawn from a grammar, mixed with real English sentences from the Python standard
  library's own docstrings (quotes, digits, hyphens, parentheses), so tokenizer parity
  runs on text nobody wrote for this test.
- Class datasets: CIFAR-10's and MNIST's on-disk layouts with images whose colour, shape
  and texture depend on the class (MNIST digits drawn with PIL's built-in font).

Each builder writes the same layout as the real folder in `../shared/data`, so a test
runs unchanged on either; `tests/conftest.py` chooses which (`--data_dir`).
"""
import csv
import gzip
import io
import os
import pathlib
import struct

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# ---------------------------------------------------------------------------
# Tiny keras_clip configurations (constructor kwargs), shared by every test
# ---------------------------------------------------------------------------

# 32 px ViT, 16-token text, width 32: builds, trains and exports in seconds.
TINY_VIT = dict(
    embed_dim=32, image_size=32, vision_architecture="vit", vision_num_layers=1,
    vision_hidden_dim=32, vision_num_heads=2, vision_patch_size=8, context_length=16,
    text_hidden_dim=32, text_num_layers=1, text_num_heads=2,
)
# The same with 16 px patches (a 2x2 grid): the export and serving tests' model.
TINY_VIT_P16 = dict(TINY_VIT, vision_patch_size=16)
# Width 64 and 24 tokens: the training, resume and multi-worker tests' model.
TINY_VIT_TRAIN = dict(TINY_VIT, vision_hidden_dim=64, text_hidden_dim=64, context_length=24)
# A 500-token vocabulary and 12 tokens: the step and loss tests, with hand-made token ids.
# (tests/scripts/step_common.py spells it out for the scripts run alone in subprocesses.)
TINY_VIT_SMALL_VOCAB = dict(TINY_VIT_TRAIN, context_length=12, vocabulary_size=500, end_token_id=499)
# keras_clip kwargs of `tests.reference_models.SMALL_VIT` / `SMALL_RESNET` (the open_clip
# side): 64 px, width 128 text, OpenAI's head width of 64 where the format infers heads.
SMALL_VIT = dict(embed_dim=64, image_size=64, vision_architecture="vit", vision_patch_size=16,
                 vision_num_layers=2, vision_hidden_dim=128, vision_num_heads=2,
                 text_hidden_dim=128, text_num_layers=2, text_num_heads=2)
SMALL_RESNET = dict(embed_dim=64, image_size=64, vision_architecture="resnet",
                    vision_num_layers=[1, 2, 1, 1], vision_hidden_dim=16, vision_num_heads=8,
                    text_hidden_dim=128, text_num_layers=2, text_num_heads=2)


def tiny_clip(seed=0, **overrides):
    """A random-weight `CLIP(**TINY_VIT)` (with `overrides`), seeded for repeatability."""
    import keras

    from keras_clip import CLIP

    keras.utils.set_random_seed(seed)
    return CLIP(**dict(TINY_VIT, **overrides))


def perturb_weights(model, seed=0):
    """Moves every variable of a keras_clip `CLIP` off its initial value (LayerNorm gains,
    biases, BatchNorm statistics...), so a misplaced or transposed tensor shows."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = variable.numpy()
        if "moving_variance" in variable.path:
            value = 0.5 + rng.random(value.shape)
        elif "log_scale" in variable.path:
            value = np.full(value.shape, np.log(20.0))
        else:
            value = value + 0.1 * max(float(value.std()), 0.02) * rng.standard_normal(value.shape)
        variable.assign(value.astype(np.float32))
    return model


def unit_rows(rng, n, d):
    """`(n, d)` float32 rows of unit norm (features as the towers return them)."""
    x = rng.normal(size=(n, d)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def small_vocab_batch(n, seed=0):
    """A `{"images", "token_ids"}` batch for `TINY_VIT_SMALL_VOCAB`: random pixels and
    token ids with the end token (499) at varying positions, zeros after it."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 499, size=(n, 12))
    for i in range(n):
        tokens[i, 2 + i % 9] = 499
        tokens[i, 3 + i % 9:] = 0
    return {"images": rng.normal(size=(n, 32, 32, 3)).astype("float32"),
            "token_ids": tokens.astype("int32")}


# ---------------------------------------------------------------------------
# Reference: OpenAI's image transform with PIL and numpy
# ---------------------------------------------------------------------------


def pil_resize_and_crop(image, image_size, resample=Image.Resampling.BICUBIC):
    """OpenAI's `_transform` before normalisation: short side to `image_size` with PIL
    (torchvision's size arithmetic), center crop (round-half-even offsets), then RGB.

    Returns uint8 (S, S, 3). `image` is a PIL image, bytes or a path.
    """
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif not isinstance(image, Image.Image):
        image = Image.open(image)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = image_size, int(image_size * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != (w, h):
        image = image.resize(size, resample)
    w, h = image.size
    top = int(round((h - image_size) / 2.0))
    left = int(round((w - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image.convert("RGB"))


def normalise(pixels, mean=OPENAI_MEAN, std=OPENAI_STD):
    """ToTensor + Normalize in float32, channels last."""
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def to_levels(normalised, mean=OPENAI_MEAN, std=OPENAI_STD):
    """Inverse of `normalise`, rounded back to 0-255 levels."""
    levels = (normalised * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255.0
    return np.round(levels).astype(np.int64)


def pil_preprocess(image, image_size):
    """OpenAI's full transform: `pil_resize_and_crop`, then `normalise`. (S, S, 3)."""
    return normalise(pil_resize_and_crop(image, image_size))


# ---------------------------------------------------------------------------
# Photographs and captions
# ---------------------------------------------------------------------------


def sample_photo():
    """The real photograph matplotlib ships (RGB PIL image, 512x600)."""
    import matplotlib

    path = pathlib.Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return Image.open(path).convert("RGB")


def photo_crops(count, size=(224, 224), seed=0):
    """`count` distinct photo-like RGB images of `size`: random crops of the sample photo
    (scale 15-100% of the short side, any aspect), flips, rotations by 90 degrees and
    colour/contrast changes, resized with PIL's bicubic filter."""
    photo = sample_photo()
    rng = np.random.default_rng(seed)
    width, height = photo.size
    images = []
    for _ in range(count):
        side = int(min(width, height) * rng.uniform(0.15, 1.0))
        aspect = rng.uniform(0.6, 1.6)
        w = min(width, max(8, int(side * aspect ** 0.5)))
        h = min(height, max(8, int(side / aspect ** 0.5)))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        image = photo.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.rotate(90 * int(rng.integers(0, 4)), expand=True)
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.2, 1.8))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.4))
        channels = list(image.split())
        order = rng.permutation(3)
        image = Image.merge("RGB", [channels[i] for i in order])
        images.append(image.resize(size, Image.Resampling.BICUBIC))
    return images


_SUBJECTS = ["A man", "A woman", "Two dogs", "A little girl", "A black dog", "A boy",
             "A group of people", "An older man", "Three children", "A brown and white dog",
             "A young woman", "A person", "Two men", "A cyclist", "A small child"]
_ACTIONS = ["is running through", "jumps over", "is sitting on", "plays in", "walks along",
            "is standing near", "rides a bike past", "is climbing", "looks at", "lies on",
            "splashes through", "is throwing a ball across", "waits beside"]
_PLACES = ["the grass", "a red ball", "the snow", "a wooden bench", "the beach",
           "a busy street", "a rocky hill", "the water", "a fence", "a crowd", "the stairs",
           "a blue tent", "a muddy field", "the sidewalk", "a large rock"]
_TAILS = [" .", " .", " .", " , smiling .", " while others watch .", " in the sun .",
          " at night .", " ."]


def _stdlib_sentences():
    """Real English sentences: the first lines of standard-library docstrings."""
    import argparse
    import collections
    import csv as csv_module
    import json
    import textwrap
    import unittest

    sentences = []
    for module in (argparse, collections, csv_module, json, textwrap, unittest, os, io):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name, None), "__doc__", None)
            if isinstance(doc, str):
                line = doc.strip().split("\n")[0].strip()
                if 12 <= len(line) <= 200 and not set(line) & set('"\\\t'):
                    sentences.append(line)
    return list(dict.fromkeys(sentences))


def captions(count, seed=0):
    """`count` captions: two thirds Flickr8k-style sentences from a grammar, one third
    real sentences from standard-library docstrings."""
    rng = np.random.default_rng(seed)
    real = _stdlib_sentences()
    out = []
    for i in range(count):
        if i % 3 == 2 and real:
            out.append(real[int(rng.integers(len(real)))])
        else:
            out.append(" ".join([_SUBJECTS[rng.integers(len(_SUBJECTS))],
                                 _ACTIONS[rng.integers(len(_ACTIONS))],
                                 _PLACES[rng.integers(len(_PLACES))]])
                       + _TAILS[rng.integers(len(_TAILS))])
    return out


def encode(image, fmt="JPEG", **options):
    """PIL image -> encoded bytes (JPEG quality 75 with optimize, as Flickr8k's files)."""
    if fmt == "JPEG":
        options = dict(dict(quality=75, optimize=True), **options)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Datasets in the real folders' layouts
# ---------------------------------------------------------------------------

FLICKR_SPLITS = {"train": 64, "dev": 8, "test": 64, "unused": 2}


def write_flickr8k(root, splits=None, seed=0):
    """A Flickr8k-layout folder: `images/*.jpg` (224x224 JPEG q75), `captions.tsv`
    (image, caption_idx, split, caption; five captions each) and `splits/*.txt`."""
    splits = splits or FLICKR_SPLITS
    root = pathlib.Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    total = sum(splits.values())
    photos = photo_crops(total, seed=seed)
    texts = captions(5 * total, seed=seed)
    names = [f"{1000000 + 7919 * i}_{i:04x}.jpg" for i in range(total)]
    for name, photo in zip(names, photos):
        (root / "images" / name).write_bytes(encode(photo))
    assignment, start = {}, 0
    for split, n in splits.items():
        for name in names[start:start + n]:
            assignment[name] = split
        if split != "unused":
            (root / "splits" / f"{split}.txt").write_text("".join(f"{x}\n" for x in names[start:start + n]))
        start += n
    with open(root / "captions.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        writer.writerow(["image", "caption_idx", "split", "caption"])
        for i, name in enumerate(sorted(names)):  # the real file is sorted by image
            for k in range(5):
                writer.writerow([name, k, assignment[name], texts[5 * i + k]])
    return root


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def write_tiny_tfds(data_dir, features, splits):
    """Prepares the TFDS dataset `tiny_captions` in `data_dir`, without registering it.

    Args:
        features: `{name: tfds feature}` of each example.
        splits: `{split name: [(key, example dict), ...]}`.
    """
    import tensorflow_datasets as tfds

    with tfds.core.registered.skip_registration():

        class TinyCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            @tfds.core.utils.classproperty
            @classmethod
            def code_path(cls):
                return None  # Defined in a test: no code folder (and no checksums) to look up.

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(examples) for split, examples in splits.items()}

            def _generate_examples(self, examples):
                yield from examples

        TinyCaptions(data_dir=str(data_dir)).download_and_prepare()


def _class_image(label, num_classes, rng, size, texture):
    """An RGB image whose hue, shape and position depend on `label`, over photo texture."""
    hue = label / num_classes
    base = np.array([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 90 + 128
    background = np.asarray(texture, np.float32) * 0.35 + base * 0.65
    image = Image.fromarray(np.clip(background + rng.normal(0, 8, background.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    s = size
    x, y = rng.integers(0, s // 3, 2)
    box = [int(x), int(y), int(x + s // 2 + rng.integers(0, s // 4)), int(y + s // 2 + rng.integers(0, s // 4))]
    color = tuple(int(255 - c) for c in base)
    kind = label % 4
    if kind == 0:
        draw.ellipse(box, fill=color)
    elif kind == 1:
        draw.rectangle(box, fill=color)
    elif kind == 2:
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=color)
    else:
        draw.line([(box[0], box[1]), (box[2], box[3])], fill=color, width=max(2, s // 8))
    return image


def write_cifar10(root, per_class=40, seed=0):
    """A CIFAR-10-layout folder (`images/<class>/NNNN.jpg` 32x32, `labels.csv`,
    `classes.txt`) with class-dependent images."""
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    textures = photo_crops(per_class * len(CIFAR10_CLASSES), size=(32, 32), seed=seed + 1)
    rows = []
    for label, name in enumerate(CIFAR10_CLASSES):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            texture = textures[len(rows)]
            image = _class_image(label, len(CIFAR10_CLASSES), rng, 32, texture)
            path = f"images/{name}/{i:04d}.jpg"
            (root / path).write_bytes(encode(image, quality=90, optimize=False))
            rows.append((path, label, name))
    with open(root / "labels.csv", "w", newline="") as f:  # class by class, as the real one
        writer = csv.writer(f)
        writer.writerow(["path", "label", "class_name"])
        writer.writerows(rows)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CIFAR10_CLASSES))
    return root


MNIST_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_mnist(root, count=200, seed=0):
    """An MNIST-layout folder: gzipped IDX files of 28x28 digits drawn with PIL's font."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default()
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = np.zeros((count, 28, 28), np.uint8)
    for i, label in enumerate(labels):
        canvas = Image.new("L", (14, 14))
        ImageDraw.Draw(canvas).text((3 + rng.integers(-1, 2), 1 + rng.integers(-1, 2)),
                                    str(label), fill=255, font=font)
        images[i] = np.asarray(canvas.resize((28, 28), Image.Resampling.BILINEAR))
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, count) + labels.tobytes())
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in MNIST_CLASSES))
    return root


def write_all(root, seed=0):
    """`flickr8k/`, `cifar10_test/` and `mnist_test/` under `root`, as in ../shared/data."""
    root = pathlib.Path(root)
    write_flickr8k(root / "flickr8k", seed=seed)
    write_cifar10(root / "cifar10_test", seed=seed)
    write_mnist(root / "mnist_test", seed=seed)
    return root


def record_logits_shapes(shapes, convert=tuple, monkeypatch=None):
    """Appends `convert(logits_per_image.shape)` to `shapes` for every contrastive loss
    a `CLIP` step builds (at trace time), by wrapping `keras_clip.losses.clip_loss` and
    `sigmoid_loss`, which the model looks up when it traces. With a pytest
    `monkeypatch` the wrapping is undone after the test; without, it lasts for the
    process (the subprocess scripts)."""
    from keras_clip import losses

    def wrap(function):
        def wrapped(*args, **kwargs):
            out = function(*args, **kwargs)
            shapes.append(convert(out["logits_per_image"].shape))
            return out
        return wrapped

    for name in ("clip_loss", "sigmoid_loss"):
        wrapped = wrap(getattr(losses, name))
        if monkeypatch is not None:
            monkeypatch.setattr(losses, name, wrapped)
        else:
            setattr(losses, name, wrapped)
    return shapes


def wait_until_serving(client, process, log_path, timeout=300):
    """Polls `client.status()` until the model is AVAILABLE; fails with the server's
    log when `process` exits or `timeout` seconds pass."""
    import time

    from keras_clip.serving.client import ClientError

    deadline = time.time() + timeout
    while True:
        try:
            if client.status()[0]["state"] == "AVAILABLE":
                return
        except ClientError:
            pass
        assert process.poll() is None, pathlib.Path(log_path).read_text()[-3000:]
        assert time.time() < deadline, "server did not become ready"
        time.sleep(1)
