"""OpenAI / open_clip state-dict layout: architecture inference and weight assignment.

open_clip's `CLIP` class keeps OpenAI's parameter names, so one mapping serves both.
"""
import math
import re

import numpy as np

from keras_clip.convert.checkpoint import CheckpointError

# Keys that carry no weights we need.
_IGNORED = re.compile(r"(num_batches_tracked|attn_mask|^input_resolution$|^context_length$|^vocab_size$)")


def config_from_state_dict(sd):
    """CLIP constructor kwargs inferred from an OpenAI-layout state dict.

    Follows OpenAI's `build_model`: ViT if `visual.proj` exists, else a modified
    ResNet; widths from tensor shapes, depths from key counts, heads = width / 64.

    Raises:
        CheckpointError: the tensors are not those of a CLIP with a ViT or modified
            ResNet image tower and a transformer text tower.
    """
    required = ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:5])
        raise CheckpointError(
            "Unsupported checkpoint: not a CLIP state dict in OpenAI/open_clip layout "
            f"(missing {missing}; first keys: {sample})"
        )
    config = {}
    if "visual.proj" in sd:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        config.update(
            vision_architecture="vit", vision_hidden_dim=int(width), vision_patch_size=int(patch),
            vision_num_layers=layers, image_size=int(patch * grid), vision_num_heads=int(width // 64),
            vision_intermediate_dim=int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        )
    elif "visual.layer1.0.conv1.weight" in sd and "visual.attnpool.positional_embedding" in sd:
        counts = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in range(1, 5)]
        width = int(sd["visual.layer1.0.conv1.weight"].shape[0])
        spatial = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        config.update(
            vision_architecture="resnet", vision_hidden_dim=width, vision_num_layers=counts,
            image_size=int(spatial * 32), vision_num_heads=width * 32 // 64, vision_patch_size=None,
        )
    else:
        vision_keys = sorted(k for k in sd if k.startswith("visual."))[:5]
        raise CheckpointError(
            "Unsupported checkpoint: the image tower is neither a CLIP ViT (`visual.proj`) "
            f"nor a modified ResNet (`visual.attnpool`). First visual keys: {vision_keys}"
        )
    text_width = int(sd["ln_final.weight"].shape[0])
    config.update(
        embed_dim=int(sd["text_projection"].shape[1]),
        context_length=int(sd["positional_embedding"].shape[0]),
        vocabulary_size=int(sd["token_embedding.weight"].shape[0]),
        text_hidden_dim=text_width,
        text_num_heads=text_width // 64,
        text_num_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
        text_intermediate_dim=int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
    )
    if "logit_scale" in sd:
        config["initial_logit_scale"] = float(math.exp(float(np.asarray(sd["logit_scale"]).reshape(()))))
    return config


class _Assigner:
    """Assigns checkpoint tensors to variables, checking shapes and tracking use."""

    def __init__(self, sd):
        self.sd = sd
        self.used = set()

    def __call__(self, variable, key, transform=None):
        if key not in self.sd:
            raise CheckpointError(f"Checkpoint is missing `{key}` (needed for {variable.path})")
        value = self.sd[key]
        if transform is not None:
            value = transform(value)
        value = np.asarray(value, dtype=np.float32).reshape(value.shape)
        if tuple(variable.shape) != tuple(value.shape):
            raise CheckpointError(
                f"Shape mismatch for `{key}`: checkpoint {tuple(value.shape)}, "
                f"model variable {variable.path} {tuple(variable.shape)}"
            )
        variable.assign(value)
        self.used.add(key)

    def dense(self, layer, prefix):
        self(layer.kernel, prefix + ".weight", np.transpose)
        if layer.use_bias:
            self(layer.bias, prefix + ".bias")

    def layer_norm(self, layer, prefix):
        self(layer.gamma, prefix + ".weight")
        self(layer.beta, prefix + ".bias")

    def conv(self, layer, key):
        self(layer.kernel, key, lambda w: np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO

    def batch_norm(self, layer, prefix):
        self(layer.gamma, prefix + ".weight")
        self(layer.beta, prefix + ".bias")
        self(layer.moving_mean, prefix + ".running_mean")
        self(layer.moving_variance, prefix + ".running_var")

    def block(self, block, prefix):
        self.layer_norm(block.ln_1, prefix + ".ln_1")
        self(block.attn.qkv.kernel, prefix + ".attn.in_proj_weight", np.transpose)
        self(block.attn.qkv.bias, prefix + ".attn.in_proj_bias")
        self.dense(block.attn.out_proj, prefix + ".attn.out_proj")
        self.layer_norm(block.ln_2, prefix + ".ln_2")
        self.dense(block.c_fc, prefix + ".mlp.c_fc")
        self.dense(block.c_proj, prefix + ".mlp.c_proj")


def load_state_dict(model, sd):
    """Copies an OpenAI-layout state dict into a built keras_clip `CLIP`.

    Raises:
        CheckpointError: a tensor is missing, has the wrong shape, or the checkpoint has
            tensors this architecture does not use (e.g. a different model family).
    """
    a = _Assigner(sd)
    text = model.text
    a(text.token_embedding.embeddings, "token_embedding.weight")
    a(text.positional_embedding, "positional_embedding")
    for i, block in enumerate(text.resblocks):
        a.block(block, f"transformer.resblocks.{i}")
    a.layer_norm(text.ln_final, "ln_final")
    a(text.text_projection, "text_projection")
    if "logit_scale" in sd:
        a(model.logit_scale.log_scale, "logit_scale", lambda v: np.asarray(v).reshape(()))

    visual = model.visual
    if model.vision_architecture == "vit":
        a.conv(visual.conv1, "visual.conv1.weight")
        a(visual.class_embedding, "visual.class_embedding")
        a(visual.positional_embedding, "visual.positional_embedding")
        a.layer_norm(visual.ln_pre, "visual.ln_pre")
        for i, block in enumerate(visual.resblocks):
            a.block(block, f"visual.transformer.resblocks.{i}")
        a.layer_norm(visual.ln_post, "visual.ln_post")
        a(visual.proj, "visual.proj")
    else:
        for i, (_, conv, bn) in enumerate(visual.stem, start=1):
            a.conv(conv, f"visual.conv{i}.weight")
            a.batch_norm(bn, f"visual.bn{i}")
        for s, stage in enumerate(visual.stages, start=1):
            for b, block in enumerate(stage):
                prefix = f"visual.layer{s}.{b}"
                for j in (1, 2, 3):
                    a.conv(getattr(block, f"conv{j}"), f"{prefix}.conv{j}.weight")
                    a.batch_norm(getattr(block, f"bn{j}"), f"{prefix}.bn{j}")
                if block.has_downsample:
                    a.conv(block.downsample_conv, f"{prefix}.downsample.0.weight")
                    a.batch_norm(block.downsample_bn, f"{prefix}.downsample.1")
        pool = visual.attnpool
        a(pool.positional_embedding, "visual.attnpool.positional_embedding")
        for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
            a.dense(getattr(pool, name), f"visual.attnpool.{name}")

    unused = sorted(k for k in sd if k not in a.used and not _IGNORED.search(k))
    if unused:
        raise CheckpointError(
            f"Unsupported checkpoint: {len(unused)} tensors have no place in this CLIP "
            f"architecture (e.g. {unused[:5]}); it may be a different model family"
        )
