"""Comparison of regularizers and the study's figures (the paper-figures target)."""


rule compare_regularizers:
    input:
        record_paths(compare_records()),
    output:
        table=report(f"{REPORT}/comparison.tsv", caption="../report/comparison.rst", category="4. Comparison"),
        controls=f"{REPORT}/controls.tsv",
        summary=report(f"{REPORT}/summary.tsv", caption="../report/summary.rst", category="4. Comparison"),
        sanity=report(f"{REPORT}/sanity.tsv", caption="../report/sanity.rst", category="4. Comparison"),
        transfer=f"{REPORT}/transfer_models.tsv",
        findings=report(f"{REPORT}/findings.md", caption="../report/findings.rst", category="4. Comparison"),
    params:
        code=code("compare_regularizers"),  # the library modules it runs (brainfv.provenance)
        records=compare_records(),
        lesions=config["lesions"],
        compare=config["compare"],
        report=config["report"],
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
        trajectories=[featviz_file(e, "trajectory.tsv") for e in featviz_entries()],
        model_metrics=[model_file(t, r, "metrics.json") for t in config["tasks"] for r in roles(t)],
        histories=[model_file(t, r, "history.tsv") for t in config["tasks"] for r in roles(t)],
    output:
        metrics=report(f"{REPORT}/metrics.png", caption="../report/metrics.rst", category="4. Comparison"),
        calibration=report(f"{REPORT}/signal_vs_null.png", caption="../report/signal_vs_null.rst",
                           category="4. Comparison"),
        trajectories=report(f"{REPORT}/trajectories.png", caption="../report/trajectories.rst",
                            category="4. Comparison"),
        models=report(f"{REPORT}/models.png", caption="../report/models.rst", category="2. Models"),
    params:
        code=code("report_figures"),  # the library modules it runs (brainfv.provenance)
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


rule unit_figures:
    """A request's units on anatomy: each preset's visualization, the unit's top test volume and the attribution
    maps, at one MNI cut per unit; and the same as an offline page to scroll through."""
    input:
        unpack(unit_figure_inputs),
    output:
        figure=report(f"{REPORT}/units_{{task}}_{{layer}}.png", caption="../report/units.rst",
                      category="3. Visualizations", subcategory="{task}", labels={"task": "{task}", "request": "{layer}",
                                                                                   "kind": "figure"}),
        viewer=report(f"{REPORT}/viewer_{{task}}_{{layer}}.html", caption="../report/viewer.rst",
                      category="3. Visualizations", subcategory="{task}", labels={"task": "{task}", "request": "{layer}",
                                                                                   "kind": "interactive viewer"}),
    params:
        code=code("unit_figures"),  # the library modules it runs (brainfv.provenance)
        spec=lambda wc: unit_figure_params(wc),
    wildcard_constraints:
        layer=r"[^/]+",
        task=r"[^_/]+",
    log:
        f"{LOGS}/unit_figures/{{task}}_{{layer}}.log",
    benchmark:
        f"{BENCH}/unit_figures/{{task}}_{{layer}}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 3000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        env("report")
    script:
        "../scripts/unit_figures.py"


rule paper_figures:
    """All figures of the study, regenerated from cached results: `snakemake paper_figures`."""
    input:
        rules.report_figures.output,
        data_targets(),
        unit_figure_targets(),
    default_target: False
