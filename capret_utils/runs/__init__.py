"""Stage 7, runs: where things live and what every run leaves behind.

Owns the data root and run folders (:mod:`.paths`), ``params.json`` / ``metrics.json`` with the git SHA
(:mod:`.folders`, re-exported here: ``runs.write_params(...)``), parameter sweeps over notebooks
(:mod:`.sweep`) and ``make demo`` (:mod:`.demo`).
"""

from capret_utils.runs.folders import (
    METRICS_FILE,
    PARAMS_FILE,
    environment_info,
    git_sha,
    notebook_parameters,
    parameter_names,
    read_metrics,
    write_metrics,
    write_params,
)

__all__ = ["METRICS_FILE", "PARAMS_FILE", "environment_info", "git_sha", "notebook_parameters", "parameter_names",
           "read_metrics", "write_metrics", "write_params"]
