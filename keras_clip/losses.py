"""The symmetric contrastive (InfoNCE) loss of CLIP, on already-normalised features.

No distribution code here: the caller passes its local rows and the (possibly
gathered) full set of columns, plus the offset of its rows inside that set.
"""
import keras
import tensorflow as tf


def contrastive_logits(local_image, local_text, all_image, all_text, logit_scale):
    """Logits of local rows against all columns.

    Args:
        local_image, local_text: `(b, E)` unit-norm features of this replica's pairs.
        all_image, all_text: `(N, E)` features of every replica's pairs (N = global
            batch; equal to the local tensors without replicas).
        logit_scale: scalar, the temperature's inverse.

    Returns:
        `(logits_per_image, logits_per_text)`, each `(b, N)` float32 (the features are
        cast to float32 first; open_clip under torch autocast multiplies them in bf16).
    """
    # float32 whatever the towers' compute dtype: a (b, N, E) product, small next to the
    # towers, and bf16 logits (up to 100) would be rounded to 0.25-0.5 before the softmax.
    local_image, local_text, all_image, all_text = (
        tf.cast(t, tf.float32) for t in (local_image, local_text, all_image, all_text))
    scale = tf.cast(logit_scale, tf.float32)
    logits_per_image = scale * tf.matmul(local_image, all_text, transpose_b=True)  # (b, N)
    logits_per_text = scale * tf.matmul(local_text, all_image, transpose_b=True)  # (b, N)
    return logits_per_image, logits_per_text


def clip_loss(local_image, local_text, all_image, all_text, logit_scale, label_offset=0):
    """Mean symmetric cross-entropy over this replica's rows.

    Row i of this replica is pair `label_offset + i` of the global batch, so its
    positive column is `label_offset + i`. The global-batch loss is the mean of this
    value over replicas (all replicas hold the same number of rows).

    Returns:
        dict: `loss` (scalar float32), `image_to_text_accuracy` and
        `text_to_image_accuracy` (fraction of local rows whose positive is the argmax),
        and the two logits tensors (`logits_per_image`, `logits_per_text`).
    """
    logits_per_image, logits_per_text = contrastive_logits(
        local_image, local_text, all_image, all_text, logit_scale
    )
    logits_per_image = tf.cast(logits_per_image, tf.float32)
    logits_per_text = tf.cast(logits_per_text, tf.float32)
    labels = label_offset + tf.range(tf.shape(local_image)[0])  # (b,)
    ce = keras.losses.sparse_categorical_crossentropy
    loss = 0.5 * (
        tf.reduce_mean(ce(labels, logits_per_image, from_logits=True))
        + tf.reduce_mean(ce(labels, logits_per_text, from_logits=True))
    )
    return _step_outputs(loss, logits_per_image, logits_per_text, labels)


def sigmoid_loss(local_image, local_text, all_image, all_text, logit_scale, logit_bias,
                 label_offset=0):
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023) over this replica's rows.

    Every (image, text) pair of the global batch is an independent binary problem:
    `-log sigmoid(z_ij * (scale * <x_i, y_j> + bias))`, `z_ij = 1` on the diagonal and
    `-1` elsewhere, summed over the N texts and averaged over images. This replica
    scores only its `b` images against the N gathered texts (a `(b, N)` matrix), so no
    device materialises the global `N x N` matrix; the mean of this value over replicas
    is the global loss (the paper's normalisation: divided by the batch size).

    Deviation from the paper: the paper passes text chunks around the replicas in a
    ring (`ppermute`); here the texts are all-gathered once (the same all-gather the
    softmax loss uses), which costs `N x E` memory per replica but the same `b x N`
    logits.

    Args:
        local_image, local_text: `(b, E)` unit-norm features of this replica's pairs.
        all_image, all_text: `(N, E)`; `all_image` is used only for the text-to-image
            accuracy (no gradient flows through it into the loss).
        logit_scale, logit_bias: scalars (SigLIP initialises them to 10 and -10).
        label_offset: int, index of this replica's first pair in the global batch.

    Returns:
        The same dict as `clip_loss`; `logits_per_image` includes the bias.
    """
    scale = tf.cast(logit_scale, tf.float32)
    bias = tf.cast(logit_bias, tf.float32)
    cosine = tf.matmul(tf.cast(local_image, tf.float32), tf.cast(all_text, tf.float32),
                       transpose_b=True)  # (b, N), float32 as in `contrastive_logits`
    logits_per_image = scale * cosine + bias
    labels = label_offset + tf.range(tf.shape(local_image)[0])  # (b,)
    signs = 2.0 * tf.one_hot(labels, tf.shape(all_text)[0], dtype=tf.float32) - 1.0  # (b, N)
    loss = -tf.reduce_mean(tf.reduce_sum(tf.math.log_sigmoid(signs * logits_per_image), axis=1))
    logits_per_text = scale * tf.matmul(tf.cast(local_text, tf.float32),
                                        tf.stop_gradient(tf.cast(all_image, tf.float32)),
                                        transpose_b=True) + bias
    return _step_outputs(loss, logits_per_image, logits_per_text, labels)


def _step_outputs(loss, logits_per_image, logits_per_text, labels):
    """The loss with the retrieval accuracies of this replica's rows and both logits."""
    def hit(logits):  # fraction of rows whose positive column is the arg-max
        predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
        return tf.reduce_mean(tf.cast(tf.equal(predicted, labels), tf.float32))

    return {
        "loss": loss,
        "image_to_text_accuracy": hit(logits_per_image),
        "text_to_image_accuracy": hit(logits_per_text),
        "logits_per_image": logits_per_image,
        "logits_per_text": logits_per_text,
    }
