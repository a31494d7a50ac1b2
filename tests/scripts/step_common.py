"""What the step scripts beside this file share (each runs alone in a subprocess, with
this folder first on `sys.path`, so it imports this module rather than tests.harness)."""

# tests/harness.py's TINY_VIT_SMALL_VOCAB, spelled out.
CONFIG = dict(embed_dim=32, image_size=32, vision_architecture="vit", vision_num_layers=1,
              vision_hidden_dim=64, vision_num_heads=2, vision_patch_size=8, context_length=12,
              vocabulary_size=500, text_hidden_dim=64, text_num_layers=1, text_num_heads=2,
              end_token_id=499)

_RECORDER = {}


def record_logits_shapes(shapes, convert):
    """From now on, appends `convert(logits_per_image.shape)` to `shapes` for every
    loss a step traces (as `tests.harness.record_logits_shapes`, for this process)."""
    from keras_clip import losses

    if not _RECORDER:
        def wrap(function):
            def wrapped(*args, **kwargs):
                out = function(*args, **kwargs)
                _RECORDER["shapes"].append(_RECORDER["convert"](out["logits_per_image"].shape))
                return out
            return wrapped

        losses.clip_loss, losses.sigmoid_loss = wrap(losses.clip_loss), wrap(losses.sigmoid_loss)
    _RECORDER.update(shapes=shapes, convert=convert)
    return shapes
