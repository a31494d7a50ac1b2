"""Small TensorFlow helpers shared by the tokenizer's BPE and text-cleaning parts."""
import tensorflow as tf


def _static_table(keys, values, key_dtype, value_dtype, default_value, name):
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, dtype=key_dtype),
            tf.constant(values, dtype=value_dtype),
        ),
        default_value=default_value,
        name=name,
    )


def _ragged_from_flat(flat_values, like):
    return tf.RaggedTensor.from_row_splits(flat_values, like.row_splits, validate=False)


def _replace_rows(texts, mask, fn):
    """Applies `fn` to the rows of `texts` where `mask` is true; others unchanged.

    Batches with no such row skip `fn` entirely (the common, all-ASCII case).
    """

    def replace():
        indices = tf.where(mask)  # (S, 1)
        updated = fn(tf.gather_nd(texts, indices))  # (S,)
        return tf.tensor_scatter_nd_update(texts, indices, updated)

    return tf.cond(tf.reduce_any(mask), replace, lambda: texts)
