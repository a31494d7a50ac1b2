"""Contrastive training: `TrainConfig`, the trainer's stages and `run()` (`loop`),
optimizer, schedule, checkpoints."""
from keras_clip.training.config import TrainConfig
from keras_clip.training.loop import run
from keras_clip.training.optimizer import WarmupCosineDecay, create_optimizer

__all__ = ["TrainConfig", "WarmupCosineDecay", "create_optimizer", "run"]
