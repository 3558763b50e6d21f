"""What a workflow rule hands the library: its files, parameters and a logger, as plain data.

Every rule's script is two lines: it passes Snakemake's job object to :func:`run` with one library
function (``brainfv.jobs.train.train_job``, ``brainfv.jobs.featviz.visualize_job``, ...). That function
receives a :class:`Job` of plain dicts, so it is testable without Snakemake, and reads only the files
named in ``job.input`` (the rule declares every file it reads).
"""
from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BrainFVError
from ..utils import get_logger, retain_freed_memory, terminate_cleanly

__all__ = ["Job", "run"]


@dataclass
class Job:
    """Inputs, outputs and params of one job (name -> path / value), its wildcards, threads and log."""

    input: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    wildcards: dict = field(default_factory=dict)
    threads: int = 1
    log: object = print
    rule: str = ""
    config: dict = field(default_factory=dict)  # the run's whole config, for checks that must not be params

    @classmethod
    def from_snakemake(cls, smk: object, log: Callable[[str], None]) -> Job:
        def named(items):  # Snakemake's named lists become plain strings / lists
            return {k: (v if isinstance(v, (str, int, float, bool, dict, type(None))) else list(v))
                    for k, v in items.items()}
        return cls(input=named(smk.input), output=named(smk.output), params=named(smk.params),
                   wildcards=named(smk.wildcards), threads=int(smk.threads), log=log, rule=smk.rule,
                   config=dict(getattr(smk, "config", {}) or {}))

    def folder(self, *names: str) -> Path:
        """The common folder of the named inputs (they must share one: a dataset or model folder)."""
        folders = {Path(self.input[n]).parent for n in names}
        if len(folders) != 1:
            raise ValueError(f"inputs {names} are not in one folder: {sorted(map(str, folders))}")
        return folders.pop()


def retains_freed_memory(fn: Callable[[Job], None]) -> Callable[[Job], None]:
    """Mark a job function whose step optimises or differentiates volumes: :func:`run` (the Snakemake script's
    process, one job) lets the allocator keep freed memory for it (:func:`~brainfv.utils.retain_freed_memory`);
    called directly (tests, the library) it changes nothing."""
    fn.retains_freed_memory = True
    return fn


def run(fn: Callable[[Job], None], smk: object) -> None:
    """Run ``fn(job)`` for Snakemake's ``smk`` object, logging to the rule's log file; brainfv errors end
    the job with their one-line message instead of a traceback. SIGTERM (a cluster's time limit,
    ``snakemake`` being stopped) is turned into an exception, so temporary files are removed."""
    logger = get_logger("brainfv", smk.log[0] if len(smk.log) else None)
    logger.info(f"rule {smk.rule} {dict(smk.wildcards)} threads={smk.threads}")
    if getattr(fn, "retains_freed_memory", False) and retain_freed_memory():
        logger.info("freed memory kept for reuse (one job in this process: utils.retain_freed_memory)")
    job = Job.from_snakemake(smk, logger.info)
    try:
        with terminate_cleanly():
            fn(job)
    except BrainFVError as e:
        logger.error(f"{type(e).__name__}: {e}")
        raise SystemExit(f"brainfv {smk.rule}: {e}")
    except Exception:
        logger.error(traceback.format_exc())
        raise
    logger.info("done")
