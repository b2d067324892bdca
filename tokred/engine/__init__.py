"""Training, evaluation, checkpoints and distributed helpers."""

from tokred.engine.checkpoint import load_checkpoint, save_checkpoint
from tokred.engine.evaluate import ConfusionMatrix, evaluate, slide_inference
from tokred.engine.train import build_optimizer, build_scheduler, train

__all__ = ["ConfusionMatrix", "build_optimizer", "build_scheduler", "evaluate", "load_checkpoint",
           "save_checkpoint", "slide_inference", "train"]
