"""Read-only tables: the paper's architectures and where published weights live.

Architecture presets are CLIP constructor kwargs (one source of truth). Weight presets
name an architecture plus a file on the Hugging Face Hub; the files are the open_clip
releases of the OpenAI and LAION checkpoints (safetensors, no pickles).
"""
import types

_TEXT_512 = dict(text_hidden_dim=512, text_num_layers=12, text_num_heads=8)
_TEXT_640 = dict(text_hidden_dim=640, text_num_layers=12, text_num_heads=10)
_TEXT_768 = dict(text_hidden_dim=768, text_num_layers=12, text_num_heads=12)
_TEXT_1024 = dict(text_hidden_dim=1024, text_num_layers=12, text_num_heads=16)


def _resnet(embed_dim, image_size, layers, width, text):
    return dict(
        embed_dim=embed_dim, image_size=image_size, vision_architecture="resnet",
        vision_num_layers=list(layers), vision_hidden_dim=width,
        vision_num_heads=width * 32 // 64, **text,
    )


def _vit(embed_dim, image_size, patch_size, layers, width, text):
    return dict(
        embed_dim=embed_dim, image_size=image_size, vision_architecture="vit",
        vision_patch_size=patch_size, vision_num_layers=layers, vision_hidden_dim=width,
        vision_num_heads=width // 64, **text,
    )


# name -> (paper name, description, CLIP kwargs). Values from the paper's Tables 19-20
# and OpenAI's released checkpoints.
ARCHITECTURES = types.MappingProxyType({
    "clip_rn50": ("RN50", "ResNet-50, 224px", _resnet(1024, 224, (3, 4, 6, 3), 64, _TEXT_512)),
    "clip_rn101": ("RN101", "ResNet-101, 224px", _resnet(512, 224, (3, 4, 23, 3), 64, _TEXT_512)),
    "clip_rn50x4": ("RN50x4", "ResNet-50 x4 compute, 288px", _resnet(640, 288, (4, 6, 10, 6), 80, _TEXT_640)),
    "clip_rn50x16": ("RN50x16", "ResNet-50 x16 compute, 384px", _resnet(768, 384, (6, 8, 18, 8), 96, _TEXT_768)),
    "clip_rn50x64": ("RN50x64", "ResNet-50 x64 compute, 448px", _resnet(1024, 448, (3, 15, 36, 10), 128, _TEXT_1024)),
    "clip_vit_b32": ("ViT-B/32", "ViT-Base, patch 32, 224px", _vit(512, 224, 32, 12, 768, _TEXT_512)),
    "clip_vit_b16": ("ViT-B/16", "ViT-Base, patch 16, 224px", _vit(512, 224, 16, 12, 768, _TEXT_512)),
    "clip_vit_l14": ("ViT-L/14", "ViT-Large, patch 14, 224px", _vit(768, 224, 14, 24, 1024, _TEXT_768)),
    "clip_vit_l14_336": ("ViT-L/14@336px", "ViT-Large, patch 14, 336px", _vit(768, 336, 14, 24, 1024, _TEXT_768)),
    # Small configs sized for CPU training and tests (not from the paper).
    "clip_vit_tiny": ("ViT-Tiny/8@64", "4-layer ViT, patch 8, 64px, 32-token text; CPU demo",
                      dict(_vit(256, 64, 8, 4, 256, {}), context_length=32, text_hidden_dim=256,
                           text_num_layers=4, text_num_heads=4)),
    "clip_rn_tiny": ("RN-Tiny@64", "ResNet [1,1,1,1] width 16, 64px, 32-token text; CPU demo",
                     dict(_resnet(256, 64, (1, 1, 1, 1), 16, {}), context_length=32,
                          text_hidden_dim=256, text_num_layers=4, text_num_heads=4)),
})

# Paper names ("ViT-B/32", "RN50") and open_clip names ("ViT-B-32") as aliases.
ALIASES = types.MappingProxyType({
    alias: name
    for name, (paper_name, _, _) in ARCHITECTURES.items()
    for alias in (paper_name, paper_name.replace("/", "-").replace("@336px", "-336"))
})

# name -> (architecture, overrides, Hugging Face repo, file). open_clip's hub copies of
# OpenAI's weights (the same tensors as OpenAI's .pt files, stored as safetensors).
WEIGHTS = types.MappingProxyType({
    f"{arch}_openai": (arch, {"activation": "quick_gelu"}, repo, "open_clip_model.safetensors")
    for arch, repo in [
        ("clip_rn50", "timm/resnet50_clip.openai"),
        ("clip_rn101", "timm/resnet101_clip.openai"),
        ("clip_rn50x4", "timm/resnet50x4_clip.openai"),
        ("clip_rn50x16", "timm/resnet50x16_clip.openai"),
        ("clip_rn50x64", "timm/resnet50x64_clip.openai"),
        ("clip_vit_b32", "timm/vit_base_patch32_clip_224.openai"),
        ("clip_vit_b16", "timm/vit_base_patch16_clip_224.openai"),
        ("clip_vit_l14", "timm/vit_large_patch14_clip_224.openai"),
        ("clip_vit_l14_336", "timm/vit_large_patch14_clip_336.openai"),
    ]
} | {
    "clip_vit_b32_laion2b": ("clip_vit_b32", {"activation": "gelu"},
                             "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors"),
    "clip_vit_b16_laion2b": ("clip_vit_b16", {"activation": "gelu"},
                             "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_model.safetensors"),
    "clip_vit_l14_laion2b": ("clip_vit_l14", {"activation": "gelu"},
                             "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "open_clip_model.safetensors"),
})


def resolve_name(name):
    """Canonical preset name for `name` (a preset name or an alias), else None."""
    if name in ARCHITECTURES or name in WEIGHTS:
        return name
    return ALIASES.get(name)


def list_presets():
    """All built-in preset names with a one-line description."""
    presets = {name: f"{paper} - {desc} (random init)" for name, (paper, desc, _) in ARCHITECTURES.items()}
    for name, (arch, _, repo, filename) in WEIGHTS.items():
        presets[name] = f"{ARCHITECTURES[arch][0]} weights from hf://{repo}/{filename}"
    return presets
