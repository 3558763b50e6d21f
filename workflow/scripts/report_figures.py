"""Rule report_figures: the study's figures from cached results (no training, no optimisation)."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.report import report_job

if __name__ == "__main__":
    run(report_job, snakemake)  # noqa: F821 (injected by Snakemake)
