"""Rule unit_figures: a request's units on anatomy (figure) and in an offline viewer page."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.report import units_job

if __name__ == "__main__":
    run(units_job, snakemake)  # noqa: F821 (injected by Snakemake)
