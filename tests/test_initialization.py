"""A fresh keras_clip model starts from the same weight distributions as a fresh reference one.

The reference is an unperturbed open_clip `CLIP` (OpenAI's architecture and
`initialize_parameters`; PyTorch defaults for everything those leave alone, the ViT
image tower included). Its state dict is loaded into a keras_clip model through the
converter, so every keras_clip variable is paired with the reference tensor it stands
for, and the two initialisations are compared tensor by tensor.
"""
import numpy as np
import pytest

from keras_clip import CLIP
from tests import reference_models as ref


def _stats(x):
    x = np.asarray(x, np.float64).ravel()
    std = x.std()
    return std, (np.abs(x - x.mean()).mean() / std if std > 0 else 0.0)


@pytest.mark.parametrize("spec_name", ["SMALL_VIT", "SMALL_RESNET"])
def test_fresh_weights_follow_reference_initialization(spec_name, open_clip_module, tmp_path):
    import torch
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

    spec = getattr(ref, spec_name)
    torch.manual_seed(0)
    reference = OpenCLIP(
        spec["embed_dim"], vision_cfg=CLIPVisionCfg(**spec["vision"]),
        text_cfg=CLIPTextCfg(**spec["text"]), quick_gelu=True,
    )
    path = tmp_path / "fresh.pt"
    torch.save(reference.state_dict(), path)

    converted = CLIP.from_preset(str(path))  # the reference's initial weights
    fresh = CLIP.from_preset(str(path), load_weights=False)  # keras_clip's own init
    def local(path):
        return path.split("/", 1)[1]  # without the model's own name (clip, clip_1)

    assert [local(w.path) for w in fresh.weights] == [local(w.path) for w in converted.weights]

    checked = 0
    for ours, theirs in zip(fresh.weights, converted.weights):
        a, b = np.asarray(ours), np.asarray(theirs)
        assert a.shape == b.shape, ours.path
        constant = np.ptp(b) == 0
        if constant:  # zeros (attention biases, bn3 gains, BN means) or ones (LN gains)
            np.testing.assert_array_equal(a, b, err_msg=ours.path)
            continue
        std_a, shape_a = _stats(a)
        std_b, shape_b = _stats(b)
        # Wide tensors pin the std to ~2%; bias vectors of a few hundred values to ~15%.
        tolerance = 0.06 if b.size >= 4096 else 0.3
        assert abs(std_a / std_b - 1) < tolerance, (ours.path, std_a, std_b)
        if b.size >= 4096:
            # mean |x| / std: 0.866 for a uniform, 0.798 for a normal distribution.
            assert abs(shape_a - shape_b) < 0.03, (ours.path, shape_a, shape_b)
        checked += 1
    assert checked >= (20 if spec_name == "SMALL_VIT" else 30)
