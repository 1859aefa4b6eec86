"""A worker process of ``prismrec tune``: ``python -m prismrec.experiments.tuning.worker`` with a
:class:`~prismrec.experiments.tuning.study.WorkerJob` as JSON on standard input (the storage URL may hold a
password, so it is not on the command line). Exit code 0: the study has its trials; 2: the job is invalid;
3: the worker stopped because its trials kept failing."""

from __future__ import annotations

import json
import sys

from prismrec.data.errors import DataError
from prismrec.experiments.tuning.study import WorkerError, WorkerJob, run_worker
from prismrec.options import ConfigError


def main() -> int:
    job = WorkerJob(**json.loads(sys.stdin.read()))
    try:
        run_worker(job)
    except (ConfigError, DataError) as exc:
        print(f"tune worker {job.index}: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"tune worker {job.index}: stopped: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
