"""CLIP model: serialisation round trips, temperature clamp, pooling, presets, bad input."""
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_clip
from keras_clip import CLIP, CheckpointError, presets

NON_DEFAULT = dict(
    embed_dim=48, image_size=32, vision_architecture="vit", vision_num_layers=2,
    vision_hidden_dim=64, vision_num_heads=4, vision_patch_size=8, vision_intermediate_dim=96,
    context_length=16, vocabulary_size=300, text_hidden_dim=32, text_num_layers=3,
    text_num_heads=2, text_intermediate_dim=80, activation="gelu", layer_norm_epsilon=1e-6,
    batch_norm_epsilon=2e-5, initial_logit_scale=10.0, max_logit_scale=50.0, end_token_id=299,
)
NON_DEFAULT_RESNET = dict(
    NON_DEFAULT, vision_architecture="resnet", vision_num_layers=[1, 2, 1, 1],
    vision_hidden_dim=8, vision_num_heads=2, vision_patch_size=None, vision_intermediate_dim=None,
)


def _inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    size, ctx = config["image_size"], config["context_length"]
    tokens = rng.integers(1, config["end_token_id"], size=(3, ctx))
    for row, length in enumerate([4, 9, ctx]):
        tokens[row, length - 1] = config["end_token_id"]
        tokens[row, length:] = 0
    return {"images": rng.normal(size=(3, size, size, 3)).astype("float32"), "token_ids": tokens}


def _assert_same_outputs(a, b, inputs):
    out_a, out_b = a(inputs), b(inputs)
    for key in out_a:
        np.testing.assert_array_equal(np.asarray(out_a[key]), np.asarray(out_b[key]))


@pytest.mark.parametrize("config", [NON_DEFAULT, NON_DEFAULT_RESNET], ids=["vit", "resnet"])
def test_config_round_trip_keeps_every_argument(config):
    model = CLIP(**config)
    restored = CLIP.from_config(model.get_config())
    for key, value in config.items():
        assert getattr(restored, key) == value, key
    restored.set_weights(model.get_weights())
    _assert_same_outputs(model, restored, _inputs(config))


@pytest.mark.parametrize("config", [NON_DEFAULT, NON_DEFAULT_RESNET], ids=["vit", "resnet"])
def test_keras_file_round_trip_gives_identical_outputs(config, tmp_path):
    model = CLIP(**config)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, CLIP)
    _assert_same_outputs(model, restored, _inputs(config))


def test_save_to_preset_round_trip_gives_identical_outputs(tmp_path):
    model = CLIP(**NON_DEFAULT_RESNET)
    model.save_to_preset(str(tmp_path / "preset"))
    assert sorted(os.listdir(tmp_path / "preset")) == ["assets", "config.json", "model.weights.h5"]
    restored = CLIP.from_preset(str(tmp_path / "preset"))
    _assert_same_outputs(model, restored, _inputs(NON_DEFAULT_RESNET))
    architecture_only = CLIP.from_preset(str(tmp_path / "preset"), load_weights=False)
    assert architecture_only.get_config() == model.get_config()


def test_logit_scale_starts_at_one_over_007_and_never_exceeds_100():
    model = CLIP.from_preset("clip_vit_tiny")
    np.testing.assert_allclose(float(model.logit_scale()), 1 / 0.07, rtol=1e-6)
    optimizer = keras.optimizers.SGD(learning_rate=10.0)
    variable = model.logit_scale.log_scale
    for _ in range(3):  # gradient of -log_scale pushes the scale up by 10 per step
        optimizer.apply([-np.ones((), "float32")], [variable])
    assert float(variable) == pytest.approx(math.log(100.0), abs=1e-6)
    assert float(model.logit_scale()) == pytest.approx(100.0, rel=1e-5)


def test_text_tower_pools_at_end_token_and_ignores_later_positions():
    model = CLIP(**NON_DEFAULT)
    inputs = _inputs(NON_DEFAULT)
    tokens = inputs["token_ids"]
    base = np.asarray(model.encode_text(tokens))
    changed = tokens.copy()
    changed[0, 5:] = 7  # after row 0's end token (position 3): causal mask hides them
    np.testing.assert_allclose(np.asarray(model.encode_text(changed))[0], base[0], atol=1e-6)
    # Trimming to the longest sequence is exact because the mask is causal.
    short = tokens[:2]
    np.testing.assert_allclose(
        np.asarray(model.encode_text(short, trim=True)), base[:2], atol=1e-6
    )


def test_end_token_is_found_by_id_not_by_argmax_over_ids():
    tower = keras_clip.CLIPTextTransformer(
        embed_dim=8, vocabulary_size=50, context_length=6, hidden_dim=16, num_layers=1,
        num_heads=2, intermediate_dim=32, end_token_id=5,
    )
    tokens = np.array([[1, 40, 5, 0, 0, 0], [1, 9, 12, 30, 5, 0]])  # larger ids than 5 before it
    np.testing.assert_array_equal(np.asarray(tower.end_token_positions(tokens)), [2, 4])


def test_row_without_end_token_pools_at_last_non_padding_token():
    model = CLIP(**NON_DEFAULT)
    tokens = np.array([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert int(np.asarray(model.text.end_token_positions(tokens))[0]) == 2


def test_paper_architectures_match_open_clip_parameter_counts(open_clip_module):
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

    for name in ("clip_rn50", "clip_vit_b32"):
        cfg = presets.ARCHITECTURES[name][2]
        vision = dict(layers=cfg["vision_num_layers"], width=cfg["vision_hidden_dim"],
                      image_size=cfg["image_size"])
        if cfg["vision_architecture"] == "vit":
            vision["patch_size"] = cfg["vision_patch_size"]
        reference = OpenCLIP(
            cfg["embed_dim"], CLIPVisionCfg(**vision),
            CLIPTextCfg(width=cfg["text_hidden_dim"], heads=cfg["text_num_heads"],
                        layers=cfg["text_num_layers"]),
        )
        expected = sum(
            v.numel() for k, v in reference.state_dict().items()
            if "num_batches_tracked" not in k and "attn_mask" not in k
        )
        assert CLIP.from_preset(name).count_params() == expected, name


def test_presets_list_the_nine_paper_models_and_aliases():
    listed = keras_clip.list_presets()
    paper = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16",
             "ViT-L/14", "ViT-L/14@336px"]
    for alias in paper:
        assert presets.resolve_name(alias) in listed
    assert "clip_vit_b32_openai" in listed
    config = presets.ARCHITECTURES[presets.resolve_name("ViT-L/14@336px")][2]
    assert (config["image_size"], config["vision_patch_size"], config["embed_dim"]) == (336, 14, 768)


def test_unknown_preset_name_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown preset 'clip_vit_b99'.*Built-in presets"):
        CLIP.from_preset("clip_vit_b99")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        CLIP.from_preset(str(path))


def test_truncated_checkpoint_is_a_clear_error(tmp_path, open_clip_module):
    import torch

    from tests import reference_models as ref

    full = tmp_path / "full.pt"
    torch.save(ref.open_clip_model(open_clip_module, ref.SMALL_VIT).state_dict(), full)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        CLIP.from_preset(str(truncated))


def test_checkpoint_of_unsupported_architecture_is_a_clear_error(tmp_path):
    import torch

    # A torchvision-style ResNet classifier: tensors, but not a CLIP.
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)},
               tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="Unsupported checkpoint: not a CLIP"):
        CLIP.from_preset(str(tmp_path / "resnet.pt"))
    # A CLIP text tower with an image tower of another family (e.g. a timm trunk).
    state = {
        "text_projection": torch.zeros(32, 16), "positional_embedding": torch.zeros(77, 32),
        "token_embedding.weight": torch.zeros(49408, 32), "ln_final.weight": torch.zeros(32),
        "visual.trunk.stem.0.weight": torch.zeros(8, 3, 3, 3),
    }
    torch.save(state, tmp_path / "timm_tower.pt")
    with pytest.raises(CheckpointError, match="neither a CLIP ViT"):
        CLIP.from_preset(str(tmp_path / "timm_tower.pt"))


def test_checkpoint_with_extra_tensors_is_rejected(tmp_path, open_clip_module):
    import torch

    from tests import reference_models as ref

    state = ref.open_clip_model(open_clip_module, ref.SMALL_VIT).state_dict()
    state["visual.head.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="no place in this CLIP.*visual.head.weight"):
        CLIP.from_preset(str(tmp_path / "extra.pt"))


def test_named_weights_preset_offline_says_which_file_to_place_where(tmp_path):
    code = (
        "import keras_clip\n"
        "try:\n"
        "    keras_clip.CLIP.from_preset('clip_vit_b32_openai')\n"
        "except FileNotFoundError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300).stdout
    assert "ERROR Could not download `open_clip_model.safetensors`" in out
    assert "timm/vit_base_patch32_clip_224.openai" in out
    assert "CLIP.from_preset('/path/to/open_clip_model.safetensors')" in out


def test_named_weights_preset_builds_architecture_without_download():
    model = CLIP.from_preset("clip_vit_b32_laion2b", load_weights=False)
    assert (model.activation, model.vision_patch_size, model.embed_dim) == ("gelu", 32, 512)
