"""A procedurally drawn image-caption dataset for training CLIP with no downloads.

Every image shows one coloured shape (6 colours x 6 shapes, two sizes, five
positions) on a dark or grey background with a colour gradient and pixel noise;
its captions name what was drawn in several phrasings ("a small red star on the
left", "a photo of a red star.", "a red star on a gray background", ...).
Everything is drawn with numpy (vectorised masks, 2x2 supersampled edges) and
encoded as JPEG (under 1 ms per 64-pixel image on one CPU core: 20,000 images
in about 20 s), and every example depends only on `(seed, split, index)`, so the
data are identical on every machine with the same numpy and TensorFlow.

Why the held-out combinations test zero-shot transfer: `HELD_OUT_COMBINATIONS`
lists 12 of the 36 colour-shape pairs (each colour with two shapes, each shape
with two colours). Training images and captions never contain them
(`generate_demo_examples` excludes them by default). A model that classifies
images of, say, a red circle among the 12 held-out classes with prompts like
"a photo of a red circle." has seen "red" only on triangles, stars, crosses and
rings, and "circle" only in green, blue, yellow and purple: it must compose the
attribute words it learned, as CLIP's zero-shot transfer composes concepts from
web captions, rather than recall a trained pair. Because each held-out colour
(and shape) belongs to two held-out classes, colour alone or shape alone can
reach at most 50% accuracy; chance is 1/12 (8.3%).

The task is kept learnable for `clip_vit_tiny` in a few CPU minutes: few,
saturated colours on neutral backgrounds, large shapes (radius 14% or 24% of
the image), one object per image, and captions that always name colour and
shape. Measured: `clip_vit_tiny` from random weights, 20,000 training images,
batch 64, AdamW (learning rate 5e-4 after 100 warm-up steps, weight decay 0.1),
165 steps in 5 minutes on 2 shared CPU cores: 65% zero-shot accuracy on 600
held-out images with `DEMO_TEMPLATES` (chance 8.3%), the colour right on 98% of
them and the shape on 65%. Contrastive batch accuracy stays low because many
captions in a batch are identical; that does not hurt the zero-shot result.

Example:

>>> examples = list(generate_demo_examples(2, image_size=64, seed=0))
>>> key, jpeg_bytes, captions = examples[0]
>>> key, len(captions)
('train-00000000', 5)
"""
import dataclasses
import json
import math
import os
import types

import numpy as np
from absl import logging

# -- vocabulary of the scenes (read-only tables) -----------------------------------
COLOURS = types.MappingProxyType({
    "red": (220, 35, 35),
    "green": (40, 185, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 215, 35),
    "purple": (150, 55, 205),
    "white": (242, 242, 242),
})
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
# Radius of the shape's circumscribed circle, as a fraction of the image side.
SIZES = types.MappingProxyType({"small": 0.14, "large": 0.24})
# Centre of the shape (x, y) as fractions of the image side, y pointing down.
POSITIONS = types.MappingProxyType({
    "left": (0.30, 0.50),
    "right": (0.70, 0.50),
    "top": (0.50, 0.30),
    "bottom": (0.50, 0.70),
    "center": (0.50, 0.50),
})
POSITION_PHRASES = types.MappingProxyType({
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
})
BACKGROUNDS = types.MappingProxyType({
    "black": (18, 18, 18),
    "dark gray": (65, 65, 65),
    "gray": (125, 125, 125),
})

# Zero-shot evaluation: (colour, shape) pairs never drawn for training.
HELD_OUT_COMBINATIONS = (
    ("red", "circle"), ("red", "square"),
    ("green", "square"), ("green", "triangle"),
    ("blue", "triangle"), ("blue", "star"),
    ("yellow", "star"), ("yellow", "cross"),
    ("purple", "cross"), ("purple", "ring"),
    ("white", "ring"), ("white", "circle"),
)
DEMO_CLASSES = tuple(f"{colour} {shape}" for colour, shape in HELD_OUT_COMBINATIONS)
DEMO_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {}.")

# Caption phrasings; every image gets five of them, in a random order.
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "a photo of a {colour} {shape}.",
    "a {colour} {shape} on a {background} background",
    "a drawing of a {size} {colour} {shape}.",
    "there is a {colour} {shape} {where}.",
    "a picture of a {size} {colour} {shape} {where}.",
    "{colour} {shape}, {size}, {where}",
    "a {colour} {shape}.",
)
CAPTIONS_PER_IMAGE = 5

_SPLITS = ("train", "val", "zero_shot")
_JITTER = 0.04  # centre jitter, fraction of the image side
_MAX_ROTATION = math.radians(20.0)
_JPEG_QUALITY = 95
_PENTAGRAM_DISTANCE = math.cos(math.radians(72.0))
ZERO_SHOT_FILE = "zero_shot.json"


@dataclasses.dataclass(frozen=True)
class DemoScene:
    """Everything needed to draw and caption one demo image.

    Attributes:
        colour, shape, size, position, background: names from `COLOURS`,
            `SHAPES`, `SIZES`, `POSITIONS`, `BACKGROUNDS`.
        center: `(x, y)` centre in fractions of the image side (y down).
        radius: circumscribed radius in fractions of the image side.
        angle: rotation in radians (counter-clockwise).
        rgb: shape colour after jitter, 3 ints.
        background_rgb: background colour after jitter, 3 ints.
        gradient: `(gx, gy)` background ramp in levels across the image.
        noise_seed: int seeding the per-pixel noise.
    """

    colour: str
    shape: str
    size: str
    position: str
    background: str
    center: tuple
    radius: float
    angle: float
    rgb: tuple
    background_rgb: tuple
    gradient: tuple
    noise_seed: int


def _check_combinations(combinations, name):
    combinations = [tuple(c) for c in combinations]
    for colour, shape in combinations:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(
                f"`{name}` must hold (colour, shape) pairs from COLOURS and SHAPES. "
                f"Received: {(colour, shape)!r}"
            )
    return combinations


def sample_demo_scene(rng, combinations):
    """Draws the random attributes of one scene.

    Args:
        rng: a `numpy.random.Generator`.
        combinations: non-empty list of allowed `(colour, shape)` pairs.

    Returns:
        A `DemoScene`.
    """
    colour, shape = combinations[rng.integers(len(combinations))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    x, y = POSITIONS[position]
    jitter = rng.uniform(-_JITTER, _JITTER, size=2)
    radius = SIZES[size] * rng.uniform(0.9, 1.1)
    brightness = rng.uniform(0.85, 1.05)
    rgb = np.clip(np.array(COLOURS[colour]) * brightness + rng.uniform(-12, 12, 3), 0, 255)
    background_rgb = np.clip(np.array(BACKGROUNDS[background]) + rng.uniform(-12, 12, 3), 0, 255)
    return DemoScene(
        colour=colour,
        shape=shape,
        size=size,
        position=position,
        background=background,
        center=(float(x + jitter[0]), float(y + jitter[1])),
        radius=float(radius),
        angle=float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)),
        rgb=tuple(int(v) for v in rgb.round()),
        background_rgb=tuple(int(v) for v in background_rgb.round()),
        gradient=tuple(float(v) for v in rng.uniform(-20, 20, size=2)),
        noise_seed=int(rng.integers(2**31)),
    )


def shape_mask(shape, u, v):
    """Inside-test of a unit shape, vectorised over coordinates.

    The shapes fit in the unit circle (circumradius 1), centred at the origin,
    `v` pointing up: circle; ring (inner radius 0.55); square (half side 0.75);
    triangle (equilateral, pointing up); star (regular pentagram, inner radius
    0.38);
    cross (plus sign, arms 0.32 wide).

    Args:
        shape: one of `SHAPES`.
        u, v: float arrays of the same shape, coordinates in radius units.

    Returns:
        bool array like `u`.
    """
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        # Half-planes with outward normals at 270, 30 and 150 degrees, inradius 0.5.
        inside = np.ones_like(u, dtype=bool)
        for degrees in (270.0, 30.0, 150.0):
            a = math.radians(degrees)
            inside &= u * math.cos(a) + v * math.sin(a) <= 0.5
        return inside
    if shape == "star":
        # A regular pentagram, tip up: its five lines are at distance cos(72 deg)
        # from the centre, with normals pointing at the tips; the filled star is
        # where at least four of the five inner half-planes hold (the core pentagon
        # satisfies all five, each spike all but one).
        inside_count = np.zeros(u.shape, dtype=np.int8)
        for k in range(5):
            a = math.radians(90.0 + 72.0 * k)
            inside_count += u * math.cos(a) + v * math.sin(a) <= _PENTAGRAM_DISTANCE
        return inside_count >= 4
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.16) & (av <= 0.95)) | ((av <= 0.16) & (au <= 0.95))
    raise ValueError(f"`shape` must be one of {SHAPES}. Received: shape={shape!r}")


def render_demo_scene(scene, image_size=64):
    """Draws a scene as uint8 pixels `(image_size, image_size, 3)`.

    Edges are antialiased by 2x2 supersampling; background gradient and Gaussian
    pixel noise (sigma 6 levels) are seeded by `scene.noise_seed`.
    """
    supersample = 2
    n = image_size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n  # pixel centres in [0, 1]
    x = coords[None, :] - scene.center[0]  # (1, n)
    y = scene.center[1] - coords[:, None]  # (n, 1), up is positive
    cos, sin = math.cos(scene.angle), math.sin(scene.angle)
    u = (x * cos + y * sin) / scene.radius  # (n, n), rotated into the shape's frame
    v = (-x * sin + y * cos) / scene.radius
    mask = shape_mask(scene.shape, u, v).astype(np.float32)
    coverage = mask.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))

    ramp = (np.arange(image_size, dtype=np.float32) / max(image_size - 1, 1)) - 0.5
    gradient = scene.gradient[0] * ramp[None, :] + scene.gradient[1] * ramp[:, None]  # (S, S)
    background = np.asarray(scene.background_rgb, np.float32) + gradient[..., None]  # (S, S, 3)
    foreground = np.asarray(scene.rgb, np.float32)
    image = background + coverage[..., None] * (foreground - background)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 6.0, size=image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def demo_captions(scene, rng, num_captions=CAPTIONS_PER_IMAGE):
    """`num_captions` distinct captions of a scene, from `CAPTION_TEMPLATES`.

    Every caption names the scene's colour and shape; the others also its size,
    position or background.
    """
    chosen = rng.choice(len(CAPTION_TEMPLATES), size=num_captions, replace=False)
    words = dict(
        colour=scene.colour, shape=scene.shape, size=scene.size,
        where=POSITION_PHRASES[scene.position], background=scene.background,
    )
    return [CAPTION_TEMPLATES[i].format(**words) for i in chosen]


def encode_jpeg(pixels):
    """JPEG bytes of uint8 `(H, W, 3)` pixels (quality 95, no chroma subsampling)."""
    import tensorflow as tf

    return tf.io.encode_jpeg(
        pixels, quality=_JPEG_QUALITY, chroma_downsampling=False
    ).numpy()


def _rng(seed, split, index):
    return np.random.default_rng([int(seed), _SPLITS.index(split), int(index)])


def generate_demo_examples(num_examples, image_size=64, seed=0, exclude=None, split="train"):
    """Yields `(key, jpeg_bytes, captions)` demo examples.

    Example `i` depends only on `(seed, split, i)`: the first `k` examples are the
    same whatever `num_examples` is, and the same seed gives the same bytes.

    Args:
        num_examples: int >= 0.
        image_size: int, side of the square images (>= 16).
        seed: int.
        exclude: `(colour, shape)` pairs never to draw. None (the default)
            excludes `HELD_OUT_COMBINATIONS`, so the output is safe to train a
            zero-shot model on; pass `()` to draw all 36 pairs.
        split: `"train"` or `"val"`; selects an independent random stream.

    Yields:
        `(key, jpeg_bytes, captions)`: key `"<split>-<index:08d>"`, JPEG bytes,
        and a list of `CAPTIONS_PER_IMAGE` str.
    """
    if split not in ("train", "val"):
        raise ValueError(f"`split` must be 'train' or 'val'. Received: split={split!r}")
    if num_examples < 0:
        raise ValueError(f"`num_examples` must be >= 0. Received: num_examples={num_examples}")
    if image_size < 16:
        raise ValueError(f"`image_size` must be at least 16. Received: image_size={image_size}")
    excluded = set(_check_combinations(HELD_OUT_COMBINATIONS if exclude is None else exclude, "exclude"))
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in excluded]
    if not allowed:
        raise ValueError("`exclude` leaves no (colour, shape) pair to draw.")
    return _generate(num_examples, image_size, seed, allowed, split)


def _generate(num_examples, image_size, seed, allowed, split):
    for index in range(num_examples):
        rng = _rng(seed, split, index)
        scene = sample_demo_scene(rng, allowed)
        captions = demo_captions(scene, rng)
        yield f"{split}-{index:08d}", encode_jpeg(render_demo_scene(scene, image_size)), captions


def demo_zero_shot_split(num_examples=600, image_size=64, seed=0):
    """Labelled images of the held-out classes, for zero-shot evaluation.

    Labels cycle through `DEMO_CLASSES` (example `i` has label `i % 12`), so the
    split is balanced; sizes, positions, backgrounds and noise are random, from a
    stream independent of the training and validation examples.

    Args:
        num_examples: int >= 0.
        image_size: int, image side.
        seed: int.

    Returns:
        list of `(jpeg_bytes, label)`, label an int index into `DEMO_CLASSES`.
        Classify with `DEMO_CLASSES` and `DEMO_TEMPLATES`.
    """
    examples = []
    for index in range(num_examples):
        label = index % len(HELD_OUT_COMBINATIONS)
        scene = sample_demo_scene(_rng(seed, "zero_shot", index), [HELD_OUT_COMBINATIONS[label]])
        examples.append((encode_jpeg(render_demo_scene(scene, image_size)), label))
    return examples


def write_demo_dataset(output_dir, num_train=20000, num_val=1000, num_zero_shot=600,
                       image_size=64, seed=0, examples_per_shard=5000):
    """Writes the demo dataset as TFRecord shards plus a zero-shot JSON.

    Files (img2dataset's schema: `jpg`, `txt`, `key`, plus `txts` with all five
    captions; see `keras_clip.data.shards`):

    - `train-*-of-*.tfrecord`: `num_train` examples, held-out pairs excluded.
    - `val-*-of-*.tfrecord`: `num_val` examples, held-out pairs excluded.
    - `zero_shot-*-of-*.tfrecord`: `num_zero_shot` held-out images, each with
      its class name as caption (`txt`, e.g. `"red circle"`).
    - `zero_shot.json`: `classes` (`DEMO_CLASSES`), `templates`
      (`DEMO_TEMPLATES`), and `keys` / `labels` of the zero-shot examples in
      file order.

    Args:
        output_dir: folder (created if missing).
        num_train, num_val, num_zero_shot: ints, examples per split.
        image_size: int, image side.
        seed: int.
        examples_per_shard: int, records per shard.

    Returns:
        dict with lists of paths under `"train"`, `"val"`, `"zero_shot"`, and the
        JSON path under `"zero_shot_json"`.
    """
    import tensorflow as tf

    from keras_clip.data.shards import write_shards

    tf.io.gfile.makedirs(output_dir)  # any TensorFlow filesystem (gs://, ram://, local)
    paths = {}
    for split, count in (("train", num_train), ("val", num_val)):
        paths[split] = write_shards(
            generate_demo_examples(count, image_size=image_size, seed=seed, split=split),
            output_dir, prefix=split, examples_per_shard=examples_per_shard,
        )
    zero_shot = demo_zero_shot_split(num_zero_shot, image_size=image_size, seed=seed)
    keys = [f"zero_shot-{index:08d}" for index in range(len(zero_shot))]
    paths["zero_shot"] = write_shards(
        ((key, image, [DEMO_CLASSES[label]]) for key, (image, label) in zip(keys, zero_shot)),
        output_dir, prefix="zero_shot", examples_per_shard=examples_per_shard,
    )
    manifest = {
        "classes": list(DEMO_CLASSES),
        "templates": list(DEMO_TEMPLATES),
        "held_out_combinations": [list(pair) for pair in HELD_OUT_COMBINATIONS],
        "image_size": image_size,
        "seed": seed,
        "keys": keys,
        "labels": [label for _, label in zero_shot],
        "files": [os.path.basename(p) for p in paths["zero_shot"]],
    }
    paths["zero_shot_json"] = _join(output_dir, ZERO_SHOT_FILE)
    with tf.io.gfile.GFile(paths["zero_shot_json"], "w") as f:
        f.write(json.dumps(manifest, indent=1))
    logging.info(
        "Wrote the demo dataset to %s: %d train, %d val, %d zero-shot examples.",
        output_dir, num_train, num_val, num_zero_shot,
    )
    return paths


def _join(base, name):
    """`os.path.join` that keeps `gs://`-style paths intact."""
    return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def read_demo_zero_shot_split(output_dir):
    """Reads back the zero-shot split that `write_demo_dataset` wrote.

    Returns:
        `(images, labels, class_names, templates)`: list of JPEG bytes, int64
        numpy labels, and the lists of class names and templates.
    """
    import tensorflow as tf

    with tf.io.gfile.GFile(_join(output_dir, ZERO_SHOT_FILE), "r") as f:
        manifest = json.loads(f.read())
    files = [_join(output_dir, name) for name in manifest["files"]]
    spec = {"jpg": tf.io.FixedLenFeature([], tf.string), "txt": tf.io.FixedLenFeature([], tf.string)}
    index = {name: i for i, name in enumerate(manifest["classes"])}
    images, labels = [], []
    for record in tf.data.TFRecordDataset(files):
        example = tf.io.parse_single_example(record, spec)
        images.append(example["jpg"].numpy())
        labels.append(index[example["txt"].numpy().decode("utf-8")])
    return images, np.array(labels, np.int64), manifest["classes"], manifest["templates"]
