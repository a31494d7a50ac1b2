"""Parameter counts of every built-in architecture, checked against open_clip.

    python benchmarks/preset_table.py   # prints a Markdown table for the README
"""
import gc
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reference import import_open_clip  # noqa: E402


def open_clip_count(open_clip, cfg):
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

    vision = dict(layers=cfg["vision_num_layers"], width=cfg["vision_hidden_dim"],
                  image_size=cfg["image_size"])
    if cfg["vision_architecture"] == "vit":
        vision["patch_size"] = cfg["vision_patch_size"]
    text = dict(width=cfg["text_hidden_dim"], heads=cfg["text_num_heads"],
                layers=cfg["text_num_layers"], context_length=cfg.get("context_length", 77))
    model = OpenCLIP(cfg["embed_dim"], CLIPVisionCfg(**vision), CLIPTextCfg(**text))
    return sum(v.numel() for k, v in model.state_dict().items()
               if "num_batches_tracked" not in k and "attn_mask" not in k)


def main():
    import keras_clip
    from keras_clip import presets

    open_clip = import_open_clip()
    print("| preset | paper name | image | embed | vision params | text params | total | open_clip total |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (paper, _, cfg) in presets.ARCHITECTURES.items():
        model = keras_clip.CLIP.from_preset(name)
        counts = model.count_params_by_tower()
        reference = open_clip_count(open_clip, cfg)
        mark = "=" if reference == counts["total"] else f"{reference:,} (differs)"
        print(f"| `{name}` | {paper} | {cfg['image_size']} | {cfg['embed_dim']} | "
              f"{counts['visual'] / 1e6:.1f}M | {counts['text'] / 1e6:.1f}M | "
              f"{counts['total'] / 1e6:.2f}M | {mark} |")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
