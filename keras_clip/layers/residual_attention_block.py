"""Pre-LayerNorm transformer block used by both CLIP towers."""
import keras
from keras import ops

from keras_clip.layers.activations import get_activation
from keras_clip.layers.fast_ops import dense_rows, fusable, layer_norm
from keras_clip.layers.attention import CLIPAttention
from keras_clip.layers.initializers import torch_default_bias, torch_default_kernel

_QUICK_GELU = 1.702  # QuickGELU's sigmoid slope


@keras.saving.register_keras_serializable(package="keras_clip")
class ResidualAttentionBlock(keras.layers.Layer):
    """`x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, as OpenAI's `ResidualAttentionBlock`.

    Args:
        hidden_dim: int. Width of the residual stream.
        num_heads: int. Attention heads.
        intermediate_dim: int. Hidden width of the MLP (4 * hidden_dim in every CLIP).
        activation: `"quick_gelu"` (OpenAI weights) or `"gelu"` (most LAION weights).
        layer_norm_epsilon: float. 1e-5 as in PyTorch (Keras defaults to 1e-3).
        attention_std: std of the normal init of the packed qkv projection; `None`:
            PyTorch's `nn.MultiheadAttention` default (xavier uniform).
        projection_std: std of the normal init of the attention-output and MLP-output
            projections; `None`: PyTorch's `nn.Linear` default.
        mlp_std: std of the normal init of the MLP input projection; `None`: PyTorch's
            `nn.Linear` default.
        The MLP biases always start as `nn.Linear`'s (uniform in +-1/sqrt(fan_in)), the
        attention biases at zero: the reference sets only weight matrices.

    Call arguments:
        x: `(batch, length, hidden_dim)`.
        causal: bool, causal self-attention (text tower).

    Returns:
        `(batch, length, hidden_dim)`.
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        intermediate_dim,
        activation="quick_gelu",
        layer_norm_epsilon=1e-5,
        attention_std=None,
        projection_std=None,
        mlp_std=None,
        **kwargs,
    ):
        # No autocast: under a mixed policy the residual stream keeps the dtype it arrives
        # in (the text tower passes float32, as torch autocast does); the branches cast to
        # the compute dtype themselves.
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        if intermediate_dim <= 0:
            raise ValueError(
                f"`intermediate_dim` must be positive. Received: intermediate_dim={intermediate_dim}"
            )
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_std = attention_std
        self.projection_std = projection_std
        self.mlp_std = mlp_std
        self._activation_fn = get_activation(activation)
        def init(std):
            return torch_default_kernel() if std is None else keras.initializers.RandomNormal(stddev=std)

        self.ln_1 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="ln_1", dtype=self.dtype_policy
        )
        self.attn = CLIPAttention(
            hidden_dim,
            num_heads,
            kernel_initializer=(
                "glorot_uniform" if attention_std is None
                else keras.initializers.RandomNormal(stddev=attention_std)
            ),
            output_kernel_initializer=init(projection_std),
            name="attn",
            dtype=self.dtype_policy,
        )
        self.ln_2 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="ln_2", dtype=self.dtype_policy
        )
        self.c_fc = keras.layers.Dense(
            intermediate_dim, kernel_initializer=init(mlp_std),
            bias_initializer=torch_default_bias(hidden_dim), name="c_fc",
            dtype=self.dtype_policy,
        )
        self.c_proj = keras.layers.Dense(
            hidden_dim, kernel_initializer=init(projection_std),
            bias_initializer=torch_default_bias(intermediate_dim), name="c_proj",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        self.ln_1.build(input_shape)
        self.attn.build(input_shape)
        self.ln_2.build(input_shape)
        self.c_fc.build(input_shape)
        self.c_proj.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))

    def call(self, x, causal=False):
        # x: (B, T, D) residual stream, in the compute dtype or (mixed policies, text tower)
        # in float32; each branch runs in the compute dtype and is added back in x's dtype.
        compute = self.compute_dtype
        h = self._norm(self.ln_1, x)  # (B, T, D), compute dtype
        x = x + ops.cast(self.attn(h, causal=causal), x.dtype)  # (B, T, D)
        rows = ops.reshape(x, (-1, self.hidden_dim))  # (B*T, D)
        if self.activation == "quick_gelu" and fusable(self.c_fc) and fusable(self.c_proj):
            # x * sigmoid(1.702 x) = swish(1.702 x) / 1.702. The 1.702 goes into ln_2's
            # gain and bias and c_fc's bias ((D,)-vectors), so c_fc's MatMul, BiasAdd
            # and Swish fuse into one oneDNN op; 1 / 1.702 scales c_proj's output.
            # A separate QuickGELU cost ~40% of c_fc's matmul time in bf16.
            h = dense_rows(self.c_fc, ops.cast(layer_norm(self.ln_2, rows, scale=_QUICK_GELU), compute),
                           activation="swish", bias_scale=_QUICK_GELU)  # (B*T, 4D)
            out = dense_rows(self.c_proj, h, bias_scale=_QUICK_GELU) * ops.cast(
                1.0 / _QUICK_GELU, h.dtype)  # (B*T, D)
        elif self.activation == "gelu":  # exact GELU: fused as it is
            h = dense_rows(self.c_fc, self._norm(self.ln_2, rows), activation="gelu")  # (B*T, 4D)
            out = dense_rows(self.c_proj, h)  # (B*T, D)
        else:  # quantized or LoRA layers
            h = self._activation_fn(self.c_fc(self._norm(self.ln_2, rows)))  # (B*T, 4D)
            out = self.c_proj(h)  # (B*T, D)
        return x + ops.cast(ops.reshape(out, ops.shape(x)), x.dtype)  # (B, T, D)

    def _norm(self, layer, x):
        """`layer(x)` in the compute dtype; a float32 residual stream under a mixed policy
        is normalised from its float32 values (statistics in float32 either way)."""
        if keras.backend.standardize_dtype(x.dtype) == self.compute_dtype:
            return layer(x)  # Keras' LayerNormalization, as before float32 streams
        return ops.cast(layer_norm(layer, x), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "activation": self.activation,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "attention_std": self.attention_std,
                "projection_std": self.projection_std,
                "mlp_std": self.mlp_std,
            }
        )
        return config


def residual_attention_blocks(hidden_dim, num_layers, num_heads, intermediate_dim, activation,
                              layer_norm_epsilon, dtype=None, openai_init=True):
    """`num_layers` blocks named `resblocks_{i}`, initialised as the reference does.

    `openai_init=True` (text tower): OpenAI's `initialize_parameters` scales, attention
    std `hidden_dim^-0.5`, output projections `hidden_dim^-0.5 (2 L)^-0.5`, MLP input
    `(2 hidden_dim)^-0.5`. `False` (ViT image tower, which neither OpenAI nor open_clip
    initialises): PyTorch's defaults for every weight.
    """
    stds = dict(
        attention_std=hidden_dim**-0.5,
        projection_std=hidden_dim**-0.5 * (2 * num_layers) ** -0.5,
        mlp_std=(2 * hidden_dim) ** -0.5,
    ) if openai_init else {}
    return [
        ResidualAttentionBlock(
            hidden_dim,
            num_heads,
            intermediate_dim,
            activation=activation,
            layer_norm_epsilon=layer_norm_epsilon,
            name=f"resblocks_{i}",
            dtype=dtype,
            **stds,
        )
        for i in range(num_layers)
    ]
