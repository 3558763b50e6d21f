"""Feature visualization: one job per task × layer × regularizer, all units of the layer batched."""


rule visualize:
    input:
        unpack(visualize_inputs),
    output:
        nifti=f"{FEATVIZ}/units.nii.gz",
        table=f"{FEATVIZ}/units.tsv",
        trajectory=f"{FEATVIZ}/trajectory.tsv",
    params:
        request=lambda wc: visualize_request(wc),
    wildcard_constraints:
        layer=r"[^/]+",
        regularizer=r"[^/]+",
    log:
        f"{LOGS}/visualize/{{task}}_{{layer}}_{{regularizer}}.log",
    benchmark:
        f"{BENCH}/visualize/{{task}}_{{layer}}_{{regularizer}}.tsv"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=lambda wc, attempt: job_mem_mb(attempt, batch=3 * len(layer_unit_list(wc.task, wc.layer)) * config["featviz"]["seeds"]),
        runtime=lambda wc, attempt: 60 * attempt,
        gpu=config["compute"]["gpu"],
    retries: 1
    group:
        "featviz_{task}"
    conda:
        env("torch-gpu" if config["compute"]["gpu"] else "torch-cpu")
    script:
        "../scripts/visualize.py"


rule visualize_unit:
    """One unit as a target: results/featviz/{task}/{layer}/{regularizer}/unit-{unit}.nii.gz.
    A unit listed in the config is computed exactly as in its layer's job (same request, seeds
    and micro-batches, so the same volume); any other unit of the layer is optimised alone."""
    input:
        unpack(visualize_inputs),
    output:
        nifti=f"{FEATVIZ}/unit-{{unit}}.nii.gz",
        table=f"{FEATVIZ}/unit-{{unit}}.tsv",
    params:
        request=lambda wc: visualize_request(wc, int(wc.unit)),
    wildcard_constraints:
        layer=r"[^/]+",
        regularizer=r"[^/]+",
        unit=r"\d+",
    log:
        f"{LOGS}/visualize/{{task}}_{{layer}}_{{regularizer}}_unit-{{unit}}.log",
    threads: config["compute"]["threads"]
    resources:
        gpu=config["compute"]["gpu"],
    conda:
        env("torch-gpu" if config["compute"]["gpu"] else "torch-cpu")
    script:
        "../scripts/visualize.py"
