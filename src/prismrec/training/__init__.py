"""Training: the Trainer, run directories, resumable checkpoints and reproducibility records."""

from prismrec.training.checkpoint import CheckpointError
from prismrec.training.trainer import Trainer, TrainingOutcome, build_model, evaluate_run, prepare_split

__all__ = ["CheckpointError", "Trainer", "TrainingOutcome", "build_model", "evaluate_run", "prepare_split"]
