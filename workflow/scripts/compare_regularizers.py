"""Rule compare_regularizers: one table over task × layer × unit × regularizer with fidelity metrics."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.compare import compare_job

if __name__ == "__main__":
    run(compare_job, snakemake)  # noqa: F821 (injected by Snakemake)
