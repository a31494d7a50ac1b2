"""Names across towers (issue 12): `vision_num_layers` per architecture, and
`AttentionPool2D`'s `embed_dim` (formerly `output_dim`)."""
import numpy as np
import pytest

from keras_clip import CLIP
from keras_clip.layers.attention_pool import AttentionPool2D

# A ResNet small enough to build in a second with RN50's stage depths.
SMALL_WIDTHS_RESNET = dict(
    embed_dim=16, image_size=32, vision_architecture="resnet", vision_hidden_dim=8,
    vision_num_heads=2, context_length=8, vocabulary_size=300, text_hidden_dim=16,
    text_num_layers=1, text_num_heads=2, end_token_id=299,
)
_DTYPE = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
          "registered_name": None}
_COMMON = {
    "trainable": True, "dtype": _DTYPE, "vision_intermediate_dim": None,
    "vision_patch_dropout": 0.0, "vocabulary_size": 49408, "text_intermediate_dim": None,
    "activation": "quick_gelu", "layer_norm_epsilon": 1e-05, "batch_norm_epsilon": 1e-05,
    "initial_logit_scale": 14.285714285714285, "max_logit_scale": 100.0,
    "end_token_id": 49407, "max_image_pixels": 50000000, "loss": "softmax",
    "initial_logit_bias": -10.0,
}
# `CLIP.get_config()` as written by main at 7e210a2 (before `vision_num_layers=None`).
OLD_RESNET_CONFIG = dict(
    _COMMON, name="clip", embed_dim=64, image_size=64, vision_architecture="resnet",
    vision_num_layers=[1, 2, 1, 1], vision_hidden_dim=16, vision_num_heads=8,
    vision_patch_size=32, context_length=77, text_hidden_dim=128, text_num_layers=2,
    text_num_heads=2,
)
OLD_VIT_CONFIG = dict(
    _COMMON, name="clip_1", embed_dim=32, image_size=32, vision_architecture="vit",
    vision_num_layers=1, vision_hidden_dim=32, vision_num_heads=2, vision_patch_size=8,
    context_length=16, text_hidden_dim=32, text_num_layers=1, text_num_heads=2,
)
# `AttentionPool2D(2, 32, 4, 16, name="attnpool").get_config()` at 7e210a2.
OLD_ATTENTION_POOL_CONFIG = {"name": "attnpool", "trainable": True, "dtype": _DTYPE,
                             "spatial_dim": 2, "hidden_dim": 32, "num_heads": 4, "output_dim": 16}


def test_default_resnet_has_rn50_block_counts():
    model = CLIP(**SMALL_WIDTHS_RESNET)
    assert model.vision_num_layers == [3, 4, 6, 3]
    assert model.visual.num_layers == [3, 4, 6, 3]
    assert [len(stage) for stage in model.visual.stages] == [3, 4, 6, 3]
    assert model.get_config()["vision_num_layers"] == [3, 4, 6, 3]
    explicit = CLIP(**SMALL_WIDTHS_RESNET, vision_num_layers=(3, 4, 6, 3))
    assert explicit.count_params() == model.count_params()


def test_default_vit_has_12_layers():
    model = CLIP(embed_dim=16, image_size=16, vision_patch_size=8, vision_hidden_dim=8,
                 vision_num_heads=2, context_length=8, vocabulary_size=300,
                 text_hidden_dim=8, text_num_layers=1, text_num_heads=2, end_token_id=299)
    assert model.vision_num_layers == 12
    assert model.get_config()["vision_num_layers"] == 12
    assert model.visual.num_layers == 12
    assert len(model.visual.resblocks) == 12


def test_resnet_with_an_int_is_a_clear_error():
    with pytest.raises(ValueError) as error:
        CLIP(**SMALL_WIDTHS_RESNET, vision_num_layers=12)
    assert str(error.value) == (
        "`vision_num_layers` must be 4 ints for a ResNet (bottleneck blocks per stage; "
        "RN50: [3, 4, 6, 3]). Received: vision_num_layers=12"
    )


def test_vit_with_a_list_is_a_clear_error():
    with pytest.raises(ValueError) as error:
        CLIP(vision_num_layers=[3, 4, 6, 3])
    assert str(error.value) == (
        "`vision_num_layers` must be an int for a ViT (transformer blocks). "
        "Received: vision_num_layers=[3, 4, 6, 3]"
    )


@pytest.mark.parametrize("config", [OLD_RESNET_CONFIG, OLD_VIT_CONFIG], ids=["resnet", "vit"])
def test_configs_saved_before_the_default_change_load_identically(config):
    model = CLIP.from_config(dict(config))
    # Keys added since (each at the value that reproduces the old model) are the only difference.
    assert model.get_config() == dict(config, text_architecture="transformer")


def test_attention_pool_config_says_embed_dim():
    layer = AttentionPool2D(2, 32, 4, 16, name="attnpool")
    config = layer.get_config()
    assert "output_dim" not in config
    assert (config["embed_dim"], layer.embed_dim) == (16, 16)


def test_attention_pool_saved_with_output_dim_loads_with_the_same_outputs():
    old = AttentionPool2D.from_config(dict(OLD_ATTENTION_POOL_CONFIG))
    assert old.embed_dim == 16
    new = AttentionPool2D(2, 32, 4, embed_dim=16, name="attnpool")
    x = np.random.default_rng(0).normal(size=(3, 2, 2, 32)).astype("float32")
    new.build(x.shape)
    old.build(x.shape)
    old.set_weights(new.get_weights())
    assert np.asarray(old(x)).shape == (3, 16)
    np.testing.assert_array_equal(np.asarray(old(x)), np.asarray(new(x)))
    assert old.get_config() == dict(
        {k: v for k, v in OLD_ATTENTION_POOL_CONFIG.items() if k != "output_dim"}, embed_dim=16
    )


def test_default_resnet_is_rn50_as_open_clip_builds_it(open_clip_module):
    """Every vision default resolves to RN50's: the tower has open_clip's RN50 image
    tower's parameter count (base width 64, 32 attention-pool heads)."""
    from open_clip.modified_resnet import ModifiedResNet

    model = CLIP(embed_dim=1024, vision_architecture="resnet", context_length=8,
                 vocabulary_size=300, text_hidden_dim=16, text_num_layers=1, text_num_heads=2,
                 end_token_id=299)
    config = model.get_config()
    assert (config["vision_hidden_dim"], config["vision_num_heads"]) == (64, 32)
    reference = ModifiedResNet(layers=(3, 4, 6, 3), output_dim=1024, heads=32, image_size=224, width=64)
    expected = sum(p.numel() for p in reference.parameters()) + sum(
        b.numel() for name, b in reference.named_buffers() if "running" in name)
    assert model.visual.count_params() == expected


def test_default_vit_widths_are_vit_b():
    model = CLIP(embed_dim=16, image_size=32, vision_patch_size=16, vision_num_layers=1,
                 context_length=8, vocabulary_size=300, text_hidden_dim=8, text_num_layers=1,
                 text_num_heads=2, end_token_id=299)
    assert (model.vision_hidden_dim, model.vision_num_heads) == (768, 12)
