"""Rule visualize: activation maximization of one layer's units under one preset."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.featviz import visualize_job

if __name__ == "__main__":
    run(visualize_job, snakemake)  # noqa: F821 (injected by Snakemake)
