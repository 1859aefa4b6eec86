"""Hyperparameter search over any run-config option with Optuna (``prismrec tune``).

:mod:`.space` reads and checks the search-space file, :mod:`.objective` turns a trial into run directories and a
validation metric (pruning on the per-epoch curve), :mod:`.study` holds the storage, the trial counting and the
worker loop, :mod:`.runner` starts the workers and follows the study, :mod:`.report` writes the report and
the best configuration. Optuna is imported inside functions only: ``prismrec train`` never loads it.
"""

from __future__ import annotations

from prismrec.experiments.tuning.runner import TuneResult, tune
from prismrec.experiments.tuning.space import TuneSpace, load_space

__all__ = ["TuneResult", "TuneSpace", "load_space", "tune"]
