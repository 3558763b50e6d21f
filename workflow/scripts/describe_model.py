"""Rule describe_model: load a model the user gives, check it against the cohort grid, describe its layers."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.models import describe_job

if __name__ == "__main__":
    run(describe_job, snakemake)  # noqa: F821 (injected by Snakemake)
