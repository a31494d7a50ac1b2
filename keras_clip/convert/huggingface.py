"""Hugging Face transformers CLIP layout (`CLIPModel`) -> OpenAI layout."""
import json
import os
import re

import numpy as np

from keras_clip.convert import openai
from keras_clip.convert.checkpoint import CheckpointError

_LAYER_RENAMES = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
]
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
# A config.json alone (no weights to check it against) may not describe a model with
# more parameters than this: 4x ViT-bigG/14, 20 GB in float32.
MAX_CONFIG_PARAMETERS = 5_000_000_000
# Config fields that must agree with the shapes of the weights they come with.
_CHECKED_FIELDS = (
    "embed_dim", "image_size", "vision_patch_size", "vision_hidden_dim", "vision_num_layers",
    "vision_intermediate_dim", "context_length", "vocabulary_size", "text_hidden_dim",
    "text_num_layers", "text_intermediate_dim",
)


def _estimated_parameters(c):
    def tower(width, layers, intermediate):
        return layers * (4 * width * width + 2 * width * intermediate + 9 * width)

    grid = c["image_size"] // max(c["vision_patch_size"], 1)
    return (
        tower(c["vision_hidden_dim"], c["vision_num_layers"], c["vision_intermediate_dim"])
        + tower(c["text_hidden_dim"], c["text_num_layers"], c["text_intermediate_dim"])
        + (3 * c["vision_patch_size"] ** 2 + grid * grid + 1) * c["vision_hidden_dim"]
        + (c["vocabulary_size"] + c["context_length"]) * c["text_hidden_dim"]
        + c["embed_dim"] * (c["vision_hidden_dim"] + c["text_hidden_dim"])
    )


def check_config(config):
    """Rejects a config whose sizes are not positive integers or add up to an absurd model."""
    for name in _CHECKED_FIELDS + ("vision_num_heads", "text_num_heads"):
        value = config[name]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise CheckpointError(
                f"Hugging Face config.json: `{name}` must be a positive integer; Received: "
                f"{name}={value!r:.40}"
            )
    for tower in ("vision", "text"):
        width, heads = config[f"{tower}_hidden_dim"], config[f"{tower}_num_heads"]
        if width % heads:
            raise CheckpointError(
                f"Hugging Face config.json: `{tower}_config.hidden_size` must be divisible by "
                f"`num_attention_heads`; Received: hidden_size={width}, num_attention_heads={heads}"
            )
    count = _estimated_parameters(config)
    if count > MAX_CONFIG_PARAMETERS:
        raise CheckpointError(
            f"Hugging Face config.json describes a model of about {count:,} parameters, more "
            f"than the limit of {MAX_CONFIG_PARAMETERS:,} "
            "(keras_clip.convert.huggingface.MAX_CONFIG_PARAMETERS)"
        )


def check_config_matches_weights(config, sd):
    """Checks a `config_from_hf` config against OpenAI-layout weights, before building.

    Raises:
        CheckpointError: the weights are inconsistent (see
            `openai.config_from_state_dict`) or disagree with config.json; the message
            names the field and both values.
    """
    from_weights = openai.config_from_state_dict(
        sd, text_num_heads=config["text_num_heads"], vision_num_heads=config["vision_num_heads"]
    )
    for name in _CHECKED_FIELDS:
        if from_weights[name] != config[name]:
            raise CheckpointError(
                f"Hugging Face config.json disagrees with the weights: `{name}` is "
                f"{config[name]!r:.40} in config.json but {from_weights[name]!r} in the weights"
            )


def config_from_hf(hf_config):
    """CLIP kwargs from a transformers `CLIPConfig` dict (`config.json`)."""
    try:
        text, vision = hf_config["text_config"], hf_config["vision_config"]
        act = text.get("hidden_act", "quick_gelu")
        if act not in _ACTIVATIONS or vision.get("hidden_act", act) != act:
            raise CheckpointError(
                f"Unsupported Hugging Face CLIP activation: text {act!r}, vision "
                f"{vision.get('hidden_act')!r} (supported: {sorted(_ACTIVATIONS)})"
            )
        eps = text.get("layer_norm_eps", 1e-5)
        return dict(
            embed_dim=hf_config.get("projection_dim", 512),
            image_size=vision["image_size"],
            vision_architecture="vit",
            vision_patch_size=vision["patch_size"],
            vision_hidden_dim=vision["hidden_size"],
            vision_num_layers=vision["num_hidden_layers"],
            vision_num_heads=vision["num_attention_heads"],
            vision_intermediate_dim=vision["intermediate_size"],
            context_length=text.get("max_position_embeddings", 77),
            vocabulary_size=text.get("vocab_size", 49408),
            text_hidden_dim=text["hidden_size"],
            text_num_layers=text["num_hidden_layers"],
            text_num_heads=text["num_attention_heads"],
            text_intermediate_dim=text["intermediate_size"],
            activation=_ACTIVATIONS[act],
            layer_norm_epsilon=eps,
        )
    except KeyError as e:
        raise CheckpointError(f"Hugging Face config.json is not a CLIPConfig: missing {e}") from e


def state_dict_from_hf(hf):
    """Renames/reshapes `CLIPModel` tensors into OpenAI's state-dict layout."""
    sd = {}
    qkv = {}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue
        m = re.match(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if m:
            tower, index, rest = m.groups()
            prefix = ("visual." if tower == "vision" else "") + f"transformer.resblocks.{index}"
            proj = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if proj:
                qkv.setdefault((prefix, proj.group(2)), {})[proj.group(1)] = value
                continue
            for old, new in _LAYER_RENAMES:
                rest = rest.replace(old, new)
            sd[f"{prefix}.{rest}"] = value
            continue
        renamed = {
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
            "vision_model.embeddings.class_embedding": "visual.class_embedding",
            "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
            "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
            "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
            "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
            "vision_model.post_layernorm.weight": "visual.ln_post.weight",
            "vision_model.post_layernorm.bias": "visual.ln_post.bias",
            "logit_scale": "logit_scale",
        }
        if key in renamed:
            sd[renamed[key]] = value
        elif key == "text_projection.weight":
            sd["text_projection"] = np.transpose(value)
        elif key == "visual_projection.weight":
            sd["visual.proj"] = np.transpose(value)
        else:
            sd[key] = value  # left for the loader to report as unsupported
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"Incomplete attention projections under {prefix}: {sorted(parts)}")
        sd[f"{prefix}.attn.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return sd


def is_hf_folder(path):
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError:
            return False
    return "text_config" in data and "vision_config" in data
