"""Retrieval recall@K: brute-force agreement, a hand-made case, a real Flickr8k run."""
import csv

import numpy as np
import pytest

from keras_clip import CLIP
from keras_clip.evaluation import (
    encode_images, encode_texts, evaluate_retrieval, retrieval_ranks, retrieval_recall,
)

KS = (1, 5, 10)


def _brute_force_recall(images, texts, text_to_image, ks):
    """One query at a time: sort all candidates, look at the top k."""
    text_to_image = np.asarray(text_to_image)
    result = {}
    image_hits = {k: 0 for k in ks}
    for i, image in enumerate(images):
        order = np.argsort(-(texts @ image), kind="stable")
        for k in ks:
            image_hits[k] += bool(np.any(text_to_image[order[:k]] == i))
    text_hits = {k: 0 for k in ks}
    for j, text in enumerate(texts):
        order = np.argsort(-(images @ text), kind="stable")
        for k in ks:
            text_hits[k] += bool(text_to_image[j] in order[:k])
    for k in ks:
        result[f"image_to_text_R@{k}"] = 100.0 * image_hits[k] / len(images)
        result[f"text_to_image_R@{k}"] = 100.0 * text_hits[k] / len(texts)
    return result


def _assert_matches_brute_force(metrics, expected):
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


def _noisy_pairs(num_images, captions_per_image, noise, seed):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(num_images, 32)).astype("float32")
    text_to_image = np.repeat(np.arange(num_images), captions_per_image)
    rng.shuffle(text_to_image)  # captions in no particular order
    texts = images[text_to_image] + noise * rng.normal(size=(len(text_to_image), 32))
    normalize = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32")
    return normalize(images), normalize(texts), text_to_image


@pytest.mark.parametrize("chunk_size", [1024, 37])
def test_recall_matches_brute_force_with_five_captions_per_image(chunk_size):
    images, texts, text_to_image = _noisy_pairs(300, 5, noise=2.5, seed=0)
    metrics = retrieval_recall(images, texts, text_to_image, ks=KS, chunk_size=chunk_size)
    expected = _brute_force_recall(images, texts, text_to_image, KS)
    _assert_matches_brute_force(metrics, expected)
    # The noise level gives mid-range recalls, so hits and misses are both tested.
    assert 10.0 < metrics["text_to_image_R@1"] < 90.0
    assert 10.0 < metrics["image_to_text_R@1"] < 90.0
    assert metrics["mean_recall"] == pytest.approx(np.mean(list(expected.values())))


def test_recall_matches_brute_force_with_uneven_caption_counts():
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 8, size=120)
    images, _, _ = _noisy_pairs(120, 1, noise=0.0, seed=1)
    text_to_image = np.repeat(np.arange(120), counts)
    texts = images[text_to_image] + 1.5 * rng.normal(size=(len(text_to_image), 32))
    texts = (texts / np.linalg.norm(texts, axis=1, keepdims=True)).astype("float32")
    metrics = retrieval_recall(images, texts, text_to_image, ks=(1, 3, 50), chunk_size=16)
    _assert_matches_brute_force(metrics, _brute_force_recall(images, texts, text_to_image, (1, 3, 50)))


def test_hand_made_case_gives_known_recalls_and_ranks():
    # Images on the unit circle; caption 2 belongs to image 0 but sits nearer image 1,
    # caption 3 belongs to image 2 but image 0 and caption 1 outscore it.
    images = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], "float32")
    texts = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.8], [0.2, -0.98]], "float32")
    text_to_image = [0, 1, 0, 2]
    image_ranks, text_ranks = retrieval_ranks(images, texts, text_to_image)
    np.testing.assert_array_equal(image_ranks, [0, 0, 1])
    np.testing.assert_array_equal(text_ranks, [0, 0, 1, 1])
    metrics = retrieval_recall(images, texts, text_to_image, ks=(1, 2))
    assert metrics["image_to_text_R@1"] == pytest.approx(200 / 3)
    assert metrics["image_to_text_R@2"] == 100.0
    assert metrics["text_to_image_R@1"] == 50.0
    assert metrics["text_to_image_R@2"] == 100.0
    assert metrics["image_to_text_median_rank"] == 1.0
    assert metrics["text_to_image_median_rank"] == 1.5
    assert metrics["mean_recall"] == pytest.approx((200 / 3 + 100 + 50 + 100) / 4)


def test_bad_inputs_are_rejected_with_clear_messages():
    images = np.eye(3, dtype="float32")
    with pytest.raises(ValueError, match="at least one caption.*\\[2\\]"):
        retrieval_recall(images, images[:2], [0, 1])
    with pytest.raises(ValueError, match="must lie in \\[0, 3\\)"):
        retrieval_recall(images, images, [0, 1, 3])
    with pytest.raises(ValueError, match="same width"):
        retrieval_recall(images, np.ones((3, 4)), [0, 1, 2])
    with pytest.raises(ValueError, match="one per caption"):
        retrieval_recall(images, images, [0, 1])
    with pytest.raises(ValueError, match="`ks` must be positive"):
        retrieval_recall(images, images, [0, 1, 2], ks=(0,))


def _flickr_test_split(flickr_dir, num_images):
    names = (flickr_dir / "splits" / "test.txt").read_text().split()[:num_images]
    index = {name: i for i, name in enumerate(names)}
    captions, text_to_image = [], []
    with open(flickr_dir / "captions.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["image"] in index:
                captions.append(row["caption"])
                text_to_image.append(index[row["image"]])
    images = [(flickr_dir / "images" / name).read_bytes() for name in names]
    return images, captions, np.array(text_to_image)


def test_flickr8k_run_with_random_model_agrees_with_brute_force(flickr8k_dir):
    from keras_clip.preprocessing.tokenizer import tokenize

    images, captions, text_to_image = _flickr_test_split(flickr8k_dir, 50)
    assert len(captions) == 250 and np.all(np.bincount(text_to_image) == 5)
    model = CLIP.from_preset("clip_vit_tiny")
    image_embeddings = encode_images(model, images, batch_size=16)
    text_embeddings = encode_texts(model, captions, batch_size=100)
    assert image_embeddings.shape == (50, 256) and text_embeddings.shape == (250, 256)
    # The helpers equal a plain forward pass (trimmed text positions change nothing).
    untrimmed = np.asarray(model.encode_text(tokenize(captions[:20], model.context_length)))
    np.testing.assert_allclose(text_embeddings[:20], untrimmed, atol=1e-5)
    direct = np.asarray(model.encode_image(model.image_preprocessor()(np.array(images[:4], object))))
    np.testing.assert_allclose(image_embeddings[:4], direct, atol=1e-6)

    metrics = retrieval_recall(image_embeddings, text_embeddings, text_to_image, ks=KS)
    expected = _brute_force_recall(image_embeddings, text_embeddings, text_to_image, KS)
    _assert_matches_brute_force(metrics, expected)
    end_to_end = evaluate_retrieval(model, images, captions, text_to_image, ks=KS,
                                    image_batch_size=50)
    for key in expected:
        assert end_to_end[key] == pytest.approx(metrics[key], abs=1e-9), key
