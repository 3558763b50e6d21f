"""Comparison of regularizers and the study's figures (the paper-figures target)."""


rule compare_regularizers:
    input:
        niftis=[featviz_file(e, "units.nii.gz") for e in featviz_entries()],
        randomized=[featviz_file(e, "randomized.nii.gz") for e in featviz_entries()] if config["compare"]["randomized"] else [],
        tables=[featviz_file(e, "units.tsv") for e in featviz_entries()],
        models=[model_file(t) for t in config["tasks"]],
        predictions=[model_file(t, "main", "predictions.tsv") for t in config["tasks"]],
        transfer_models=[model_file(t, "transfer") for t in config["tasks"] if "transfer" in roles()],
        transfer_predictions=[model_file(t, "transfer", "predictions.tsv") for t in config["tasks"] if "transfer" in roles()],
        participants=per_task("participants"),
        volumes=per_task("volumes"),
        masks=per_task("mask"),
        references=per_task("reference"),
        effects=per_task("sex_effect"),
        effects_regional=per_task("sex_effect_regional"),
        lesion_masks=[dataset_file("lesions", "lesion_masks") for t in lesion_tasks()],
        attributions=attribution_files()[1],
    output:
        table=report(f"{REPORT}/comparison.tsv", caption="../report/comparison.rst", category="4. Comparison"),
        controls=f"{REPORT}/controls.tsv",
        summary=report(f"{REPORT}/summary.tsv", caption="../report/summary.rst", category="4. Comparison"),
        sanity=report(f"{REPORT}/sanity.tsv", caption="../report/sanity.rst", category="4. Comparison"),
        transfer=f"{REPORT}/transfer_models.tsv",
    params:
        entries=featviz_entries(),
        tasks=list(config["tasks"]),
        lesion_tasks=lesion_tasks(),
        attributions=attribution_files()[0],
        lesions=config["lesions"],
        compare=config["compare"],
        output_layer=OUTPUT_LAYER,
        seed=config["seed"],
    log:
        f"{LOGS}/compare_regularizers.log",
    benchmark:
        f"{BENCH}/compare_regularizers.tsv"
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: job_mem_mb(attempt, batch=32),
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        env("torch-cpu")
    script:
        "../scripts/compare_regularizers.py"


rule report_figures:
    input:
        table=rules.compare_regularizers.output.table,
        summary=rules.compare_regularizers.output.summary,
        niftis=[featviz_file(e, "units.nii.gz") for e in featviz_entries()],
        trajectories=[featviz_file(e, "trajectory.tsv") for e in featviz_entries()],
        model_metrics=[model_file(t, r, "metrics.json") for t in config["tasks"] for r in roles()],
        histories=[model_file(t, r, "history.tsv") for t in config["tasks"] for r in roles()],
        masks=per_task("mask"),
    output:
        grids=[report(f"{REPORT}/featviz_{t}_{l}.png", caption="../report/featviz_grid.rst",
                      category="3. Visualizations", labels={"task": t, "layer": l}) for t, l in grid_keys()],
        metrics=report(f"{REPORT}/metrics.png", caption="../report/metrics.rst", category="4. Comparison"),
        calibration=report(f"{REPORT}/signal_vs_null.png", caption="../report/signal_vs_null.rst",
                           category="4. Comparison"),
        trajectories=report(f"{REPORT}/trajectories.png", caption="../report/trajectories.rst",
                            category="4. Comparison"),
        models=report(f"{REPORT}/models.png", caption="../report/models.rst", category="2. Models"),
    params:
        entries=featviz_entries(),
        grids=grid_keys(),
        tasks=list(config["tasks"]),
        output_layer=OUTPUT_LAYER,
    log:
        f"{LOGS}/report_figures.log",
    benchmark:
        f"{BENCH}/report_figures.tsv"
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
