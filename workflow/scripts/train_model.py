"""Rule train_model: train one task's model (main or transfer), evaluate it, draw its learning curve."""
import _setup  # noqa: F401 (this checkout's library first on sys.path)

from brainfv.jobs.base import run
from brainfv.jobs.train import train_job

if __name__ == "__main__":
    run(train_job, snakemake)  # noqa: F821 (injected by Snakemake)
