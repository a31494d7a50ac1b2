"""PyTorch's default initialisation, for the tensors the reference CLIP leaves at it.

OpenAI's `CLIP.initialize_parameters` (and open_clip's) sets only some tensors: the
text transformer's weight matrices, the embeddings, the projections, the ResNet
attention pool and the ResNet blocks' last BatchNorm gains. Everything else, the whole
ViT image tower included, keeps what `torch.nn` gives it:

- `nn.Linear` / `nn.Conv2d` weights: `kaiming_uniform_(a=sqrt(5))`, i.e.
  `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`; Keras' `glorot_uniform` default is far smaller
  for a patchify convolution (fan_out = patch^2 * width).
- their biases: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (Keras: zeros);
- `nn.MultiheadAttention`: `xavier_uniform_` on the packed `(3 D, D)` projection (=
  Keras' `glorot_uniform` on the `(D, 3 D)` kernel), zero biases for both projections.
"""
import keras


def torch_default_kernel():
    """`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, as `nn.Linear` and `nn.Conv2d` weights.

    Keras' fan-in of a Dense kernel `(in, out)` is `in` and of a Conv2D kernel
    `(h, w, in, out)` is `h * w * in`, the same as PyTorch's for the transposed tensors.
    """
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def torch_default_bias(fan_in):
    """`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, as `nn.Linear` biases."""
    bound = float(fan_in) ** -0.5
    return keras.initializers.RandomUniform(-bound, bound)
