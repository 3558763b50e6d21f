"""Rule construct_model: a positive-control network whose preferred input is known (brainfv.models.positive)."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.models import positive_control_job

if __name__ == "__main__":
    run(positive_control_job, snakemake)  # noqa: F821 (injected by Snakemake)
