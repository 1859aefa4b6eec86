"""Training: the Trainer, run directories and reproducibility records."""

from prismrec.training.trainer import Trainer, TrainingOutcome, build_model, evaluate_run, prepare_split

__all__ = ["Trainer", "TrainingOutcome", "build_model", "evaluate_run", "prepare_split"]
