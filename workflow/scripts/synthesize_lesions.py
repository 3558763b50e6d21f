"""Rule synthesize_lesions: insert artificial lesions into the cohort; write labels, masks, a figure."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.data import lesions_job

if __name__ == "__main__":
    run(lesions_job, snakemake)  # noqa: F821 (injected by Snakemake)
