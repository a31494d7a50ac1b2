"""keras_clip against every open_clip mode on this CPU, in one process, as ratios.

Inference (ViT-B/32 and RN50, random perturbed weights shared by both libraries through
an OpenAI-layout checkpoint): image encoding images/s (batch 32, 224 px, Flickr8k test
photos preprocessed with PIL) and text encoding texts/s (batch 256 Flickr8k train
captions; keras_clip trims each batch to its longest sequence, which is exact under the
causal mask; open_clip always runs 77 positions).

- open_clip: fp32; `torch.autocast("cpu", torch.bfloat16)`; weights cast to bf16
  (`model.to(torch.bfloat16)`, bf16 inputs); `torch.compile` (inductor) of the
  bf16-weights model and, with `--torch_compile fp32 "bf16 weights"`, of the fp32 one (a
  failure is printed in the table instead of a figure).
  All under `torch.inference_mode()`, in one worker with `torch.set_num_threads(2)` and
  one with 1 thread (`--torch_threads`): on the shared 2-core machine under load, 2
  OpenMP threads ran open_clip several times slower than 1 (each parallel region waits
  for a descheduled thread), so open_clip's best mode is taken over both.
- keras_clip: `dtype="float32"`, `"mixed_bfloat16"` (fp32 weights, bf16 compute) and
  `"bfloat16"` (weights stored in bf16, the inference mode of docs/speed.md), each in a
  `tf.function`; with `--xla`, also the bf16 model under `tf.function(jit_compile=True)`
  (no trimming: XLA needs static shapes).

Every mode is called once per round, in turn, for `--rounds` rounds after a warm-up
call each, so load from other jobs on the shared cores hits all modes alike; the figure
is the median over rounds. Each keras_clip figure is printed as a ratio to open_clip's
best mode in the same run.

Training (`--train_steps` > 0): a small CLIP (`--train_layers`-layer `--train_image_size`
px ViT with patch 16 and width `--train_width`, text tower of the same depth and width,
embed dim `--train_width`) at batch `--train_batch` on Flickr8k photos and captions.
open_clip's own step, as `open_clip_train.train.train_one_epoch` runs it (its
`get_autocast`, `ClipLoss`, AdamW, the logit-scale clamp), in precision `fp32`,
`amp_bf16` and `pure_bf16` (open_clip's `--precision` choices on CPU); keras_clip's
`CLIP.train_step` in a `tf.function` with `float32` and `mixed_bfloat16` (and with
`--xla`, `compile(jit_compile=True)`). Pairs/s over `--train_steps` steps after
`--train_warmup` steps, modes interleaved step by step.

Each library runs in a worker process of its own (see `inference_worker`); the
parent sends one call at a time, so the calls are interleaved as in one process.

    python benchmarks/speed_vs_open_clip.py                          # full run
    python benchmarks/speed_vs_open_clip.py --models ViT-B/32 --rounds 1 --image_batch 8 \\
        --text_batch 64 --train_steps 1 --train_batch 16 --train_layers 2 --torch_compile
"""
import argparse
import copy
import os
import pathlib
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import harness  # noqa: E402
from tests import reference_models as ref  # noqa: E402
from tests.reference import import_open_clip  # noqa: E402

# Modes the open_clip workers with more than `min(--torch_threads)` threads run too (the
# others are slower in every run we made: docs/speed.md).
FULL_THREAD_MODES = ("open_clip bf16 weights", "open_clip amp_bf16")
# Modes the keras_clip workers other than the first `--tf_threads` one run (its fast modes).
KERAS_EXTRA_THREAD_MODES = ("keras_clip mixed_bfloat16", "keras_clip bf16 weights")
SPECS = {"RN50": ref.FULL_RN50, "ViT-B/32": ref.FULL_VIT_B32}
# /work/shared/data/flickr8k beside /work/main or /work/wt/<worktree>.
FLICKR = next((p / "shared" / "data" / "flickr8k" for p in ROOT.parents
               if (p / "shared" / "data" / "flickr8k").exists()), ROOT / "missing")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B/32", "RN50"], choices=list(SPECS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image_batch", type=int, default=32)
    parser.add_argument("--text_batch", type=int, default=256)
    parser.add_argument("--torch_compile", nargs="*", default=["bf16 weights"],
                        choices=["fp32", "bf16 weights"],
                        help="open_clip models also run under torch.compile (none: no compile)")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=False,
                        help="also keras_clip under XLA (slower on CPU: no oneDNN)")
    parser.add_argument("--torch_threads", type=int, nargs="+", default=[2, 1],
                        help="one open_clip worker per count; only the smallest runs every "
                             "mode, the others the modes in FULL_THREAD_MODES")
    parser.add_argument("--tf_threads", type=int, nargs="+", default=[2, 1],
                        help="one keras_clip worker per count (TensorFlow's intra-op threads, "
                             "inter-op 1); the first runs every mode, the others the modes in "
                             "KERAS_EXTRA_THREAD_MODES: the same choice open_clip gets")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only these modes (labels as printed, without the thread "
                             "count), e.g. 'open_clip bf16 weights' 'keras_clip bf16 weights'")
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--train_warmup", type=int, default=1)
    parser.add_argument("--train_batch", type=int, default=128)
    parser.add_argument("--train_image_size", type=int, default=128)
    parser.add_argument("--train_layers", type=int, default=6)
    parser.add_argument("--train_width", type=int, default=256)
    parser.add_argument("--flickr", default=str(FLICKR))
    return parser.parse_args(argv)


def load_inputs(flickr, image_count, text_count, image_size=224):
    """Flickr8k test photos (PIL-preprocessed, NHWC float32) and train captions; the
    harness's synthetic photos and captions if the folder is absent."""
    flickr = pathlib.Path(flickr)
    if flickr.exists():
        paths, _ = ref.flickr_samples(flickr, image_count)
        _, captions = ref.flickr_samples(flickr, text_count, split="train")
        images = np.stack([harness.pil_preprocess(p, image_size) for p in paths])
        return images.astype("float32"), captions, "Flickr8k"
    crops = harness.photo_crops(image_count, size=(image_size, image_size))
    images = np.stack([harness.normalise(np.asarray(c)) for c in crops])
    return images.astype("float32"), harness.captions(text_count), "synthetic (harness)"


def torch_modes(torch, model, images, tokens, compile_models):
    """`{mode: (encode_image_fn, encode_text_fn)}` for open_clip; fns return arrays."""
    x32 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    x16 = x32.to(torch.bfloat16)

    def run(fn, *args, autocast=False):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return fn(*args).float().numpy()

    modes = {
        "open_clip fp32": (lambda: run(model.encode_image, x32),
                           lambda: run(model.encode_text, tokens)),
        "open_clip bf16 autocast": (lambda: run(model.encode_image, x32, autocast=True),
                                    lambda: run(model.encode_text, tokens, autocast=True)),
        "open_clip bf16 weights": (lambda: run(bf16_model.encode_image, x16),
                                   lambda: run(bf16_model.encode_text, tokens)),
    }
    for label, m, x in (("fp32", model, x32), ("bf16 weights", bf16_model, x16)):
        if label in compile_models:
            image_fn, text_fn = torch.compile(m.encode_image), torch.compile(m.encode_text)
            modes[f"open_clip torch.compile {label}"] = (
                lambda f=image_fn, x=x: run(f, x), lambda f=text_fn: run(f, tokens))
    return modes


def keras_modes(tf, keras_clip, checkpoint, images, tokens, xla):
    modes, models = {}, []
    tf_images, tf_tokens = tf.constant(images), tf.constant(tokens)
    for label, dtype in (("fp32", "float32"), ("mixed_bfloat16", "mixed_bfloat16"),
                         ("bf16 weights", "bfloat16")):
        model = keras_clip.CLIP.from_preset(checkpoint, dtype=dtype)
        models.append(model)
        image_fn = tf.function(lambda x, m=model: tf.cast(m.encode_image(x), tf.float32))
        text_fn = tf.function(lambda t, m=model: tf.cast(m.encode_text(t, trim=True), tf.float32))
        modes[f"keras_clip {label}"] = (lambda f=image_fn: f(tf_images).numpy(),
                                        lambda f=text_fn: f(tf_tokens).numpy())
        if xla and dtype == "bfloat16":
            image_xla = tf.function(lambda x, m=model: tf.cast(m.encode_image(x), tf.float32),
                                    jit_compile=True)
            text_xla = tf.function(lambda t, m=model: tf.cast(m.encode_text(t), tf.float32),
                                   jit_compile=True)
            modes["keras_clip bf16 weights, XLA"] = (lambda f=image_xla: f(tf_images).numpy(),
                                                     lambda f=text_xla: f(tf_tokens).numpy())
    return modes, models


def inference_worker(conn, worker, args, checkpoint):
    """Builds one library's modes in its own process and times single calls on request.

    Each library runs in a process of its own because their thread pools spin after
    each call (TensorFlow's Eigen pool, PyTorch's OpenMP team): sharing one process on
    2 cores, whichever ran second lost most of its cores (open_clip went from 2.5 to
    0.5 images/s in a first single-process version). The parent interleaves the calls.
    """
    kind, threads = worker
    open_clip = import_open_clip()
    images, captions, source = load_inputs(args.flickr, args.image_batch, args.text_batch)
    tokens = open_clip.tokenize(captions)
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
        reference = torch.load(checkpoint + ".model", weights_only=False).eval()
        modes = torch_modes(torch, reference, images, tokens,
                            args.torch_compile if threads == min(args.torch_threads) else [])
        modes = {f"{label} ({_threads(threads)})": fns for label, fns in modes.items()
                 if threads == min(args.torch_threads) or label in FULL_THREAD_MODES}
    else:
        tf = _tensorflow_with_threads(threads)
        import keras_clip

        modes, _ = keras_modes(tf, keras_clip, checkpoint, images, tokens.numpy(),
                               args.xla and threads == args.tf_threads[0])
        modes = _keras_thread_modes(modes, threads, args)
    _serve(conn, {(label, task): fns[i] for label, fns in modes.items()
                  for i, task in enumerate(("image", "text"))}, only=args.only)


def _tensorflow_with_threads(threads):
    """TensorFlow with `threads` intra-op threads (set before it runs any op)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def _keras_thread_modes(modes, threads, args):
    """keras_clip's modes of one worker, labelled with its thread count."""
    first = threads == args.tf_threads[0]
    return {f"{label} ({_threads(threads)})": fns for label, fns in modes.items()
            if first or label in KERAS_EXTRA_THREAD_MODES}


def _threads(n):
    return f"{n} thread" + ("s" if n > 1 else "")


def _selected(label, only):
    return only is None or label.split(" (")[0] in only


def _serve(conn, fns, warmup=1, only=None):
    """Warm-up of every fn (errors reported), then one timed call per request."""
    ready, errors = [], {}
    for key, fn in fns.items():
        if not _selected(key[0] if isinstance(key, tuple) else key, only):
            continue
        start = time.perf_counter()
        try:
            for _ in range(warmup):
                fn()
            ready.append(key)
        except Exception as e:  # noqa: BLE001 - a mode that does not work is reported
            errors[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
            traceback.print_exc(limit=2)
        print(f"  {key}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    conn.send((ready, errors))
    while True:
        key = conn.recv()
        if key is None:
            return
        start = time.perf_counter()
        fns[key]()
        conn.send(time.perf_counter() - start)


def run_interleaved(workers, rounds):
    """`{key: [seconds]}`: every ready key of every worker once per round, in turn."""
    keys, errors = [], {}
    for conn in workers:
        ready, failed = conn.recv()
        keys += [(conn, key) for key in ready]
        errors.update(failed)
    times = {key: [] for _, key in keys}
    for _ in range(rounds):
        for conn, key in keys:
            conn.send(key)
            times[key].append(conn.recv())
    for conn in workers:
        conn.send(None)
    return times, errors


def start_workers(target, args, *worker_args):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    conns, procs = [], []
    for worker in [("torch", n) for n in args.torch_threads] + [("tf", n) for n in args.tf_threads]:
        parent, child = context.Pipe()
        proc = context.Process(target=target, args=(child, worker, args) + worker_args)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    return conns, procs


def bench_inference(args, torch, open_clip):
    images, captions, source = load_inputs(args.flickr, args.image_batch, args.text_batch)
    tokens = open_clip.tokenize(captions)
    lengths = (tokens != 0).sum(1)
    print(f"inputs: {source}; {len(images)} images, {len(captions)} captions "
          f"(longest {int(lengths.max())} tokens, mean {float(lengths.float().mean()):.1f})")
    results = {}
    for name in args.models:
        reference = ref.open_clip_model(open_clip, SPECS[name])
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(reference.state_dict(), f"{tmp}/m.pt")
            torch.save(reference, f"{tmp}/m.pt.model")
            del reference
            conns, procs = start_workers(inference_worker, args, f"{tmp}/m.pt")
            times, errors = run_interleaved(conns, args.rounds)
            for proc in procs:
                proc.join()
        for task, items in (("image", len(images)), ("text", len(captions))):
            rates = {label: items / float(np.median(t)) for (label, kind), t in times.items()
                     if kind == task}
            rates.update({label: err for (label, kind), err in errors.items() if kind == task})
            results[(name, task)] = dict(sorted(rates.items(), key=lambda kv: not kv[0].startswith("open_clip")))
    return results


def train_step_fns(args, kind, threads=None):
    """`{mode: step_fn}`: one optimiser step on the same batch of pairs."""
    open_clip = import_open_clip()
    images, captions, _ = load_inputs(args.flickr, args.train_batch, args.train_batch,
                                      image_size=args.train_image_size)
    tokens = open_clip.tokenize(captions)
    width, layers, heads = args.train_width, args.train_layers, args.train_width // 64
    fns = {}
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
        return _open_clip_steps(args, torch, open_clip, images, tokens, width, layers, heads)
    import keras

    tf = _tensorflow_with_threads(threads)
    import keras_clip

    # keras_clip: CLIP.train_step (the step `fit` and the training loop run).
    data = {"images": tf.constant(images), "token_ids": tf.constant(tokens.numpy())}
    for label, dtype, jit in (("fp32", "float32", False), ("mixed_bfloat16", "mixed_bfloat16", False),
                              ("mixed_bfloat16, XLA towers", "mixed_bfloat16", True)):
        if jit and not args.xla:
            continue
        keras.utils.set_random_seed(0)
        model = keras_clip.CLIP(
            embed_dim=width, image_size=args.train_image_size, vision_num_layers=layers,
            vision_hidden_dim=width, vision_num_heads=heads, vision_patch_size=16,
            text_hidden_dim=width, text_num_layers=layers, text_num_heads=heads, dtype=dtype)
        model.compile(optimizer=keras.optimizers.AdamW(1e-4, beta_1=0.9, beta_2=0.98,
                                                       epsilon=1e-6, weight_decay=0.2),
                      jit_compile=jit)
        train = tf.function(model.train_step)
        fns[f"keras_clip {label}"] = lambda train=train: float(train(data)["loss"])
    return fns


def _open_clip_steps(args, torch, open_clip, images, tokens, width, layers, heads):
    """open_clip: the body of open_clip_train.train.train_one_epoch (no accumulation)."""
    fns = {}
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip_train.precision import get_autocast

    x32 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    for precision in ("fp32", "amp_bf16", "pure_bf16"):
        torch.manual_seed(0)
        model = OpenCLIP(width, vision_cfg=CLIPVisionCfg(layers=layers, width=width, patch_size=16,
                                                         image_size=args.train_image_size),
                         text_cfg=CLIPTextCfg(width=width, heads=heads, layers=layers),
                         quick_gelu=True, output_dict=True)
        x = x32
        if precision == "pure_bf16":  # open_clip's create_model does this for pure_bf16
            model, x = model.to(torch.bfloat16), x32.to(torch.bfloat16)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                                      weight_decay=0.2)
        loss_fn = open_clip.ClipLoss()
        autocast = get_autocast(precision, device_type="cpu")

        def step(model=model, optimizer=optimizer, loss_fn=loss_fn, autocast=autocast, x=x):
            with autocast():
                out = model(x, tokens)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            return float(loss)

        fns[f"open_clip {precision}"] = step
    return fns


def training_worker(conn, worker, args):
    kind, threads = worker
    fns = train_step_fns(args, kind, threads)
    if kind == "torch":
        fns = {f"{label} ({_threads(threads)})": fn for label, fn in fns.items()
               if threads == min(args.torch_threads) or label in FULL_THREAD_MODES}
    else:
        fns = _keras_thread_modes(fns, threads, args)
    _serve(conn, fns, warmup=max(1, args.train_warmup), only=args.only)


def bench_training(args):
    conns, procs = start_workers(training_worker, args)
    times, errors = run_interleaved(conns, args.train_steps)
    for proc in procs:
        proc.join()
    rates = {label: args.train_batch / float(np.median(t)) for label, t in times.items()}
    rates.update(errors)
    return rates


def print_table(title, unit, rates):
    peers = {k: v for k, v in rates.items() if k.startswith("open_clip") and isinstance(v, float)}
    best = max(peers, key=peers.get)
    print(f"\n| {title} | {unit} | ratio to open_clip's best ({best}) |")
    print("|---|---|---|")
    for label, value in rates.items():
        if isinstance(value, str):
            print(f"| {label} | fails: {value} | |")
        else:
            mark = "**" if label.startswith("keras_clip") else ""
            print(f"| {label} | {value:.1f} | {mark}{value / peers[best]:.2f}x{mark} |")


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(2)
    open_clip = import_open_clip()
    print(f"torch {torch.__version__} (2 threads), one worker process per library, "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')}")
    print("uptime at start:", os.popen("uptime").read().strip())
    start = time.time()
    results = bench_inference(args, torch, open_clip) if args.rounds > 0 else {}
    train = bench_training(args) if args.train_steps > 0 else None
    print(f"\nrun: {time.time() - start:.0f} s; uptime at end: {os.popen('uptime').read().strip()}")
    for (name, task), rates in results.items():
        print_table(f"{name} {task} encoding (batch "
                    f"{args.image_batch if task == 'image' else args.text_batch})",
                    "images/s" if task == "image" else "texts/s", rates)
    if train:
        print_table(f"training, {args.train_layers}-layer {args.train_image_size} px ViT-/16 "
                    f"width {args.train_width}, batch {args.train_batch}", "pairs/s", train)


if __name__ == "__main__":
    main()
