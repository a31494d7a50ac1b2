"""Image-text retrieval recall@K (the Flickr30k / MS-COCO protocol) and encoding helpers.

Protocol (Karpathy & Fei-Fei, 2015; used by the CLIP paper's Table 13 and open_clip):

- *image -> text* (text retrieval): an image is a hit at K if **any** of its
  captions is among the K captions most similar to it.
- *text -> image* (image retrieval): a caption is a hit at K if **its** image is
  among the K images most similar to it.

Recall@K is the percentage of queries that are hits. Similarities are dot
products, i.e. cosines for the unit-norm embeddings CLIP produces.

Ties: a candidate's rank is the number of candidates with a strictly higher
score, so a correct item tied with others counts as ranked first among them.
With float embeddings of distinct inputs ties do not occur in practice; exactly
duplicated captions (which Flickr8k has a few of) get identical scores under
every ranking rule.
"""
import numpy as np
from absl import logging


def _as_float32_matrix(x, name):
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (N, E). Received: shape={x.shape}")
    return x


def retrieval_ranks(image_embeddings, text_embeddings, text_to_image, chunk_size=1024):
    """0-based ranks of the correct answers, for both retrieval directions.

    Scores are computed `chunk_size` queries at a time, so memory stays at
    `chunk_size * max(N, M)` floats (1,000 images x 5,000 captions take well under
    a second on a CPU).

    Args:
        image_embeddings: float `(N, E)`.
        text_embeddings: float `(M, E)`.
        text_to_image: int `(M,)`, the image index of every caption, in `[0, N)`.
        chunk_size: int, queries scored per matrix product.

    Returns:
        `(image_ranks, text_ranks)`: int64 `(N,)`, the rank of each image's
        best-ranked caption among all M captions; int64 `(M,)`, the rank of each
        caption's image among all N images. Rank 0 is the top.

    Raises:
        ValueError: on mismatched shapes, out-of-range indices, or an image
            without any caption.
    """
    images = _as_float32_matrix(image_embeddings, "image_embeddings")  # (N, E)
    texts = _as_float32_matrix(text_embeddings, "text_embeddings")  # (M, E)
    text_to_image = np.asarray(text_to_image)
    num_images, num_texts = images.shape[0], texts.shape[0]
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            "`image_embeddings` and `text_embeddings` must have the same width. "
            f"Received: shapes {images.shape} and {texts.shape}"
        )
    if text_to_image.shape != (num_texts,) or not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(
            f"`text_to_image` must be {num_texts} integers, one per caption. "
            f"Received: shape={text_to_image.shape}, dtype={text_to_image.dtype}"
        )
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(
            f"`text_to_image` values must lie in [0, {num_images}). Received: "
            f"min={text_to_image.min()}, max={text_to_image.max()}"
        )
    captions_per_image = np.bincount(text_to_image, minlength=num_images)
    if np.any(captions_per_image == 0):
        raise ValueError(
            "Every image needs at least one caption. Images without one: "
            f"{np.flatnonzero(captions_per_image == 0)[:10].tolist()}"
        )
    if chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be positive. Received: chunk_size={chunk_size}")

    # Image -> text: rank of the best own caption = number of captions scoring
    # strictly above the image's highest-scoring own caption.
    image_ranks = np.empty(num_images, np.int64)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        scores = images[start:stop] @ texts.T  # (n, M)
        own = text_to_image[None, :] == np.arange(start, stop)[:, None]  # (n, M)
        best_own = np.max(np.where(own, scores, -np.inf), axis=1)  # (n,)
        image_ranks[start:stop] = np.sum(scores > best_own[:, None], axis=1)

    # Text -> image: number of images scoring strictly above the caption's image.
    text_ranks = np.empty(num_texts, np.int64)
    for start in range(0, num_texts, chunk_size):
        stop = min(start + chunk_size, num_texts)
        scores = texts[start:stop] @ images.T  # (m, N)
        own = scores[np.arange(stop - start), text_to_image[start:stop]]  # (m,)
        text_ranks[start:stop] = np.sum(scores > own[:, None], axis=1)
    return image_ranks, text_ranks


def retrieval_recall(image_embeddings, text_embeddings, text_to_image, ks=(1, 5, 10),
                     chunk_size=1024):
    """Recall@K in both directions, in percent.

    Args:
        image_embeddings: float `(N, E)`, typically unit norm.
        text_embeddings: float `(M, E)`, typically unit norm.
        text_to_image: int `(M,)`, the image index of every caption (for
            Flickr/COCO each image has 5 captions).
        ks: iterable of positive ints.
        chunk_size: int, queries scored per matrix product.

    Returns:
        dict of float: `image_to_text_R@k` and `text_to_image_R@k` for every k
        (percent of queries that are hits), `image_to_text_median_rank` and
        `text_to_image_median_rank` (1-based, as usually reported), and
        `mean_recall`, the mean of all the R@k values.

    Example:

    >>> images = np.eye(3, dtype="float32")
    >>> texts = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], "float32")
    >>> round(retrieval_recall(images, texts, [0, 1, 2], ks=(1,))["text_to_image_R@1"], 2)
    33.33
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) <= 0:
        raise ValueError(f"`ks` must be positive integers. Received: ks={ks}")
    image_ranks, text_ranks = retrieval_ranks(
        image_embeddings, text_embeddings, text_to_image, chunk_size=chunk_size
    )
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = 100.0 * float(np.mean(image_ranks < k))
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = 100.0 * float(np.mean(text_ranks < k))
    metrics["mean_recall"] = float(np.mean([metrics[key] for key in list(metrics)]))
    metrics["image_to_text_median_rank"] = float(np.median(image_ranks) + 1)
    metrics["text_to_image_median_rank"] = float(np.median(text_ranks) + 1)
    return metrics


def encode_images(model, images, batch_size=64):
    """Unit-norm image embeddings of encoded images or pixels, batch by batch.

    Args:
        model: a `keras_clip.CLIP`.
        images: a list of encoded image bytes (JPEG, PNG, ...), a `tf.string`
            vector, a uint8 array `(N, H, W, 3)` (these go through
            `model.image_preprocessor()`), or a float array `(N, S, S, 3)`
            already preprocessed.
        batch_size: int, images per forward pass.

    Returns:
        float32 numpy `(N, E)`.
    """
    import tensorflow as tf

    preprocessor = model.image_preprocessor()
    num = len(images)
    chunks = []
    for start in range(0, num, batch_size):
        batch = images[start : start + batch_size]
        if isinstance(batch, (list, tuple)):
            batch = tf.constant(list(batch), dtype=tf.string)
        batch = tf.convert_to_tensor(batch)
        if batch.dtype == tf.string or batch.dtype.is_integer:
            batch = preprocessor(batch)  # (n, S, S, 3)
        chunks.append(np.asarray(model.encode_image(batch), np.float32))
    logging.info("Encoded %d images.", num)
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, model.embed_dim), np.float32)


def encode_texts(model, texts, batch_size=256):
    """Unit-norm text embeddings of raw strings, tokenised like `clip.tokenize`.

    Texts longer than the model's context length are truncated (the last kept
    token becomes the end token), as `open_clip.tokenize` does.

    Args:
        model: a `keras_clip.CLIP`.
        texts: list of str.
        batch_size: int, texts per forward pass.

    Returns:
        float32 numpy `(M, E)`.
    """
    from keras_clip.preprocessing.tokenizer import tokenize

    chunks = []
    for start in range(0, len(texts), batch_size):
        token_ids = tokenize(list(texts[start : start + batch_size]), model.context_length)
        chunks.append(np.asarray(model.encode_text(token_ids, trim=True), np.float32))
    logging.info("Encoded %d texts.", len(texts))
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, model.embed_dim), np.float32)


def evaluate_retrieval(model, images, captions, text_to_image, ks=(1, 5, 10),
                       image_batch_size=64, text_batch_size=256):
    """Encodes images and captions with `model` and returns `retrieval_recall`.

    Args:
        model: a `keras_clip.CLIP`.
        images: N images, in any form `encode_images` accepts.
        captions: list of M str.
        text_to_image: int `(M,)`, the image index of every caption.
        ks: iterable of positive ints.
        image_batch_size, text_batch_size: ints, forward-pass batch sizes.

    Returns:
        The metrics dict of `retrieval_recall`.
    """
    image_embeddings = encode_images(model, images, batch_size=image_batch_size)
    text_embeddings = encode_texts(model, captions, batch_size=text_batch_size)
    metrics = retrieval_recall(image_embeddings, text_embeddings, text_to_image, ks=ks)
    logging.info("Retrieval on %d images / %d captions: %s", len(image_embeddings),
                 len(text_embeddings), metrics)
    return metrics
