"""The CLIP model: an image tower and a text tower in one embedding space."""
import contextlib
import json
import numbers
import os
import shutil

import keras
import tensorflow as tf
from absl import logging
from keras import ops

from keras_clip import distribute, losses
from keras_clip.layers.logit_scale import LogitBias, LogitScale
from keras_clip.models.modified_resnet import CLIPModifiedResNet
from keras_clip.models.text_bag_of_words import CLIPBagOfWordsEncoder
from keras_clip.models.text_transformer import CLIPTextTransformer

TEXT_ARCHITECTURES = ("transformer", "bag_of_words")
from keras_clip.models.vision_transformer import CLIPVisionTransformer
from keras_clip.preprocessing.image_preprocessor import DEFAULT_MAX_PIXELS, validate_max_pixels

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
VOCABULARY_FILE = "bpe_simple_vocab_16e6.txt.gz"


@keras.saving.register_keras_serializable(package="keras_clip")
class CLIP(keras.Model):
    """Contrastive Language-Image Pre-training (Radford et al., 2021).

    Both towers map into an `embed_dim` space; embeddings are L2-normalised and
    compared by cosine similarity times a learned scale (`logit_scale`, initialised to
    1/0.07, kept <= 100 by a weight constraint).

    Every argument is stored under its own name and returned by `get_config`, so a
    preset is these kwargs plus weights. `keras_clip.presets.ARCHITECTURES` holds the
    paper's nine models.

    Args:
        embed_dim: int. Width of the shared space.
        image_size: int. Input resolution.
        vision_architecture: `"vit"` or `"resnet"`.
        vision_num_layers: int (ViT depth) or 4 ints (ResNet blocks per stage).
            Default `None`: 12 for a ViT, RN50's `[3, 4, 6, 3]` for a ResNet.
        vision_hidden_dim: int. ViT width, or ResNet base width; default
            (`None`) ViT-B's 768, or RN50's 64.
        vision_num_heads: int. ViT heads, or heads of the ResNet attention pool;
            default (`None`) ViT-B's 12, or RN50's 32.
        vision_patch_size: int. ViT only.
        vision_intermediate_dim: int. ViT MLP width; default 4 * vision_hidden_dim.
        vision_patch_dropout: float in [0, 1). ViT only: FLIP's patch dropout, the
            fraction of patch tokens dropped in training (0: off; inference unchanged).
        context_length: int. Text positions (77).
        vocabulary_size: int. 49,408.
        text_hidden_dim, text_num_layers, text_num_heads: text transformer shape.
        text_intermediate_dim: int. Default 4 * text_hidden_dim.
        activation: `"quick_gelu"` (OpenAI weights) or `"gelu"` (LAION weights).
        layer_norm_epsilon: float. 1e-5 as in PyTorch.
        batch_norm_epsilon: float. 1e-5 as in PyTorch (ResNet only).
        initial_logit_scale: float. Default 1 / 0.07 (softmax loss) or 10 (sigmoid
            loss, as SigLIP).
        max_logit_scale: float. 100.
        end_token_id: int. Where the text tower pools (49407).
        max_image_pixels: int. Largest image (width x height, as its header
            declares it) that `image_preprocessor()` decodes, and that exports
            serve; larger ones are refused before decoding. 50 million by
            default (`image_preprocessor.DEFAULT_MAX_PIXELS`).
        loss: `"softmax"` (CLIP's symmetric InfoNCE) or `"sigmoid"` (SigLIP's pairwise
            binary loss, with a learned `logit_bias`). Recorded in the config, so
            zero-shot classification of a sigmoid-trained model uses sigmoid
            probabilities.
        initial_logit_bias: float. Start of the sigmoid loss's bias (-10, as SigLIP);
            unused with the softmax loss (no bias weight is created).
        text_architecture: `"transformer"` (CLIP's text tower) or `"bag_of_words"`
            (`CLIPBagOfWordsEncoder`: mean token embedding of width
            `text_hidden_dim`, then a projection; the paper's Figure 2 baseline;
            `text_num_layers`, `text_num_heads`, `text_intermediate_dim`,
            `activation` and `end_token_id` do not apply to it). The
            bag-of-words model trains and encodes like the transformer one; the
            open_clip/OpenAI checkpoint writers only know the transformer.

    Call arguments:
        inputs: dict with `"images"` (float `(B, S, S, 3)`, preprocessed by
            `CLIPImagePreprocessor`) and `"token_ids"` (int `(B', T)` from
            `CLIPTokenizer`).

    Returns:
        dict: `image_embeddings` `(B, E)` and `text_embeddings` `(B', E)` (unit norm),
        `logits_per_image` `(B, B')` and `logits_per_text` `(B', B)` (scaled cosines,
        plus `logit_bias` for `loss="sigmoid"`).

    Example:
    >>> model = CLIP.from_preset("clip_vit_tiny")
    >>> out = model({"images": keras.ops.zeros((2, 64, 64, 3)),
    ...              "token_ids": keras_clip.tokenize(["a cat", "a dog"], 32)})
    >>> out["logits_per_image"].shape
    TensorShape([2, 2])
    """

    def __init__(
        self,
        embed_dim=512,
        image_size=224,
        vision_architecture="vit",
        vision_num_layers=None,
        vision_hidden_dim=None,
        vision_num_heads=None,
        vision_patch_size=32,
        vision_intermediate_dim=None,
        vision_patch_dropout=0.0,
        context_length=77,
        vocabulary_size=49408,
        text_hidden_dim=512,
        text_num_layers=12,
        text_num_heads=8,
        text_intermediate_dim=None,
        activation="quick_gelu",
        layer_norm_epsilon=1e-5,
        batch_norm_epsilon=1e-5,
        initial_logit_scale=None,
        max_logit_scale=100.0,
        end_token_id=49407,
        max_image_pixels=DEFAULT_MAX_PIXELS,
        loss="softmax",
        initial_logit_bias=-10.0,
        text_architecture="transformer",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"`loss` must be 'softmax' or 'sigmoid'. Received: loss={loss!r}")
        if initial_logit_scale is None:
            initial_logit_scale = 10.0 if loss == "sigmoid" else 1 / 0.07
        if text_architecture not in TEXT_ARCHITECTURES:
            raise ValueError(
                f"`text_architecture` must be one of {TEXT_ARCHITECTURES}. "
                f"Received: text_architecture={text_architecture!r}"
            )
        if vision_architecture not in ("vit", "resnet"):
            raise ValueError(
                "`vision_architecture` must be 'vit' or 'resnet'. "
                f"Received: vision_architecture={vision_architecture!r}"
            )
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.vision_architecture = vision_architecture
        vision_num_layers = _resolve_vision_num_layers(vision_architecture, vision_num_layers)
        self.vision_num_layers = vision_num_layers
        # Per-architecture defaults (ViT-B/32, RN50); the resolved values are the config.
        if vision_hidden_dim is None:
            vision_hidden_dim = 64 if vision_architecture == "resnet" else 768
        if vision_num_heads is None:
            vision_num_heads = 32 if vision_architecture == "resnet" else 12
        self.vision_hidden_dim = vision_hidden_dim
        self.vision_num_heads = vision_num_heads
        self.vision_patch_size = vision_patch_size
        self.vision_intermediate_dim = vision_intermediate_dim
        if vision_patch_dropout and vision_architecture != "vit":
            raise ValueError(
                "`vision_patch_dropout` needs vision_architecture='vit'. "
                f"Received: vision_patch_dropout={vision_patch_dropout}, "
                f"vision_architecture={vision_architecture!r}"
            )
        self.vision_patch_dropout = vision_patch_dropout
        self.context_length = context_length
        self.vocabulary_size = vocabulary_size
        self.text_hidden_dim = text_hidden_dim
        self.text_num_layers = text_num_layers
        self.text_num_heads = text_num_heads
        self.text_intermediate_dim = text_intermediate_dim
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.batch_norm_epsilon = batch_norm_epsilon
        self.initial_logit_scale = initial_logit_scale
        self.max_logit_scale = max_logit_scale
        self.end_token_id = end_token_id
        self.max_image_pixels = validate_max_pixels(
            max_image_pixels, "max_image_pixels", image_size=image_size
        )
        self.contrastive_loss = loss  # `self.loss` belongs to keras.Model.compile
        self.initial_logit_bias = initial_logit_bias
        self.text_architecture = text_architecture

        if vision_architecture == "vit":
            self.visual = CLIPVisionTransformer(
                embed_dim,
                image_size=image_size,
                patch_size=vision_patch_size,
                hidden_dim=vision_hidden_dim,
                num_layers=vision_num_layers,
                num_heads=vision_num_heads,
                intermediate_dim=vision_intermediate_dim or 4 * vision_hidden_dim,
                activation=activation,
                layer_norm_epsilon=layer_norm_epsilon,
                patch_dropout=vision_patch_dropout,
                name="visual",
                dtype=self.dtype_policy,
            )
        else:
            self.visual = CLIPModifiedResNet(
                embed_dim,
                image_size=image_size,
                num_layers=vision_num_layers,
                hidden_dim=vision_hidden_dim,
                num_heads=vision_num_heads,
                batch_norm_epsilon=batch_norm_epsilon,
                name="visual",
                dtype=self.dtype_policy,
            )
        if text_architecture == "bag_of_words":
            self.text = CLIPBagOfWordsEncoder(
                embed_dim, vocabulary_size=vocabulary_size, context_length=context_length,
                hidden_dim=text_hidden_dim, name="text", dtype=self.dtype_policy,
            )
        else:
            self.text = CLIPTextTransformer(
                embed_dim,
                vocabulary_size=vocabulary_size,
                context_length=context_length,
                hidden_dim=text_hidden_dim,
                num_layers=text_num_layers,
                num_heads=text_num_heads,
                intermediate_dim=text_intermediate_dim or 4 * text_hidden_dim,
                activation=activation,
                layer_norm_epsilon=layer_norm_epsilon,
                end_token_id=end_token_id,
                name="text",
                dtype=self.dtype_policy,
            )
        self.logit_scale = LogitScale(
            initial_logit_scale, max_logit_scale, name="logit_scale", dtype="float32"
        )
        self.logit_bias = (
            LogitBias(initial_logit_bias, name="logit_bias", dtype="float32")
            if loss == "sigmoid" else None
        )
        # Training state that is not configuration.
        self._jit_towers = False
        self._gradient_cache_chunks = 1
        self._encode_pair_fn = None
        self._trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", "image_to_text_accuracy", "text_to_image_accuracy",
                         "temperature", "learning_rate")
        }
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.visual.build((None, self.image_size, self.image_size, 3))
        self.text.build((None, self.context_length))
        self.logit_scale.build()
        if self.logit_bias is not None:
            self.logit_bias.build()
        self.built = True

    # -- encoders -----------------------------------------------------------------
    def encode_image(self, images, normalize=True, training=None, seed=None):
        """Image embeddings `(B, E)`; `images` as produced by `CLIPImagePreprocessor`.

        `seed` (int32 `(2,)`, ViT with patch dropout only) fixes the dropped patches.
        """
        if seed is not None:
            features = self.visual(images, training=training, seed=seed)
        else:
            features = self.visual(images, training=training)
        return _l2_normalize(features) if normalize else features

    def encode_text(self, token_ids, normalize=True, trim=False):
        """Text embeddings `(B, E)`; `token_ids` as produced by `CLIPTokenizer`."""
        features = self.text(token_ids, trim=trim)
        return _l2_normalize(features) if normalize else features

    def call(self, inputs, training=None):
        image_embeddings = self.encode_image(inputs["images"], training=training)
        text_embeddings = self.encode_text(inputs["token_ids"])
        scale = ops.cast(self.logit_scale(), image_embeddings.dtype)
        logits_per_image = scale * ops.matmul(image_embeddings, ops.transpose(text_embeddings))
        if self.logit_bias is not None:  # sigmoid loss: sigmoid(logits) is P(match)
            logits_per_image = logits_per_image + ops.cast(self.logit_bias(), logits_per_image.dtype)
        return {
            "image_embeddings": image_embeddings,
            "text_embeddings": text_embeddings,
            "logits_per_image": logits_per_image,
            "logits_per_text": ops.transpose(logits_per_image),
        }

    def load_weights(self, filepath, *args, **kwargs):
        """`keras.Model.load_weights`, plus: a sigmoid-loss model accepts the weights
        file of a softmax-loss model with the same towers (no `logit_bias` in it), so
        SigLIP fine-tuning can start from a CLIP preset; the bias keeps its initial
        value and the temperature is the file's."""
        if self.logit_bias is not None and str(filepath).endswith(".weights.h5"):
            import h5py

            with h5py.File(filepath, "r") as f:
                has_bias = "logit_bias" in f.get("layers", {})
            if not has_bias:
                config = {k: v for k, v in self.get_config().items() if k not in ("name", "trainable")}
                donor = CLIP(**dict(config, loss="softmax"))
                donor.load_weights(filepath, *args, **kwargs)
                donated = {v.path.split("/", 1)[1]: v for v in donor.weights}
                for variable in self.weights:
                    path = variable.path.split("/", 1)[1]
                    if not path.startswith("logit_bias/"):
                        variable.assign(donated[path])
                logging.info("Loaded softmax-loss weights %s into a sigmoid-loss CLIP; "
                             "logit_bias starts at %s", filepath, self.initial_logit_bias)
                return
        return super().load_weights(filepath, *args, **kwargs)

    # -- locked towers (LiT) ------------------------------------------------------
    def lock_towers(self, image=False, text=False, unlocked_image_blocks=0,
                    unlocked_text_blocks=0):
        """Freezes the image and/or text tower for training (LiT, Zhai et al., 2022).

        A locked tower's weights become non-trainable: `trainable_variables` omits
        them, so the optimizer creates no state for them and the gradient tape never
        watches them, which skips the tower's backward pass entirely (the images enter
        the step as constants). Locked sub-layers run in inference mode, so a ResNet's
        batch-norm statistics stay frozen. Call before `compile` and before building
        the optimizer. The lock is a training setting, not part of the model's config.

        Args:
            image, text: bool. Lock that tower.
            unlocked_image_blocks, unlocked_text_blocks: int. Leave the last N residual
                blocks of a locked tower trainable, together with its head (ViT:
                `ln_post` and `proj`; text: `ln_final` and `text_projection`; ResNet:
                the attention pool; the N blocks count bottlenecks across stages).
                0 (default): the whole tower is locked.
        """
        for tower, lock, unlocked, arg in (
            (self.visual, image, unlocked_image_blocks, "unlocked_image_blocks"),
            (self.text, text, unlocked_text_blocks, "unlocked_text_blocks"),
        ):
            blocks, head_layers, head_weights = _tower_parts(tower)
            if not isinstance(unlocked, int) or not 0 <= unlocked <= len(blocks):
                raise ValueError(
                    f"`{arg}` must be an int from 0 to the tower's {len(blocks)} blocks. "
                    f"Received: {arg}={unlocked!r}"
                )
            if unlocked and not lock:
                raise ValueError(f"`{arg}` needs its tower locked. Received: {arg}={unlocked}")
            own = [w for w in tower.weights if w.path.rsplit("/", 1)[0] == tower.path]
            _set_trainable(tower, True)
            for variable in own:  # embeddings and projections: all trainable by design
                variable.trainable = True
            if not lock:
                continue
            if not unlocked:
                _set_trainable(tower, False)
                continue
            keep_layers = set(map(id, blocks[len(blocks) - unlocked:] + head_layers))
            keep_weights = set(map(id, head_weights))
            for layer in tower._flatten_layers(include_self=False, recursive=False):
                if id(layer) not in keep_layers:
                    _set_trainable(layer, False)
            for variable in own:
                variable.trainable = id(variable) in keep_weights
        logging.info("Locked towers: image=%s (last %d blocks trainable), text=%s (last %d); "
                     "%d trainable variables", image, unlocked_image_blocks, text,
                     unlocked_text_blocks, len(self.trainable_variables))

    # -- training -----------------------------------------------------------------
    def compile(self, optimizer="adamw", jit_compile=False, gradient_cache_chunks=1, remat=False,
                **kwargs):
        """Configures training. No Keras `loss`: the contrastive loss is built in.

        Args:
            optimizer: a Keras optimizer (see `keras_clip.training.create_optimizer`).
            jit_compile: bool or "auto" (on only with a GPU). XLA-compile the towers'
                forward and backward passes.
                The cross-replica all-gather stays outside the compiled function (XLA
                on CPU cannot compile collectives), so this works under every
                `tf.distribute` strategy; Keras' whole-step compilation is disabled.
            gradient_cache_chunks: int. 1: the plain step. K > 1: gradient caching
                (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under
                Memory Limited Setup"): each replica's batch is embedded in K chunks
                without keeping activations, the loss and its gradients with respect
                to the embeddings are computed over the whole global batch, then
                each chunk's towers are run again and back-propagated with those
                embedding gradients. The update equals the plain step's; activation
                memory is that of one chunk; the towers' forward pass runs twice.
                The local batch must be a multiple of K.
            remat: bool. Rematerialise every transformer block of both towers
                (`keras.remat`, i.e. `tf.recompute_grad`): the backward pass keeps
                only each block's input and recomputes its inside, trading about one
                extra forward pass of the blocks for their activation memory. Same
                gradients. (ResNet image towers are not rematerialised.)
            **kwargs: passed to `keras.Model.compile` (e.g. `steps_per_execution`).
        """
        if "loss" in kwargs:
            raise ValueError("CLIP computes its contrastive loss itself; do not pass `loss`.")
        if not isinstance(gradient_cache_chunks, int) or gradient_cache_chunks < 1:
            raise ValueError(
                "`gradient_cache_chunks` must be an int >= 1. "
                f"Received: gradient_cache_chunks={gradient_cache_chunks!r}"
            )
        super().compile(optimizer=optimizer, jit_compile=False, **kwargs)
        if jit_compile == "auto":  # Keras' default spelling: XLA where a GPU is present
            jit_compile = bool(tf.config.list_physical_devices("GPU"))
        self._jit_towers = bool(jit_compile)
        self._encode_pair_fn = None
        self._gradient_cache_chunks = gradient_cache_chunks
        for tower in (self.visual, self.text):
            if hasattr(tower, "remat"):
                tower.remat = bool(remat)

    @property
    def metrics(self):
        # Our own trackers only: Keras' built-in loss tracker would report 0.0 because
        # the custom train_step never feeds it.
        return list(self._trackers.values())

    def _encode_pair(self, images, token_ids, training, seed=None):
        """Unit-norm float32 `(b, E)` image and text embeddings for the loss.

        The towers run in the compute dtype; the features are normalised in float32
        and stay float32 into the logits (not rounded to bf16 in between).
        """
        if not self._jit_towers:
            # Trimming to the batch's longest text is exact (causal mask) and saves
            # text-tower compute; XLA needs static shapes, so only without it.
            return (_unit_float32(self.encode_image(images, normalize=False, training=training, seed=seed)),
                    _unit_float32(self.encode_text(token_ids, normalize=False, trim=True)))
        if self._encode_pair_fn is None:
            self._encode_pair_fn = {
                flag: tf.function(
                    lambda i, t, s=None, flag=flag: (
                        _unit_float32(self.encode_image(i, normalize=False, training=flag, seed=s)),
                        _unit_float32(self.encode_text(t, normalize=False))),
                    jit_compile=True,
                )
                for flag in (True, False)
            }
        return self._encode_pair_fn[bool(training)](images, token_ids, seed)

    def _contrastive_step(self, data, training):
        images, token_ids = data["images"], data["token_ids"]
        _, num_replicas = distribute.replica_info()
        image, text = self._encode_pair(images, token_ids, training)  # (b, E) each
        return self._loss_from_embeddings(image, text), num_replicas

    def _loss_from_embeddings(self, image, text):
        """The loss of this replica's `(b, E)` embeddings against every replica's."""
        replica_id, _ = distribute.replica_info()
        all_image = distribute.gather_with_gradient(image)  # (N, E)
        all_text = distribute.gather_with_gradient(text)  # (N, E)
        local_batch = tf.shape(image)[0]
        offset = tf.cast(replica_id, tf.int32) * local_batch
        if self.contrastive_loss == "sigmoid":
            out = losses.sigmoid_loss(image, text, all_image, all_text, self.logit_scale(),
                                      self.logit_bias(), offset)
        else:
            out = losses.clip_loss(image, text, all_image, all_text, self.logit_scale(), offset)
        return out

    @contextlib.contextmanager
    def _gradient_tape(self):
        """A tape watching exactly `trainable_variables`.

        The default tape watches every `tf.Variable` created trainable, which includes
        weights that `lock_towers` froze (Keras' flag does not reach the underlying
        `tf.Variable`); it would record a locked tower's forward pass and build its
        backward pass. Watching only the trainable weights records nothing upstream
        of the first unlocked layer.
        """
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in self.trainable_variables])  # the tf.Variables
            yield tape

    def _update_trackers(self, out):
        self._trackers["loss"].update_state(out["loss"])
        self._trackers["image_to_text_accuracy"].update_state(out["image_to_text_accuracy"])
        self._trackers["text_to_image_accuracy"].update_state(out["text_to_image_accuracy"])
        self._trackers["temperature"].update_state(1.0 / self.logit_scale())
        lr = self.optimizer.learning_rate if self.optimizer is not None else 0.0
        self._trackers["learning_rate"].update_state(lr)
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def train_step(self, data):
        """One optimisation step on a batch of pairs, with negatives from every replica.

        Runs once per replica (inside `strategy.run` under `fit` or a custom loop).
        Features are all-gathered with gradient; this replica's rows are scored
        against all N columns with labels offset by `replica_id * local_batch`. The
        loss is divided by the number of replicas because the optimizer sums
        gradients across replicas: the summed gradient then equals that of one
        replica holding the whole global batch.

        Args:
            data: dict with `images` `(b, S, S, 3)` and `token_ids` `(b, T)`.

        Returns:
            dict of running means: loss, image_to_text_accuracy,
            text_to_image_accuracy, temperature (1 / logit_scale), learning_rate.
        """
        if self._gradient_cache_chunks > 1:
            return self._gradient_cache_step(data, self._gradient_cache_chunks)
        with self._gradient_tape() as tape:
            out, num_replicas = self._contrastive_step(data, training=True)
            loss = out["loss"] / num_replicas
            loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._update_trackers(out)

    def _gradient_cache_step(self, data, chunks):
        """`train_step` in `chunks` pieces with the same update (see `compile`)."""
        images, token_ids = data["images"], data["token_ids"]
        local_batch = images.shape[0]
        if local_batch is None or local_batch % chunks:
            raise ValueError(
                "Gradient caching needs a static per-replica batch that is a multiple of "
                f"`gradient_cache_chunks`. Received: batch={local_batch}, "
                f"gradient_cache_chunks={chunks}"
            )
        size = local_batch // chunks
        pieces = [(images[i * size:(i + 1) * size], token_ids[i * size:(i + 1) * size])
                  for i in range(chunks)]
        _, num_replicas = distribute.replica_info()
        # Patch dropout must drop the same patches in both passes: one seed per chunk.
        seeds = ([tf.random.uniform((2,), maxval=2**31 - 1, dtype=tf.int32) for _ in pieces]
                 if getattr(self.visual, "patch_dropout", 0) else [None] * chunks)
        # 1. Embed every chunk with no tape: no activation outlives its chunk. Each
        # chunk waits for the previous one (a graph's executor would otherwise run
        # them side by side and hold every chunk's activations at once).
        embedded, previous = [], []
        for (chunk_images, chunk_tokens), seed in zip(pieces, seeds):
            with tf.control_dependencies(previous):
                chunk_images, chunk_tokens = tf.identity(chunk_images), tf.identity(chunk_tokens)
            embedded.append(self._encode_pair(chunk_images, chunk_tokens, True, seed))
            previous = list(embedded[-1])
        image = tf.stop_gradient(tf.concat([e[0] for e in embedded], axis=0))  # (b, E)
        text = tf.stop_gradient(tf.concat([e[1] for e in embedded], axis=0))  # (b, E)
        # 2. The loss over the global batch (negatives from every replica): gradients
        # with respect to this replica's embeddings and to the loss's own weights.
        head = [v for v in self.trainable_variables if _is_loss_weight(v)]
        towers = [v for v in self.trainable_variables if not _is_loss_weight(v)]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([image, text] + [v.value for v in head])
            out = self._loss_from_embeddings(image, text)
            loss = self.optimizer.scale_loss(out["loss"] / num_replicas)
        d_image, d_text, *head_gradients = tape.gradient(loss, [image, text] + head)
        # 3. Each chunk again, back-propagating the cached embedding gradients.
        tower_gradients = [None] * len(towers)
        for i, (chunk_images, chunk_tokens) in enumerate(pieces):
            previous = [g.values if isinstance(g, tf.IndexedSlices) else g
                        for g in tower_gradients if g is not None]
            with tf.control_dependencies(previous):  # one chunk at a time, as above
                chunk_images, chunk_tokens = tf.identity(chunk_images), tf.identity(chunk_tokens)
            with self._gradient_tape() as tape:
                chunk_image, chunk_text = self._encode_pair(chunk_images, chunk_tokens, True, seeds[i])
            rows = slice(i * size, (i + 1) * size)
            gradients = tape.gradient([chunk_image, chunk_text], towers,
                                      output_gradients=[d_image[rows], d_text[rows]])
            tower_gradients = [_add_gradients(a, b) for a, b in zip(tower_gradients, gradients)]
        self.optimizer.apply(tower_gradients + head_gradients, towers + head)
        return self._update_trackers(out)

    def test_step(self, data):
        """The same loss and accuracies as `train_step`, without updating weights."""
        out, _ = self._contrastive_step(data, training=False)
        return self._update_trackers(out)

    # -- preprocessing that matches this model ------------------------------------
    def _preprocessing_layer(self, key, factory):
        # A plain dict outside Keras' tracking (layers can't be added once built); one
        # instance per model so its traced graphs are reused across calls.
        cache = self.__dict__.setdefault("_preprocessing_layers", {})
        if key not in cache:
            cache[key] = factory()
        return cache[key]

    @property
    def preprocessor_config(self):
        """The `PreprocessingConfig` of this model: its image size, context length and
        pixel limit, with the statistics, interpolation and text limit its preset
        recorded (OpenAI's by default). Training input, evaluation and export read it.

        Assign a `PreprocessingConfig` to change the statistics; its sizes and pixel
        limit must equal the model's.
        """
        from keras_clip.preprocessing.config import PreprocessingConfig

        return PreprocessingConfig.for_model(self, **self.__dict__.get("_preprocessing_extras", {}))

    @preprocessor_config.setter
    def preprocessor_config(self, config):
        from keras_clip.preprocessing.config import PreprocessingConfig

        if not isinstance(config, PreprocessingConfig):
            raise ValueError("`preprocessor_config` must be a `PreprocessingConfig`. "
                             f"Received: preprocessor_config={config!r}")
        for name in ("image_size", "context_length", "max_image_pixels"):
            if getattr(config, name) != getattr(self, name):
                raise ValueError(
                    f"`preprocessor_config.{name}` must equal the model's {name}={getattr(self, name)}. "
                    f"Received: {name}={getattr(config, name)}")
        # Plain attributes outside Keras' tracking; the cached layers follow the new config.
        self.__dict__["_preprocessing_extras"] = {
            name: getattr(config, name) for name in ("mean", "std", "interpolation", "resize_mode",
                                                      "max_text_bytes", "vocabulary")}
        self.__dict__.pop("_preprocessing_layers", None)

    def tokenizer(self):
        """The `CLIPTokenizer` for this model's context length (one shared instance)."""
        return self._preprocessing_layer("tokenizer", self.preprocessor_config.tokenizer)

    def image_preprocessor(self):
        """The `CLIPImagePreprocessor` of `preprocessor_config`: this model's resolution,
        pixel limit and its preset's statistics (one shared instance)."""
        return self._preprocessing_layer("image_preprocessor", self.preprocessor_config.image_preprocessor)

    # -- config and presets -------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embed_dim": self.embed_dim,
                "image_size": self.image_size,
                "vision_architecture": self.vision_architecture,
                "vision_num_layers": self.vision_num_layers,
                "vision_hidden_dim": self.vision_hidden_dim,
                "vision_num_heads": self.vision_num_heads,
                "vision_patch_size": self.vision_patch_size,
                "vision_intermediate_dim": self.vision_intermediate_dim,
                "vision_patch_dropout": self.vision_patch_dropout,
                "context_length": self.context_length,
                "vocabulary_size": self.vocabulary_size,
                "text_hidden_dim": self.text_hidden_dim,
                "text_num_layers": self.text_num_layers,
                "text_num_heads": self.text_num_heads,
                "text_intermediate_dim": self.text_intermediate_dim,
                "activation": self.activation,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "batch_norm_epsilon": self.batch_norm_epsilon,
                "initial_logit_scale": self.initial_logit_scale,
                "max_logit_scale": self.max_logit_scale,
                "end_token_id": self.end_token_id,
                "max_image_pixels": self.max_image_pixels,
                "loss": self.contrastive_loss,
                "initial_logit_bias": self.initial_logit_bias,
                "text_architecture": self.text_architecture,
            }
        )
        return config

    def count_params_by_tower(self):
        """Parameter counts: `{"visual": n, "text": n, "total": n}`."""
        visual = self.visual.count_params()
        total = self.count_params()
        return {"visual": visual, "text": total - visual, "total": total}

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a CLIP from a preset name, a keras_clip preset folder or a checkpoint.

        Args:
            preset: one of
                - a built-in architecture (`keras_clip.list_presets()`, e.g.
                  `"clip_vit_b32"` or its paper name `"ViT-B/32"`), randomly initialised;
                - a published-weights preset (e.g. `"clip_vit_b32_openai"`), downloaded
                  from the Hugging Face Hub with `huggingface_hub`;
                - `hf://owner/repo`: a Hugging Face repo in transformers or open_clip
                  layout;
                - a local keras_clip preset folder (`save_to_preset`);
                - a local Hugging Face transformers CLIP folder (`config.json` +
                  `model.safetensors`), or an open_clip hub folder
                  (`open_clip_config.json` + weights);
                - a local checkpoint file: OpenAI `.pt` (TorchScript or state dict),
                  open_clip `.pt`/`.pth`/`.bin`/`.safetensors`. The architecture is
                  inferred from the tensors, as OpenAI's `build_model` does.
            load_weights: bool. If False, build the architecture only (no download).
            **kwargs: overrides of constructor arguments, e.g. `activation="gelu"` for
                a LAION checkpoint file (files do not record the activation) or
                `dtype="mixed_bfloat16"`.

        Returns:
            A built `CLIP`.
        """
        from keras_clip import convert

        return convert.load_preset(cls, preset, load_weights=load_weights, **kwargs)

    def with_dtype(self, dtype):
        """A new `CLIP` with this one's config and weights under the dtype policy `dtype`.

        `"bfloat16"` stores every tower weight in bf16 (half the memory, no per-call
        weight casts): the fast inference mode on CPUs with AVX512-BF16 or AMX
        (docs/speed.md). The logit scale and bias stay float32 and the returned
        embeddings are L2-normalised in float32 before being cast to the compute
        dtype. Same as `CLIP.from_preset(..., dtype=dtype)` for a loaded model.

        Args:
            dtype: a Keras dtype policy name: `"float32"`, `"bfloat16"`,
                `"mixed_bfloat16"`, ...

        Returns:
            A built `CLIP`; `self` is unchanged.
        """
        config = {k: v for k, v in self.get_config().items() if k not in ("dtype", "name", "trainable")}
        clone = CLIP(**config, dtype=dtype, name=self.name)
        clone.preprocessor_config = self.preprocessor_config
        clone.set_weights([w.numpy() for w in self.weights])  # numpy: cast on assignment
        return clone

    def save_to_preset(self, preset_dir):
        """Writes `config.json` (model kwargs and the `preprocessing` block of
        `preprocessor_config`), `model.weights.h5` and the tokenizer vocabulary."""
        os.makedirs(preset_dir, exist_ok=True)
        config = {
            "module": "keras_clip",
            "class_name": "CLIP",
            "config": self.get_config(),
            # Read back by `from_preset` into `preprocessor_config`.
            "preprocessing": self.preprocessor_config.to_dict(),
        }
        with open(os.path.join(preset_dir, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        self.save_weights(os.path.join(preset_dir, WEIGHTS_FILE))
        assets = os.path.join(preset_dir, "assets")
        os.makedirs(assets, exist_ok=True)
        shutil.copyfile(
            os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", VOCABULARY_FILE),
            os.path.join(assets, VOCABULARY_FILE),
        )
        logging.info("Saved keras_clip preset to %s", preset_dir)

    def save_checkpoint(self, path, format):  # noqa: A002 - mirrors the CLI flag
        """Writes the model in another library's checkpoint format.

        `CLIP.from_preset(path)` reads every format back with identical weights.

        Args:
            path: where to write: a folder for `"open_clip"`, `"hf"` and
                `"keras_hub"`; a `.safetensors` or `.pt` file for `"openai"`.
            format: one of
                - `"open_clip"`: `open_clip_model.safetensors`,
                  `open_clip_config.json` (architecture, QuickGELU flag,
                  preprocessing) and the model config `<name>.json`; load with
                  `open_clip.create_model_and_transforms("local-dir:" + path)`;
                - `"openai"`: OpenAI's state-dict layout as safetensors or a
                  `torch.save` dict of tensors (only the safetensors metadata
                  records the activation, for keras_clip);
                - `"hf"`: a transformers `CLIPModel` folder with tokenizer and
                  image-processor files (ViT image towers only);
                - `"keras_hub"`: a keras-hub `CLIPBackbone` + `CLIPPreprocessor`
                  preset folder (ViT only; needs `keras_clip[keras_hub]`).

        Returns:
            List of the paths written.

        Raises:
            ValueError: unknown `format`, a ResNet image tower for `"hf"`, or a
                setting the format cannot record (e.g. LayerNorm epsilon != 1e-5
                for open_clip / OpenAI).
        """
        from keras_clip.convert import writers

        return writers.save_checkpoint(self, path, format)


RN50_BLOCKS = (3, 4, 6, 3)
VIT_DEFAULT_LAYERS = 12


def _resolve_vision_num_layers(architecture, num_layers):
    """`vision_num_layers` for `architecture`: the default for `None` (12 for a ViT,
    RN50's `[3, 4, 6, 3]` for a ResNet), a list for a ResNet, the int for a ViT."""
    if architecture == "resnet":
        if num_layers is None:
            return list(RN50_BLOCKS)
        if isinstance(num_layers, (str, bytes)) or not hasattr(num_layers, "__iter__"):
            raise ValueError(
                "`vision_num_layers` must be 4 ints for a ResNet (bottleneck blocks per "
                f"stage; RN50: {list(RN50_BLOCKS)}). Received: vision_num_layers={num_layers!r}"
            )
        return list(num_layers)
    if num_layers is None:
        return VIT_DEFAULT_LAYERS
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral):
        raise ValueError(
            "`vision_num_layers` must be an int for a ViT (transformer blocks). "
            f"Received: vision_num_layers={num_layers!r}"
        )
    return num_layers


def _is_loss_weight(variable):
    """The loss's own weights (`logit_scale`, `logit_bias`), not the towers'."""
    return "/logit_scale/" in variable.path or "/logit_bias/" in variable.path


def _add_gradients(total, gradient):
    """Sums chunk gradients; embedding gradients stay sparse (`IndexedSlices`)."""
    if total is None or gradient is None:
        return gradient if total is None else total
    if isinstance(total, tf.IndexedSlices) and isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(tf.concat([total.values, gradient.values], axis=0),
                                tf.concat([total.indices, gradient.indices], axis=0),
                                total.dense_shape)
    return tf.convert_to_tensor(total) + tf.convert_to_tensor(gradient)


def _tower_parts(tower):
    """`(residual blocks in order, head layers, head weights)` of a tower."""
    if isinstance(tower, CLIPVisionTransformer):
        return list(tower.resblocks), [tower.ln_post], [tower.proj]
    if isinstance(tower, CLIPModifiedResNet):
        return [block for stage in tower.stages for block in stage], [tower.attnpool], []
    if isinstance(tower, CLIPBagOfWordsEncoder):
        return [], [], [tower.text_projection]
    return list(tower.resblocks), [tower.ln_final], [tower.text_projection]


def _set_trainable(layer, value):
    """Sets the flag of `layer` and of every sub-layer, including those kept in plain
    lists of tuples (which Keras' own setter does not reach). Only weights created
    trainable change; batch-norm statistics stay non-trainable."""
    for sublayer in layer._flatten_layers(include_self=True, recursive=True):
        sublayer.trainable = value


def _unit_float32(x):
    """`x / ||x||` over the last axis, computed and returned in float32."""
    x32 = ops.cast(x, "float32")
    return x32 / ops.sqrt(ops.sum(x32 * x32, axis=-1, keepdims=True))


def _l2_normalize(x):
    return ops.cast(_unit_float32(x), x.dtype)
