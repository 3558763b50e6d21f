"""Shared start of every rule script.

Makes the library importable whether or not the project is pip-installed (inside
a rule's own conda env it is not; Snakemake puts this folder on ``sys.path``),
sends log lines to the rule's ``log:`` file, and turns brainfv errors into a
one-line message instead of a traceback.
"""
import sys
import traceback
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def run(main, snakemake):
    """Run ``main(snakemake, log)`` with logging to ``snakemake.log[0]``."""
    from brainfv.errors import BrainFVError
    from brainfv.utils import get_logger

    logger = get_logger("brainfv", snakemake.log[0] if len(snakemake.log) else None)
    logger.info(f"rule {snakemake.rule} {dict(snakemake.wildcards)} threads={snakemake.threads}")
    try:
        main(snakemake, logger.info)
    except BrainFVError as e:
        logger.error(f"{type(e).__name__}: {e}")
        raise SystemExit(f"brainfv {snakemake.rule}: {e}")
    except Exception:
        logger.error(traceback.format_exc())
        raise
    logger.info("done")
