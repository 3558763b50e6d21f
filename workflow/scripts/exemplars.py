"""Rule exemplars: the real test volumes that activate each unit of a request most."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.featviz import exemplars_job

if __name__ == "__main__":
    run(exemplars_job, snakemake)  # noqa: F821 (injected by Snakemake)
