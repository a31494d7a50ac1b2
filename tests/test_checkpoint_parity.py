"""Reference parity: OpenAI/open_clip and Hugging Face checkpoints load with equal outputs."""
import numpy as np
import pytest

from keras_clip import CLIP
from tests import harness
from tests import reference_models as ref

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def flickr_batch(flickr8k_dir, open_clip_module):
    paths, captions = ref.flickr_samples(flickr8k_dir, 8)
    return paths, captions, open_clip_module.tokenize(captions).numpy()


def _reference_embeddings(model, images, tokens):
    import torch

    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True)
        text = model.encode_text(torch.from_numpy(tokens), normalize=True)
    return image.numpy(), text.numpy()


def _assert_parity(model, ref_image, ref_text, images, tokens):
    image = np.asarray(model.encode_image(images))
    text = np.asarray(model.encode_text(tokens))
    assert np.max(np.abs(image - ref_image)) <= TOLERANCE
    assert np.max(np.abs(text - ref_text)) <= TOLERANCE
    np.testing.assert_array_equal(
        np.argmax(image @ text.T, axis=1), np.argmax(ref_image @ ref_text.T, axis=1)
    )
    np.testing.assert_array_equal(
        np.argmax(text @ image.T, axis=1), np.argmax(ref_text @ ref_image.T, axis=1)
    )


@pytest.mark.parametrize("spec_name", ["SMALL_VIT", "SMALL_RESNET"])
def test_openai_state_dict_matches_reference_implementation(
    spec_name, flickr_batch, open_clip_module, tmp_path
):
    import torch

    spec = getattr(ref, spec_name)
    reference = ref.open_clip_model(open_clip_module, spec)
    path = tmp_path / "model.pt"
    torch.save(reference.state_dict(), path)

    paths, _, tokens = flickr_batch
    size = spec["vision"]["image_size"]
    images = np.stack([harness.pil_preprocess(p, size) for p in paths])
    ref_image, ref_text = _reference_embeddings(reference, images, tokens)

    model = CLIP.from_preset(str(path))
    assert model.vision_architecture == ("vit" if spec_name == "SMALL_VIT" else "resnet")
    assert model.image_size == size
    _assert_parity(model, ref_image, ref_text, images, tokens)
    np.testing.assert_allclose(float(model.logit_scale()), 20.0, rtol=1e-6)


def test_torchscript_archive_matches_reference_implementation(
    flickr_batch, open_clip_module, tmp_path
):
    import torch

    reference = ref.open_clip_model(open_clip_module, ref.SMALL_VIT, seed=3)
    paths, _, tokens = flickr_batch
    images = np.stack([harness.pil_preprocess(p, 64) for p in paths])
    traced = torch.jit.trace_module(
        reference,
        {"encode_image": torch.from_numpy(images[:1]).permute(0, 3, 1, 2)},
        check_trace=False,
    )
    path = tmp_path / "ViT-small.pt"
    traced.save(str(path))
    ref_image, ref_text = _reference_embeddings(reference, images, tokens)
    _assert_parity(CLIP.from_preset(str(path)), ref_image, ref_text, images, tokens)


def test_open_clip_safetensors_with_gelu_matches_reference_implementation(
    flickr_batch, open_clip_module, tmp_path
):
    from safetensors.torch import save_file

    reference = ref.open_clip_model(open_clip_module, ref.SMALL_VIT, quick_gelu=False, seed=5)
    folder = tmp_path / "open_clip_repo"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "attn_mask"}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 64}}')
    paths, _, tokens = flickr_batch
    images = np.stack([harness.pil_preprocess(p, 64) for p in paths])
    ref_image, ref_text = _reference_embeddings(reference, images, tokens)
    model = CLIP.from_preset(str(folder))
    assert model.activation == "gelu"
    _assert_parity(model, ref_image, ref_text, images, tokens)


def test_hugging_face_folder_matches_transformers(flickr_batch, tmp_path):
    import torch
    import transformers

    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, vocab_size=49408,
                         eos_token_id=49407, bos_token_id=49406, pad_token_id=1),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, image_size=64, patch_size=16),
        projection_dim=64,
    )
    torch.manual_seed(0)
    reference = ref.perturb_(transformers.CLIPModel(config), seed=7).eval()
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)

    paths, _, tokens = flickr_batch
    images = np.stack([harness.pil_preprocess(p, 64) for p in paths])
    with torch.no_grad():
        pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2)
        ref_image = reference.get_image_features(pixel_values=pixel_values)
        ref_text = reference.get_text_features(input_ids=torch.from_numpy(tokens).long())
        ref_image = getattr(ref_image, "pooler_output", ref_image)
        ref_text = getattr(ref_text, "pooler_output", ref_text)
    ref_image = torch.nn.functional.normalize(ref_image, dim=-1).numpy()
    ref_text = torch.nn.functional.normalize(ref_text, dim=-1).numpy()

    model = CLIP.from_preset(str(tmp_path / "hf"))
    assert model.vision_num_heads == 4 and model.text_num_heads == 2
    _assert_parity(model, ref_image, ref_text, images, tokens)
