"""How far each library's bf16 training step drifts from its own float32 step.

    python benchmarks/bf16_drift.py [--model issue|small] [--batch_size 32] [--steps 20]
        [--variants ...] [--libraries keras_clip open_clip] [--data_dir ../shared/data]

From one set of initial weights (a keras_clip model, copied into open_clip's `CLIP`
through `save_checkpoint`'s state dict), on the same fixed Flickr8k batches (the
first `--batches * --batch_size` training images, PIL-exact preprocessing, their
first caption), each library trains `--steps` steps in float32 and in bf16 (keras_clip
`mixed_bfloat16`; open_clip's trainer's `torch.autocast("cpu", torch.bfloat16)` around
the forward pass and the loss), with the same AdamW (betas 0.9/0.98, eps 1e-6, every
matrix decayed, open_clip's rule), warm-up + cosine schedule, and the temperature capped
at 100 as open_clip's trainer does after each step. Reported per run:

* `grad err`: relative error of the first step's bf16 gradient against the float32
  one, `||g_bf16 - g_fp32|| / ||g_fp32||`, per tower (the same weights and batch);
* `loss gap`: mean over the steps of `|loss_bf16 - loss_fp32|`;
* `drift`: after the last step, `||w_bf16 - w_fp32|| / ||w_fp32 - w_0||`: the distance
  between the two trajectories in units of how far float32 training moved.

`--variants` names keras_clip bf16 variants, each forcing one piece to float32
(`_variant`: `fp32_text_tower`, `fp32_image_tower`, `fp32_scores` (attention q k^T),
`fp32_logits` (features into the loss)), to find which piece makes keras_clip's bf16
drift from its float32. Results: docs/bf16_training_quality.md.
"""
import argparse
import contextlib
import csv
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    # The issue's model: 6-layer 128 px ViT-16 width 256, 6-layer text width 256, GELU.
    "issue": dict(embed_dim=256, image_size=128, vision_patch_size=16, vision_num_layers=6,
                  vision_hidden_dim=256, vision_num_heads=4, context_length=32,
                  text_hidden_dim=256, text_num_layers=6, text_num_heads=4, activation="gelu"),
    # A 4x smaller one for quick checks.
    "small": dict(embed_dim=128, image_size=64, vision_patch_size=16, vision_num_layers=2,
                  vision_hidden_dim=128, vision_num_heads=2, context_length=32,
                  text_hidden_dim=128, text_num_layers=2, text_num_heads=2, activation="gelu"),
}
BETAS, EPSILON = (0.9, 0.98), 1e-6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="issue")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="distinct fixed batches, cycled")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=5)
    p.add_argument("--weight_decay", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--libraries", nargs="+", default=["keras_clip", "open_clip"])
    p.add_argument("--variants", nargs="*", default=[], help="extra keras_clip bf16 variants")
    p.add_argument("--data_dir", default="/work/shared/data" if os.path.isdir("/work/shared/data") else str(ROOT.parent / "shared" / "data"))
    return p.parse_args(argv)


def lr_at(step, args):
    """keras_clip's `WarmupCosineDecay` (open_clip's `cosine_lr` has the same shape)."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / max(args.warmup_steps, 1)
    progress = min((step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1), 1.0)
    return 0.5 * args.learning_rate * (1 + np.cos(np.pi * progress))


def load_batches(args, image_size, context_length):
    from PIL import Image

    from keras_clip.preprocessing.image_preprocessor import CLIPImagePreprocessor
    from keras_clip.preprocessing.tokenizer import CLIPTokenizer

    flickr = pathlib.Path(args.data_dir) / "flickr8k"
    first = {}
    with open(flickr / "captions.tsv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] == "train" and row["caption_idx"] == "0":
                first.setdefault(row["image"], row["caption"])
    names = sorted(first)[: args.batches * args.batch_size]
    preprocess = CLIPImagePreprocessor(image_size=image_size)
    tokenizer = CLIPTokenizer(context_length=context_length)
    images = np.stack([np.asarray(preprocess(np.asarray(Image.open(flickr / "images" / n).convert("RGB"))[None]))[0]
                       for n in names]).astype(np.float32)
    tokens = np.asarray(tokenizer([first[n] for n in names])).astype(np.int32)
    b = args.batch_size
    return [(images[i:i + b], tokens[i:i + b]) for i in range(0, len(names), b)]


# ----------------------------------------------------------------------------------
# keras_clip
# ----------------------------------------------------------------------------------


def _set_policy(layer, policy):
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        sub.dtype_policy = policy


@contextlib.contextmanager
def _variant(model, name):
    """Forces one piece of a mixed_bfloat16 keras_clip model to float32."""
    import keras

    if name in ("", "bf16"):
        yield
    elif name in ("fp32_text_tower", "fp32_image_tower"):
        tower = model.text if name == "fp32_text_tower" else model.visual
        _set_policy(tower, "float32")
        encode = "encode_text" if tower is model.text else "encode_image"
        original = getattr(model, encode)
        setattr(model, encode, lambda *a, **k: keras.ops.cast(original(*a, **k), "bfloat16"))
        yield
    elif name == "fp32_scores":  # attention scores q k^T from float32 q and k
        import tensorflow as tf

        from keras_clip.layers import attention

        original = tf.matmul

        def matmul(a, b, *args, transpose_b=False, **kwargs):
            if transpose_b and a.dtype == tf.bfloat16 and len(a.shape) == 4:  # (B, H, T, Dh) q k^T
                return original(tf.cast(a, tf.float32), tf.cast(b, tf.float32), *args,
                                transpose_b=True, **kwargs)
            return original(a, b, *args, transpose_b=transpose_b, **kwargs)

        attention.tf = type("tf", (), {"matmul": staticmethod(matmul), "unstack": tf.unstack,
                                       "nn": tf.nn})
        try:
            yield
        finally:
            attention.tf = tf
    elif name == "fp32_logits":  # features cast to float32 before the logits matmul
        from keras_clip import losses

        original = losses.contrastive_logits

        def logits(local_image, local_text, all_image, all_text, logit_scale):
            f32 = [keras.ops.cast(t, "float32") for t in (local_image, local_text, all_image, all_text)]
            return original(*f32, logit_scale)

        losses.contrastive_logits = logits
        try:
            yield
        finally:
            losses.contrastive_logits = original
    else:
        raise ValueError(f"Unknown variant {name!r}")


def keras_run(args, config, init, batches, precision, variant=""):
    import keras
    import tensorflow as tf

    from keras_clip import CLIP
    from keras_clip.training.optimizer import WarmupCosineDecay, create_optimizer

    model = CLIP(**config, dtype=precision)
    model.set_weights(init)
    with _variant(model, variant):
        schedule = WarmupCosineDecay(args.learning_rate, args.warmup_steps, args.steps)
        optimizer = create_optimizer(model, schedule, weight_decay=args.weight_decay, beta_1=BETAS[0],
                                     beta_2=BETAS[1], epsilon=EPSILON, decay_embeddings=True)
        model.compile(optimizer=optimizer)
        optimizer.build(model.trainable_variables)
        images, tokens = batches[0]
        with tf.GradientTape() as tape:
            out, _ = model._contrastive_step({"images": images, "token_ids": tokens}, training=True)
        grads = tape.gradient(out["loss"], model.trainable_variables)
        grads = {_key(v): np.asarray(tf.convert_to_tensor(g), np.float32) for v, g in zip(model.trainable_variables, grads)}
        step = tf.function(model.train_step)
        losses, start = [], time.perf_counter()
        for s in range(args.steps):
            images, tokens = batches[s % len(batches)]
            losses.append(float(step({"images": tf.constant(images), "token_ids": tf.constant(tokens)})["loss"]))
            for tracker in model.metrics:
                tracker.reset_state()
        seconds = time.perf_counter() - start
    weights = {_key(v): np.asarray(v.numpy(), np.float32) for v in model.trainable_variables}
    return {"grads": grads, "losses": losses, "weights": weights, "seconds": seconds}


def _key(variable):
    return variable.path.split("/", 1)[1]  # without the model's own (numbered) name


def keras_tower(path):
    return "visual" if path.startswith("visual/") else "text" if path.startswith("text/") else "head"


# ----------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------


def open_clip_run(args, state_dict, oc_config, batches, precision):
    import torch
    import torch.nn.functional as F

    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

    torch.set_num_threads(2)
    model = OpenCLIP(oc_config["embed_dim"], vision_cfg=CLIPVisionCfg(**oc_config["vision_cfg"]),
                     text_cfg=CLIPTextCfg(**oc_config["text_cfg"]), quick_gelu=False)
    missing = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                                    strict=False)
    assert not missing.unexpected_keys and all("attn_mask" in k for k in missing.missing_keys), missing
    model.train()
    # open_clip_train.main's AdamW groups: no decay for ndim < 2, norms, biases, logit_scale.
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": args.weight_decay}],
        lr=args.learning_rate, betas=BETAS, eps=EPSILON)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext

    def loss_of(images, tokens):
        with autocast():  # open_clip_train.train: forward and loss under autocast
            image, text, scale = model(torch.from_numpy(images).permute(0, 3, 1, 2),
                                       torch.from_numpy(tokens).long())[:3]
            logits = scale * image @ text.T
            labels = torch.arange(len(tokens))
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    model.zero_grad()
    loss_of(*batches[0]).backward()
    grads = {n: p.grad.detach().float().numpy().copy() for n, p in named}
    model.zero_grad()
    losses, start = [], time.perf_counter()
    for s in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(s, args)
        optimizer.zero_grad()
        loss = loss_of(*batches[s % len(batches)])
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    weights = {n: p.detach().float().numpy().copy() for n, p in named}
    return {"grads": grads, "losses": losses, "weights": weights, "seconds": seconds}


def open_clip_tower(name):
    return "visual" if name.startswith("visual.") else "head" if name == "logit_scale" else "text"


# ----------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------


def rel(a, b, keys):
    num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in keys)
    den = sum(float(np.sum(b[k] ** 2)) for k in keys)
    return np.sqrt(num / max(den, 1e-30))


def compare(reference, run, init, tower_of):
    row = {}
    for tower in ("visual", "text"):
        keys = [k for k in reference["grads"] if tower_of(k) == tower]
        row[f"grad err {tower}"] = rel(run["grads"], reference["grads"], keys)
        moved = {k: reference["weights"][k] - init[k] for k in keys}
        gap = {k: run["weights"][k] - reference["weights"][k] for k in keys}
        row[f"drift {tower}"] = np.sqrt(sum(float(np.sum(gap[k] ** 2)) for k in keys)
                                        / sum(float(np.sum(moved[k] ** 2)) for k in keys))
    row["loss gap"] = float(np.mean(np.abs(np.array(run["losses"]) - np.array(reference["losses"]))))
    row["final loss"] = run["losses"][-1]
    row["fp32 final loss"] = reference["losses"][-1]
    row["s/step"] = run["seconds"] / len(run["losses"])
    return row


def main(argv=None):
    args = parse_args(argv)
    print("Command: python benchmarks/bf16_drift.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print("Load: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    import keras

    from keras_clip import CLIP
    from keras_clip.convert.writers import open_clip_model_config, state_dict_from_model

    config = MODELS[args.model]
    keras.utils.set_random_seed(args.seed)
    reference_model = CLIP(**config)
    init = [w.numpy() for w in reference_model.weights]
    init_by_path = {_key(v): np.asarray(v.numpy(), np.float32) for v in reference_model.trainable_variables}
    state_dict = state_dict_from_model(reference_model)
    oc_config = open_clip_model_config(reference_model)
    print(f"Model {args.model}: {reference_model.count_params():,} parameters", flush=True)
    batches = load_batches(args, config["image_size"], config["context_length"])
    rows = []
    if "keras_clip" in args.libraries:
        fp32 = keras_run(args, config, init, batches, "float32")
        print(f"keras_clip float32 losses: {np.round(fp32['losses'], 3).tolist()}", flush=True)
        for variant in ["bf16", *args.variants]:
            run = keras_run(args, config, init, batches, "mixed_bfloat16", variant)
            rows.append(("keras_clip", variant, compare(fp32, run, init_by_path, keras_tower)))
            print(f"keras_clip {variant} losses: {np.round(run['losses'], 3).tolist()}", flush=True)
            print(rows[-1], flush=True)
    if "open_clip" in args.libraries:
        from tests.reference import import_open_clip

        import_open_clip()
        fp32 = open_clip_run(args, state_dict, oc_config, batches, "fp32")
        init_oc = dict(state_dict)
        print(f"open_clip fp32 losses: {np.round(fp32['losses'], 3).tolist()}", flush=True)
        run = open_clip_run(args, state_dict, oc_config, batches, "bf16")
        rows.append(("open_clip", "amp_bf16", compare(fp32, run, init_oc, open_clip_tower)))
        print(f"open_clip bf16 losses: {np.round(run['losses'], 3).tolist()}", flush=True)
    keys = ["grad err visual", "grad err text", "loss gap", "drift visual", "drift text",
            "final loss", "fp32 final loss", "s/step"]
    print()
    print("| library | bf16 variant | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for library, variant, row in rows:
        print(f"| {library} | {variant} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    print("Load: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
