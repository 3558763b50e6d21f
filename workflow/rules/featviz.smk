"""Feature visualization: one job per task × layer × regularizer, all units of the layer batched."""

FV = f"{R}/featviz/{{task}}/{{layer}}/{{regularizer}}"


rule visualize:
    input:
        model=f"{R}/models/{{task}}/rep-0/model.pt",
        volumes=lambda wc: f"{task_dataset_dir(wc.task)}/volumes.npy",
    output:
        nifti=f"{FV}/units.nii.gz",
        table=f"{FV}/units.tsv",
        trajectory=f"{FV}/trajectory.tsv",
    params:
        **{k: (lambda wc, k=k: featviz_params(wc)[k]) for k in FEATVIZ_PARAM_KEYS},
    wildcard_constraints:
        layer=r"[^/]+",
        regularizer=r"[^/]+",
    log:
        f"{R}/logs/visualize/{{task}}_{{layer}}_{{regularizer}}.log",
    benchmark:
        f"{R}/benchmarks/visualize/{{task}}_{{layer}}_{{regularizer}}.tsv"
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
        model=f"{R}/models/{{task}}/rep-0/model.pt",
        volumes=lambda wc: f"{task_dataset_dir(wc.task)}/volumes.npy",
    output:
        nifti=f"{FV}/unit-{{unit}}.nii.gz",
        table=f"{FV}/unit-{{unit}}.tsv",
    params:
        **{k: (lambda wc, k=k: featviz_params(wc, int(wc.unit))[k]) for k in FEATVIZ_PARAM_KEYS},
    wildcard_constraints:
        layer=r"[^/]+",
        regularizer=r"[^/]+",
        unit=r"\d+",
    log:
        f"{R}/logs/visualize/{{task}}_{{layer}}_{{regularizer}}_unit-{{unit}}.log",
    threads: config["compute"]["threads"]
    resources:
        gpu=config["compute"]["gpu"],
    conda:
        env("torch-gpu" if config["compute"]["gpu"] else "torch-cpu")
    script:
        "../scripts/visualize.py"
