"""Rule prepare_cohort: any data source → the cohort store on the study grid, plus a QC figure."""
import _setup


def main(snakemake, log):
    from pathlib import Path

    from brainfv.data.cohort import prepare_cohort
    from brainfv.report.figures import cohort_qc_figure

    import torch
    torch.set_num_threads(snakemake.threads)
    out = Path(snakemake.output.volumes).parent
    prepare_cohort(snakemake.params.cfg, out, log=log)
    cohort_qc_figure(out, snakemake.output.figure)


if __name__ == "__main__":
    _setup.run(main, snakemake)  # noqa: F821 (injected by Snakemake)
