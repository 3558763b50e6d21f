"""Rule attribute: attribution maps of a task's class logits on its test subjects."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.attribution import attribution_job
from brainfv.jobs.base import run

if __name__ == "__main__":
    run(attribution_job, snakemake)  # noqa: F821 (injected by Snakemake)
