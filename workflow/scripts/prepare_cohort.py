"""Rule prepare_cohort: any data source → the cohort store on the study grid, plus a QC figure."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.data import cohort_job

if __name__ == "__main__":
    run(cohort_job, snakemake)  # noqa: F821 (injected by Snakemake)
