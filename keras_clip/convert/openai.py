"""OpenAI / open_clip state-dict layout: architecture inference and weight assignment.

open_clip's `CLIP` class keeps OpenAI's parameter names, so one mapping serves both.
"""
import math
import re

import numpy as np

from keras_clip.convert.checkpoint import CheckpointError

# Keys that carry no weights we need.
_IGNORED = re.compile(r"(num_batches_tracked|attn_mask|^input_resolution$|^context_length$|^vocab_size$)")


# Bounds on architectures read from a checkpoint (OpenAI's and LAION's largest CLIPs,
# ViT-bigG/14: 48 vision layers, width 1664). Tensors are checked against each other
# before a model is built, so a model can never be larger than the tensors in the
# file; these bounds only turn absurd files into a clear error early.
MAX_NUM_LAYERS = 256  # transformer blocks per tower, bottleneck blocks per ResNet stage
MAX_HIDDEN_DIM = 16384  # transformer width, ResNet width x 32
_HEAD_WIDTH = 64  # OpenAI's build_model: heads = width // 64


def _shape(sd, key, tower):
    if key not in sd:
        raise CheckpointError(f"Unsupported checkpoint: the {tower} needs `{key}`, which is missing")
    return tuple(int(d) for d in np.shape(sd[key]))


def _expect(sd, key, shape, tower):
    actual = _shape(sd, key, tower)
    if actual != tuple(shape):
        raise CheckpointError(
            f"Inconsistent checkpoint: `{key}` must have shape {tuple(shape)} to match the "
            f"rest of the {tower}; Received: shape {actual}"
        )


def _expect_rank(sd, key, rank, meaning, tower):
    shape = _shape(sd, key, tower)
    if len(shape) != rank or min(shape, default=1) < 1:
        raise CheckpointError(
            f"Unsupported checkpoint: `{key}` must be a {rank}-D tensor ({meaning}) with no "
            f"empty dimension; Received: shape {shape}"
        )
    return shape


def _bounded(value, limit, what, key, limit_name="MAX_HIDDEN_DIM"):
    if value > limit:
        raise CheckpointError(
            f"Unsupported checkpoint: {what} of {value} (from `{key}`) exceeds the limit of "
            f"{limit} (keras_clip.convert.openai.{limit_name})"
        )
    return value


def _num_heads(width, key, tower, heads=None):
    """OpenAI's heads = width // 64, or a given head count (Hugging Face configs), checked."""
    if heads is not None:
        if not (isinstance(heads, int) and 1 <= heads <= width and width % heads == 0):
            raise CheckpointError(
                f"Unsupported checkpoint: the {tower} width {width} (from `{key}`) must split "
                f"evenly into its attention heads; Received: num_heads={heads!r:.40}"
            )
        return heads
    heads = width // _HEAD_WIDTH
    if heads < 1 or width % heads:
        raise CheckpointError(
            f"Unsupported checkpoint: the {tower} width {width} (from `{key}`) gives "
            f"{heads} attention heads under OpenAI's rule heads = width // {_HEAD_WIDTH}; the "
            f"width must be at least {_HEAD_WIDTH} and divisible by its head count. "
            f"Received: width={width}"
        )
    return heads


def _layer_count(sd, prefix, tower):
    """Number of blocks under `prefix` (`...resblocks.`), requiring indices 0..N-1."""
    indices = set()
    for key in sd:
        if key.startswith(prefix):
            index = key[len(prefix):].split(".", 1)[0]
            if not re.fullmatch(r"0|[1-9][0-9]{0,8}", index):
                raise CheckpointError(
                    f"Unsupported checkpoint: `{key}` has a block index that is not a plain "
                    f"integer; Received: {index!r:.40}"
                )
            indices.add(int(index))
    if not indices:
        raise CheckpointError(f"Unsupported checkpoint: the {tower} has no blocks (no `{prefix}0.*` keys)")
    count = len(indices)
    if max(indices) != count - 1:  # then one of 0..count-1 is missing
        gap = next(i for i in range(count) if i not in indices)
        raise CheckpointError(
            f"Unsupported checkpoint: the {tower} block indices must run 0..N-1 without gaps; "
            f"`{prefix}{gap}.*` is missing (found {count} blocks, highest index {max(indices)})"
        )
    if count > MAX_NUM_LAYERS:
        raise CheckpointError(
            f"Unsupported checkpoint: the {tower} has {count} blocks (`{prefix}0..{count - 1}`), "
            f"more than the limit of {MAX_NUM_LAYERS} (keras_clip.convert.openai.MAX_NUM_LAYERS)"
        )
    return count


def _transformer_blocks(sd, prefix, width, tower):
    """Checks every block of a transformer tower; returns (num_layers, intermediate_dim)."""
    count = _layer_count(sd, prefix, tower)
    key = f"{prefix}0.mlp.c_fc.weight"
    intermediate = _expect_rank(sd, key, 2, "MLP width x model width", tower)[0]
    _bounded(intermediate, 4 * MAX_HIDDEN_DIM, "an MLP width", key)
    w, i = width, intermediate
    expected = {
        "ln_1.weight": (w,), "ln_1.bias": (w,),
        "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
        "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,),
        "ln_2.weight": (w,), "ln_2.bias": (w,),
        "mlp.c_fc.weight": (i, w), "mlp.c_fc.bias": (i,),
        "mlp.c_proj.weight": (w, i), "mlp.c_proj.bias": (w,),
    }
    for index in range(count):
        for name, shape in expected.items():
            _expect(sd, f"{prefix}{index}.{name}", shape, tower)
    return count, intermediate


def _batch_norm(sd, prefix, channels, tower):
    for name in ("weight", "bias", "running_mean", "running_var"):
        _expect(sd, f"{prefix}.{name}", (channels,), tower)


def _square_grid(tokens, extra, key):
    grid = math.isqrt(max(tokens - extra, 0))
    if grid < 1 or grid * grid + extra != tokens:
        raise CheckpointError(
            f"Unsupported checkpoint: `{key}` must hold a square grid of positions"
            f"{' plus the class token' if extra else ''}; Received: {tokens} positions"
        )
    return grid


def _vit_config(sd, embed_dim, num_heads=None):
    tower = "ViT image tower"
    width, channels, patch, patch_w = _expect_rank(
        sd, "visual.conv1.weight", 4, "width x 3 x patch x patch", tower
    )
    if channels != 3 or patch != patch_w:
        raise CheckpointError(
            "Unsupported checkpoint: `visual.conv1.weight` must have shape (width, 3, patch, "
            f"patch); Received: shape {(width, channels, patch, patch_w)}"
        )
    _bounded(width, MAX_HIDDEN_DIM, "an image tower width", "visual.conv1.weight")
    heads = _num_heads(width, "visual.conv1.weight", tower, num_heads)
    tokens = _expect_rank(sd, "visual.positional_embedding", 2, "positions x width", tower)[0]
    grid = _square_grid(tokens, 1, "visual.positional_embedding")
    _expect(sd, "visual.positional_embedding", (tokens, width), tower)
    _expect(sd, "visual.class_embedding", (width,), tower)
    for norm in ("visual.ln_pre", "visual.ln_post"):
        _expect(sd, f"{norm}.weight", (width,), tower)
        _expect(sd, f"{norm}.bias", (width,), tower)
    _expect(sd, "visual.proj", (width, embed_dim), tower)
    layers, intermediate = _transformer_blocks(sd, "visual.transformer.resblocks.", width, tower)
    return dict(
        vision_architecture="vit", vision_hidden_dim=width, vision_patch_size=patch,
        vision_num_layers=layers, image_size=patch * grid, vision_num_heads=heads,
        vision_intermediate_dim=intermediate,
    )


def _resnet_config(sd, embed_dim):
    tower = "ResNet image tower"
    width = _expect_rank(sd, "visual.layer1.0.conv1.weight", 4, "planes x inputs x 1 x 1", tower)[0]
    _bounded(32 * width, MAX_HIDDEN_DIM, "a ResNet output width (32 x width)", "visual.layer1.0.conv1.weight")
    if width % 2:
        raise CheckpointError(
            f"Unsupported checkpoint: the ResNet width (from `visual.layer1.0.conv1.weight`) must be even; Received: width={width}"
        )
    heads = _num_heads(32 * width, "visual.layer1.0.conv1.weight", tower)
    half = width // 2
    for i, (out, inp) in enumerate([(half, 3), (half, half), (width, half)], start=1):
        _expect(sd, f"visual.conv{i}.weight", (out, inp, 3, 3), tower)
        _batch_norm(sd, f"visual.bn{i}", out, tower)
    counts, inplanes = [], width
    for stage in range(1, 5):
        blocks = _layer_count(sd, f"visual.layer{stage}.", tower)
        planes = width * 2 ** (stage - 1)
        for b in range(blocks):
            prefix = f"visual.layer{stage}.{b}"
            _expect(sd, f"{prefix}.conv1.weight", (planes, inplanes, 1, 1), tower)
            _expect(sd, f"{prefix}.conv2.weight", (planes, planes, 3, 3), tower)
            _expect(sd, f"{prefix}.conv3.weight", (4 * planes, planes, 1, 1), tower)
            for j, channels in ((1, planes), (2, planes), (3, 4 * planes)):
                _batch_norm(sd, f"{prefix}.bn{j}", channels, tower)
            if b == 0:
                _expect(sd, f"{prefix}.downsample.0.weight", (4 * planes, inplanes, 1, 1), tower)
                _batch_norm(sd, f"{prefix}.downsample.1", 4 * planes, tower)
            inplanes = 4 * planes
        counts.append(blocks)
    dim = 32 * width
    tokens = _expect_rank(sd, "visual.attnpool.positional_embedding", 2, "positions x width", tower)[0]
    spatial = _square_grid(tokens, 1, "visual.attnpool.positional_embedding")
    _expect(sd, "visual.attnpool.positional_embedding", (tokens, dim), tower)
    for name, out in (("q_proj", dim), ("k_proj", dim), ("v_proj", dim), ("c_proj", embed_dim)):
        _expect(sd, f"visual.attnpool.{name}.weight", (out, dim), tower)
        _expect(sd, f"visual.attnpool.{name}.bias", (out,), tower)
    return dict(
        vision_architecture="resnet", vision_hidden_dim=width, vision_num_layers=counts,
        image_size=spatial * 32, vision_num_heads=heads, vision_patch_size=None,
    )


def config_from_state_dict(sd, text_num_heads=None, vision_num_heads=None):
    """CLIP constructor kwargs inferred from an OpenAI-layout state dict.

    Follows OpenAI's `build_model`: ViT if `visual.proj` exists, else a modified
    ResNet; widths from tensor shapes, depths from key counts, heads = width / 64.
    Before anything is built, every tensor the architecture needs is checked to be
    present with the shape the other tensors imply (block indices must run 0..N-1),
    so a crafted file cannot make keras_clip build a model larger than the file.

    Args:
        sd: `{key: array}` in OpenAI layout.
        text_num_heads, vision_num_heads: head counts known from elsewhere (a Hugging
            Face config); by default OpenAI's width // 64.

    Raises:
        CheckpointError: the tensors are not those of a CLIP with a ViT or modified
            ResNet image tower and a transformer text tower, are inconsistent with
            each other, or exceed `MAX_NUM_LAYERS` / `MAX_HIDDEN_DIM`. The message
            names the offending key.
    """
    required = ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:5])
        raise CheckpointError(
            "Unsupported checkpoint: not a CLIP state dict in OpenAI/open_clip layout "
            f"(missing {missing}; first keys: {sample})"
        )
    vit = "visual.proj" in sd
    if not vit and not ("visual.layer1.0.conv1.weight" in sd and "visual.attnpool.positional_embedding" in sd):
        vision_keys = sorted(k for k in sd if k.startswith("visual."))[:5]
        raise CheckpointError(
            "Unsupported checkpoint: the image tower is neither a CLIP ViT (`visual.proj`) "
            f"nor a modified ResNet (`visual.attnpool`). First visual keys: {vision_keys}"
        )
    tower = "text tower"
    text_width = _expect_rank(sd, "ln_final.weight", 1, "text width", tower)[0]
    _bounded(text_width, MAX_HIDDEN_DIM, "a text width", "ln_final.weight")
    text_heads = _num_heads(text_width, "ln_final.weight", tower, text_num_heads)
    _expect(sd, "ln_final.bias", (text_width,), tower)
    projection = _expect_rank(sd, "text_projection", 2, "text width x embedding dim", tower)
    _expect(sd, "text_projection", (text_width, projection[1]), tower)
    embed_dim = projection[1]
    vocabulary = _expect_rank(sd, "token_embedding.weight", 2, "vocabulary x text width", tower)[0]
    _expect(sd, "token_embedding.weight", (vocabulary, text_width), tower)
    context = _expect_rank(sd, "positional_embedding", 2, "context length x text width", tower)[0]
    _expect(sd, "positional_embedding", (context, text_width), tower)
    text_layers, text_intermediate = _transformer_blocks(sd, "transformer.resblocks.", text_width, tower)

    config = _vit_config(sd, embed_dim, vision_num_heads) if vit else _resnet_config(sd, embed_dim)
    config.update(
        embed_dim=embed_dim,
        context_length=context,
        vocabulary_size=vocabulary,
        text_hidden_dim=text_width,
        text_num_heads=text_heads,
        text_num_layers=text_layers,
        text_intermediate_dim=text_intermediate,
    )
    if "logit_scale" in sd:
        value = np.asarray(sd["logit_scale"], dtype=np.float64)
        if value.size != 1 or not np.isfinite(value).all() or abs(float(value.reshape(()))) > 100:
            raise CheckpointError(
                "Unsupported checkpoint: `logit_scale` must be one finite number (log of the "
                f"temperature); Received: shape {value.shape}"
            )
        config["initial_logit_scale"] = float(math.exp(float(value.reshape(()))))
    if "logit_bias" in sd:  # trained with the sigmoid (SigLIP) loss, as open_clip writes it
        bias = np.asarray(sd["logit_bias"], dtype=np.float64)
        if bias.size != 1 or not np.isfinite(bias).all():
            raise CheckpointError(
                "Unsupported checkpoint: `logit_bias` must be one finite number; "
                f"Received: shape {bias.shape}")
        config.update(loss="sigmoid", initial_logit_bias=float(bias.reshape(())))
    return config


class LayoutVisitor:
    """Visits every variable of a `CLIP` with its OpenAI state-dict key.

    Subclasses define `__call__(variable, key, to_torch=None, to_keras=None)`, where
    the two functions map a value between the PyTorch layout of `key` and the Keras
    layout of `variable` (None: the same). `visit_layout` drives it, so the reader
    (`_Assigner`) and the writer (`keras_clip.convert.writers`) share one mapping.
    """

    def dense(self, layer, prefix):
        self(layer.kernel, prefix + ".weight", np.transpose, np.transpose)
        if layer.use_bias:
            self(layer.bias, prefix + ".bias")

    def layer_norm(self, layer, prefix):
        self(layer.gamma, prefix + ".weight")
        self(layer.beta, prefix + ".bias")

    def conv(self, layer, key):
        self(layer.kernel, key,
             lambda w: np.transpose(w, (3, 2, 0, 1)),  # HWIO -> OIHW
             lambda w: np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO

    def batch_norm(self, layer, prefix):
        self(layer.gamma, prefix + ".weight")
        self(layer.beta, prefix + ".bias")
        self(layer.moving_mean, prefix + ".running_mean")
        self(layer.moving_variance, prefix + ".running_var")

    def block(self, block, prefix):
        self.layer_norm(block.ln_1, prefix + ".ln_1")
        self(block.attn.qkv.kernel, prefix + ".attn.in_proj_weight", np.transpose, np.transpose)
        self(block.attn.qkv.bias, prefix + ".attn.in_proj_bias")
        self.dense(block.attn.out_proj, prefix + ".attn.out_proj")
        self.layer_norm(block.ln_2, prefix + ".ln_2")
        self.dense(block.c_fc, prefix + ".mlp.c_fc")
        self.dense(block.c_proj, prefix + ".mlp.c_proj")


def visit_layout(model, visitor, logit_scale=True):
    """Calls `visitor` on every variable of `model` with its OpenAI state-dict key."""
    text = model.text
    visitor(text.token_embedding.embeddings, "token_embedding.weight")
    visitor(text.positional_embedding, "positional_embedding")
    for i, block in enumerate(text.resblocks):
        visitor.block(block, f"transformer.resblocks.{i}")
    visitor.layer_norm(text.ln_final, "ln_final")
    visitor(text.text_projection, "text_projection")
    reshape = lambda v: np.reshape(v, ())  # noqa: E731 - a 0-d tensor both ways
    if logit_scale:
        visitor(model.logit_scale.log_scale, "logit_scale", reshape, reshape)
    if model.logit_bias is not None:  # sigmoid loss; open_clip's SigLIP-style `logit_bias`
        visitor(model.logit_bias.bias, "logit_bias", reshape, reshape)

    visual = model.visual
    if model.vision_architecture == "vit":
        visitor.conv(visual.conv1, "visual.conv1.weight")
        visitor(visual.class_embedding, "visual.class_embedding")
        visitor(visual.positional_embedding, "visual.positional_embedding")
        visitor.layer_norm(visual.ln_pre, "visual.ln_pre")
        for i, block in enumerate(visual.resblocks):
            visitor.block(block, f"visual.transformer.resblocks.{i}")
        visitor.layer_norm(visual.ln_post, "visual.ln_post")
        visitor(visual.proj, "visual.proj")
        return
    for i, (_, conv, bn) in enumerate(visual.stem, start=1):
        visitor.conv(conv, f"visual.conv{i}.weight")
        visitor.batch_norm(bn, f"visual.bn{i}")
    for s, stage in enumerate(visual.stages, start=1):
        for b, block in enumerate(stage):
            prefix = f"visual.layer{s}.{b}"
            for j in (1, 2, 3):
                visitor.conv(getattr(block, f"conv{j}"), f"{prefix}.conv{j}.weight")
                visitor.batch_norm(getattr(block, f"bn{j}"), f"{prefix}.bn{j}")
            if block.has_downsample:
                visitor.conv(block.downsample_conv, f"{prefix}.downsample.0.weight")
                visitor.batch_norm(block.downsample_bn, f"{prefix}.downsample.1")
    pool = visual.attnpool
    visitor(pool.positional_embedding, "visual.attnpool.positional_embedding")
    for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
        visitor.dense(getattr(pool, name), f"visual.attnpool.{name}")


class _Assigner(LayoutVisitor):
    """Assigns checkpoint tensors to variables, checking shapes and tracking use."""

    def __init__(self, sd):
        self.sd = sd
        self.used = set()

    def __call__(self, variable, key, to_torch=None, to_keras=None):
        if key not in self.sd:
            raise CheckpointError(f"Checkpoint is missing `{key}` (needed for {variable.path})")
        value = self.sd[key]
        if to_keras is not None:
            value = to_keras(value)
        value = np.asarray(value, dtype=np.float32).reshape(value.shape)
        if tuple(variable.shape) != tuple(value.shape):
            raise CheckpointError(
                f"Shape mismatch for `{key}`: checkpoint {tuple(value.shape)}, "
                f"model variable {variable.path} {tuple(variable.shape)}"
            )
        variable.assign(value)
        self.used.add(key)


def load_state_dict(model, sd):
    """Copies an OpenAI-layout state dict into a built keras_clip `CLIP`.

    Raises:
        CheckpointError: a tensor is missing, has the wrong shape, or the checkpoint has
            tensors this architecture does not use (e.g. a different model family).
    """
    a = _Assigner(sd)
    visit_layout(model, a, logit_scale="logit_scale" in sd)
    unused = sorted(k for k in sd if k not in a.used and not _IGNORED.search(k))
    if unused:
        raise CheckpointError(
            f"Unsupported checkpoint: {len(unused)} tensors have no place in this CLIP "
            f"architecture (e.g. {unused[:5]}); it may be a different model family"
        )
