"""Procedural demo dataset: determinism, drawing, captions, held-out split, shards."""
import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from keras_clip import demo_data
from keras_clip.demo_data import (
    COLOURS, DEMO_CLASSES, HELD_OUT_COMBINATIONS, SHAPES, DemoScene, demo_captions,
    demo_zero_shot_split, generate_demo_examples, read_demo_zero_shot_split,
    render_demo_scene, shape_mask, write_demo_dataset,
)


def _named(caption, vocabulary):
    """The vocabulary words a caption contains (whole words)."""
    words = caption.replace(",", " ").replace(".", " ").split()
    return [w for w in vocabulary if w in words]


def _colour_and_shape(captions):
    """The single colour and shape all captions of an image agree on."""
    pairs = {(tuple(_named(c, COLOURS)), tuple(_named(c, SHAPES))) for c in captions}
    assert len(pairs) == 1, captions
    (colours, shapes), = pairs
    assert len(colours) == 1 and len(shapes) == 1, captions
    return colours[0], shapes[0]


def _foreground_colour(pixels):
    """Nearest palette colour of the pixels far from the (border) background."""
    pixels = pixels.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    far = np.linalg.norm(pixels - background, axis=-1) > 60.0
    assert far.sum() >= 20  # the smallest shape still covers dozens of pixels
    mean = pixels[far].mean(axis=0)
    return min(COLOURS, key=lambda name: np.linalg.norm(mean - np.array(COLOURS[name])))


def _decode(image_bytes):
    return tf.io.decode_jpeg(image_bytes).numpy()


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    first = list(generate_demo_examples(6, seed=3))
    assert first == list(generate_demo_examples(6, seed=3))
    # Example i depends on (seed, split, i) only, not on how many are drawn.
    assert list(generate_demo_examples(3, seed=3)) == first[:3]
    other_seed = list(generate_demo_examples(6, seed=4))
    other_split = list(generate_demo_examples(6, seed=3, split="val"))
    for a, b, c in zip(first, other_seed, other_split):
        assert a[1] != b[1] and a[1] != c[1]
    assert [key for key, _, _ in first] == [f"train-{i:08d}" for i in range(6)]
    assert other_split[0][0] == "val-00000000"


@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_images_decode_to_the_requested_size(image_size):
    for _, image_bytes, captions in generate_demo_examples(3, image_size=image_size, seed=1):
        assert image_bytes[:2] == b"\xff\xd8"  # JPEG
        assert _decode(image_bytes).shape == (image_size, image_size, 3)
        assert len(captions) == demo_data.CAPTIONS_PER_IMAGE == len(set(captions))


def test_captions_name_the_colour_that_is_drawn():
    for _, image_bytes, captions in generate_demo_examples(60, seed=2, exclude=()):
        colour, _ = _colour_and_shape(captions)
        assert _foreground_colour(_decode(image_bytes)) == colour, captions


def test_captions_describe_every_attribute_of_the_scene():
    scene = DemoScene(
        colour="purple", shape="star", size="small", position="left", background="gray",
        center=(0.3, 0.5), radius=0.14, angle=0.0, rgb=COLOURS["purple"],
        background_rgb=(125, 125, 125), gradient=(0.0, 0.0), noise_seed=0,
    )
    captions = demo_captions(scene, np.random.default_rng(0), num_captions=8)
    assert sorted(captions) == sorted([
        "a small purple star on the left", "a photo of a purple star.",
        "a purple star on a gray background", "a drawing of a small purple star.",
        "there is a purple star on the left.", "a picture of a small purple star on the left.",
        "purple star, small, on the left", "a purple star.",
    ])


def test_held_out_combinations_never_appear_in_training_captions():
    assert len(HELD_OUT_COMBINATIONS) == len(DEMO_CLASSES) == 12
    held_out = set(HELD_OUT_COMBINATIONS)
    # Each colour and each shape is held out with exactly two partners.
    for colour in COLOURS:
        assert sum(c == colour for c, _ in held_out) == 2
    for shape in SHAPES:
        assert sum(s == shape for _, s in held_out) == 2
    seen = set()
    for split in ("train", "val"):
        for _, _, captions in generate_demo_examples(400, seed=0, split=split):
            pair = _colour_and_shape(captions)
            assert pair not in held_out
            assert not any(name in caption for name in DEMO_CLASSES for caption in captions)
            seen.add(pair)
    assert seen == set(itertools.product(COLOURS, SHAPES)) - held_out  # all 24 others drawn
    everything = {_colour_and_shape(c) for _, _, c in generate_demo_examples(400, exclude=())}
    assert everything & held_out


def test_shape_masks_cover_their_analytic_areas():
    grid = np.linspace(-1.1, 1.1, 2201)
    u, v = np.meshgrid(grid, grid)
    pixel = (grid[1] - grid[0]) ** 2
    # Regular pentagram: 10 triangles (centre, tip, inner vertex at radius r).
    inner = math.cos(math.radians(72)) / math.cos(math.radians(36))
    star = 10 * 0.5 * 1.0 * inner * math.sin(math.pi / 5)
    expected = {
        "circle": math.pi,
        "ring": math.pi * (1 - 0.55**2),
        "square": 1.5**2,
        "triangle": 3 * math.sqrt(3) * 0.5**2,  # equilateral, inradius 0.5
        "star": star,
        "cross": 2 * 0.32 * 1.9 - 0.32**2,
    }
    for shape, area in expected.items():
        measured = shape_mask(shape, u, v).sum() * pixel
        assert measured == pytest.approx(area, rel=0.01), shape
    assert shape_mask("ring", np.zeros(1), np.zeros(1))[0] == False  # noqa: E712 (hole)
    assert shape_mask("triangle", np.array([0.0]), np.array([0.95]))[0]  # apex points up
    assert not shape_mask("triangle", np.array([0.0]), np.array([-0.95]))[0]


def test_render_puts_the_shape_colour_inside_and_background_outside():
    scene = DemoScene(
        colour="red", shape="ring", size="large", position="center", background="black",
        center=(0.5, 0.5), radius=0.24, angle=0.3, rgb=(220, 35, 35),
        background_rgb=(18, 18, 18), gradient=(0.0, 0.0), noise_seed=5,
    )
    pixels = render_demo_scene(scene, image_size=100).astype(np.float32)
    assert pixels.shape == (100, 100, 3)
    on_ring = pixels[48:52, 50 + 19 : 50 + 22].reshape(-1, 3).mean(0)  # radius ~0.2
    hole = pixels[48:52, 48:52].reshape(-1, 3).mean(0)
    corner = pixels[:10, :10].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(on_ring, [220, 35, 35], atol=8)
    np.testing.assert_allclose(hole, [18, 18, 18], atol=8)
    np.testing.assert_allclose(corner, [18, 18, 18], atol=4)
    assert np.array_equal(render_demo_scene(scene, 100), render_demo_scene(scene, 100))


def test_zero_shot_split_is_balanced_over_held_out_classes():
    examples = demo_zero_shot_split(24, image_size=64, seed=0)
    labels = [label for _, label in examples]
    assert labels == list(range(12)) * 2
    for image_bytes, label in examples:
        assert _foreground_colour(_decode(image_bytes)) == HELD_OUT_COMBINATIONS[label][0]
    assert examples == demo_zero_shot_split(24, image_size=64, seed=0)


def test_write_demo_dataset_round_trips_through_tfrecords(tmp_path):
    paths = write_demo_dataset(str(tmp_path), num_train=30, num_val=10, num_zero_shot=24,
                               seed=7, examples_per_shard=16)
    assert [p.split("/")[-1] for p in paths["train"]] == [
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    assert len(paths["val"]) == 1 and len(paths["zero_shot"]) == 2

    spec = {
        "jpg": tf.io.FixedLenFeature([], tf.string),
        "txt": tf.io.FixedLenFeature([], tf.string),
        "key": tf.io.FixedLenFeature([], tf.string),
        "txts": tf.io.VarLenFeature(tf.string),
    }
    records = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(paths["train"])]
    expected = list(generate_demo_examples(30, seed=7))
    assert len(records) == 30
    for record, (key, image_bytes, captions) in zip(records, expected):
        assert record["key"].numpy().decode() == key
        assert record["jpg"].numpy() == image_bytes
        assert [c.decode() for c in tf.sparse.to_dense(record["txts"]).numpy()] == captions
        assert record["txt"].numpy().decode() == captions[0]

    images, labels, classes, templates = read_demo_zero_shot_split(str(tmp_path))
    reference = demo_zero_shot_split(24, image_size=64, seed=7)
    assert images == [image for image, _ in reference]
    np.testing.assert_array_equal(labels, [label for _, label in reference])
    assert classes == list(DEMO_CLASSES) and templates == list(demo_data.DEMO_TEMPLATES)


def test_bad_arguments_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match=r"\(colour, shape\) pairs"):
        generate_demo_examples(1, exclude=[("pink", "circle")])
    with pytest.raises(ValueError, match="leaves no"):
        generate_demo_examples(1, exclude=list(itertools.product(COLOURS, SHAPES)))
    with pytest.raises(ValueError, match="`split` must be"):
        generate_demo_examples(1, split="zero_shot")
    with pytest.raises(ValueError, match="`shape` must be one of"):
        shape_mask("hexagon", np.zeros(1), np.zeros(1))
