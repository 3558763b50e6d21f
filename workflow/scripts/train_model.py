"""Rule train_model: train one task's CNN (one replicate), evaluate it, draw its learning curve."""
import _setup


def main(snakemake, log):
    from pathlib import Path

    import pandas as pd
    import torch

    from brainfv.report.figures import learning_curve_figure
    from brainfv.training import train_task

    torch.set_num_threads(snakemake.threads)
    p = snakemake.params
    rep = int(snakemake.wildcards.rep)
    out = Path(snakemake.output.model).parent
    metrics = train_task(p.dataset_dir, p.task, p.target, p.arch, p.training, p.seed, out, p.checkpoint_dir,
                         log=log, replicate=rep)
    history = pd.read_csv(snakemake.output.history, sep="\t")
    learning_curve_figure(history, metrics, snakemake.output.curve,
                          f"task {p.task} (replicate {rep}) — {metrics['cohort']}")


if __name__ == "__main__":
    _setup.run(main, snakemake)  # noqa: F821 (injected by Snakemake)
