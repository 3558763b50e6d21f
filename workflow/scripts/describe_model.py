"""Rule describe_model: load a model the user gives, check it against the cohort grid, describe its layers."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.job import run
from brainfv.model_io import describe_job

if __name__ == "__main__":
    run(describe_job, snakemake)  # noqa: F821 (injected by Snakemake)
