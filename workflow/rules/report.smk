"""Comparison of regularizers and the study's figures (the paper-figures target)."""

REPORT = f"{R}/report"


rule compare_regularizers:
    input:
        niftis=[f"{R}/featviz/{e['task']}/{e['layer']}/{e['regularizer']}/units.nii.gz" for e in featviz_entries()],
        tables=[f"{R}/featviz/{e['task']}/{e['layer']}/{e['regularizer']}/units.tsv" for e in featviz_entries()],
        models=[f"{R}/models/{t}/rep-{r}/model.pt" for t in config["tasks"] for r in replicates()],
    output:
        table=report(f"{REPORT}/comparison.tsv", caption="../report/comparison.rst", category="4. Comparison"),
        summary=report(f"{REPORT}/summary.tsv", caption="../report/summary.rst", category="4. Comparison"),
    params:
        entries=featviz_entries(),
        models={t: [f"{R}/models/{t}/rep-{r}/model.pt" for r in replicates()] for t in config["tasks"]},
        datasets={t: task_dataset_dir(t) for t in config["tasks"]},
        lesions=config["lesions"],
    log:
        f"{R}/logs/compare_regularizers.log",
    benchmark:
        f"{R}/benchmarks/compare_regularizers.tsv"
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: job_mem_mb(attempt, batch=8),
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        env("torch-cpu")
    script:
        "../scripts/compare_regularizers.py"


rule report_figures:
    input:
        table=rules.compare_regularizers.output.table,
        niftis=[f"{R}/featviz/{e['task']}/{e['layer']}/{e['regularizer']}/units.nii.gz" for e in featviz_entries()],
        trajectories=[f"{R}/featviz/{e['task']}/{e['layer']}/{e['regularizer']}/trajectory.tsv"
                      for e in featviz_entries()],
        model_metrics=[f"{R}/models/{t}/rep-{r}/metrics.json" for t in config["tasks"] for r in replicates()],
        histories=[f"{R}/models/{t}/rep-{r}/history.tsv" for t in config["tasks"] for r in replicates()],
    output:
        grids=[report(f"{REPORT}/featviz_{t}_{l}.png", caption="../report/featviz_grid.rst",
                      category="3. Visualizations", labels={"task": t, "layer": l}) for t, l in grid_keys()],
        metrics=report(f"{REPORT}/metrics.png", caption="../report/metrics.rst", category="4. Comparison"),
        trajectories=report(f"{REPORT}/trajectories.png", caption="../report/trajectories.rst",
                            category="4. Comparison"),
        models=report(f"{REPORT}/models.png", caption="../report/models.rst", category="2. Models"),
    params:
        entries=featviz_entries(),
        grids=grid_keys(),
        datasets={t: task_dataset_dir(t) for t in config["tasks"]},
    log:
        f"{R}/logs/report_figures.log",
    benchmark:
        f"{R}/benchmarks/report_figures.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 3000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        env("report")
    script:
        "../scripts/report_figures.py"


rule paper_figures:
    """All figures of the study, regenerated from cached results: `snakemake paper_figures`."""
    input:
        rules.report_figures.output,
        data_targets(),
    default_target: False
