"""Dense and LayerNorm written as the op patterns oneDNN's graph rewrite fuses.

TensorFlow's grappler remapper (with oneDNN, on by default on x86) fuses a 2-D
`MatMul` directly followed by `BiasAdd`, and optionally by `Gelu` or by
`x * Sigmoid(x)` (Swish), into one `_MklFusedMatMul`: the bias and activation are
applied in the matmul's output loop instead of as separate passes over memory. Keras'
`Dense` on a `(batch, length, dim)` input emits `MatMul -> Reshape -> AddV2`, which
the rewrite does not match. These helpers take the Dense layer's own weights (names,
checkpoints and initialisers unchanged) and emit the fusable pattern on `(rows, dim)`.

Measured on the 2-core development machine, bf16, rows 1600, 768 -> 3072
(docs/speed.md): MatMul alone 79.7 ms, + BiasAdd 74.7 ms (fused), + QuickGELU
103.9 ms (not fused: `x * sigmoid(1.702 x)` is no Swish), + Swish 79.5 ms (fused).
"""
import tensorflow as tf
from keras import ops


def fusable(layer):
    """Whether `dense_rows` can use `layer`'s kernel and bias directly (not quantized,
    no LoRA)."""
    return not (getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False))


def dense_rows(layer, x, activation=None, bias_scale=None):
    """`activation(x @ kernel + bias)` for a 2-D `x` `(rows, in)` -> `(rows, out)`.

    Args:
        layer: a built `keras.layers.Dense` (its `kernel` and `bias` are used; a
            quantized or LoRA-enabled layer is called as is, unfused).
        x: `(rows, in)` tensor in the layer's compute dtype.
        activation: None, `"gelu"` (exact, erf) or `"swish"` (`x * sigmoid(x)`),
            both fused by oneDNN.
        bias_scale: optional Python float multiplying the bias (a `(out,)` vector,
            so free) before it is added.
    """
    if not fusable(layer):
        if bias_scale is not None:
            raise ValueError("`bias_scale` needs a fusable layer (not quantized, no LoRA).")
        y = layer(x)
    else:
        y = tf.matmul(x, ops.cast(layer.kernel, x.dtype))  # (rows, out)
        if layer.use_bias:
            bias = ops.cast(layer.bias, x.dtype)
            if bias_scale is not None:
                bias = bias * ops.cast(bias_scale, x.dtype)
            y = tf.nn.bias_add(y, bias)
    if activation == "gelu":
        return tf.nn.gelu(y, approximate=False)
    if activation == "swish":
        return y * tf.sigmoid(y)
    if activation is not None:
        raise ValueError(f"`activation` must be None, 'gelu' or 'swish'. Received: activation={activation!r}")
    return y


def layer_norm(layer, x, scale=None):
    """`layer(x)` for a `keras.layers.LayerNormalization` over the last axis, with its
    gain and bias optionally multiplied by the Python float `scale` (free: `(dim,)`
    vectors). Statistics in float32 whatever the compute dtype, as Keras does; the
    result in `x`'s dtype."""
    x32 = ops.cast(x, "float32")
    mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
    gamma = ops.cast(layer.gamma, "float32")
    beta = ops.cast(layer.beta, "float32")
    if scale is not None:
        gamma, beta = gamma * scale, beta * scale
    y = (x32 - mean) * (tf.math.rsqrt(variance + layer.epsilon) * gamma) + beta
    return ops.cast(y, x.dtype)
