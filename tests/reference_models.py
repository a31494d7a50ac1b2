"""Reference PyTorch models with random weights (the PIL pipeline is in `tests.harness`).

Every parameter and BatchNorm statistic is perturbed away from its initial value
(LayerNorm gains are not all ones, running variances are not all ones, ...), so a
transposed or misplaced tensor in the converter changes the outputs.
"""
import numpy as np

# Small configs of each family (OpenAI's head width of 64 is kept so that the
# architecture can be inferred from the state dict as OpenAI's build_model does).
SMALL_VIT = dict(embed_dim=64, vision=dict(layers=2, width=128, patch_size=16, image_size=64),
                 text=dict(width=128, heads=2, layers=2))
SMALL_RESNET = dict(embed_dim=64, vision=dict(layers=(1, 2, 1, 1), width=16, image_size=64),
                    text=dict(width=128, heads=2, layers=2))
FULL_RN50 = dict(embed_dim=1024, vision=dict(layers=(3, 4, 6, 3), width=64, image_size=224),
                 text=dict(width=512, heads=8, layers=12))
FULL_VIT_B32 = dict(embed_dim=512, vision=dict(layers=12, width=768, patch_size=32, image_size=224),
                    text=dict(width=512, heads=8, layers=12))


def perturb_(model, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith("running_mean"):
                tensor.copy_(0.1 * noise)
            elif name.endswith("logit_scale"):
                tensor.fill_(float(np.log(1 / 0.05)))
            else:
                scale = tensor.float().std().item() if tensor.numel() > 1 else 0.0
                tensor.add_(0.1 * max(scale, 0.02) * noise)
    return model


def open_clip_model(open_clip, spec, quick_gelu=True, seed=0):
    """An open_clip `CLIP` (OpenAI's architecture) with perturbed random weights."""
    import torch

    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = OpenCLIP(
        spec["embed_dim"],
        vision_cfg=CLIPVisionCfg(**spec["vision"]),
        text_cfg=CLIPTextCfg(**spec["text"]),
        quick_gelu=quick_gelu,
    )
    return perturb_(model, seed).eval()


def flickr_samples(flickr_dir, count, split="test"):
    """First `count` images of a split with their first caption, in file order."""
    import csv

    names = (flickr_dir / "splits" / f"{split}.txt").read_text().split()[:count]
    captions = {}
    with open(flickr_dir / "captions.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["image"] in names and row["caption_idx"] == "0":
                captions[row["image"]] = row["caption"]
    return [flickr_dir / "images" / n for n in names], [captions[n] for n in names]
