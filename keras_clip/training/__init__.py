"""Contrastive training: optimizer, schedule, checkpoints and the `run()` loop."""
from keras_clip.training.config import TrainConfig
from keras_clip.training.loop import run
from keras_clip.training.optimizer import WarmupCosineDecay, create_optimizer

__all__ = ["TrainConfig", "WarmupCosineDecay", "create_optimizer", "run"]
