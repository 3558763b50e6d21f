"""Rule synthesize_lesions: insert artificial lesions into the cohort; write labels, masks, a figure."""
import _setup


def main(snakemake, log):
    from pathlib import Path

    from brainfv.data.lesions import synthesize_lesions
    from brainfv.report.figures import lesion_examples_figure

    out = Path(snakemake.output.volumes).parent
    synthesize_lesions(snakemake.params.cohort_dir, snakemake.params.cfg, out, log=log)
    lesion_examples_figure(out, snakemake.output.figure)


if __name__ == "__main__":
    _setup.run(main, snakemake)  # noqa: F821 (injected by Snakemake)
