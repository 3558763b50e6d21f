"""Interpretation: per task × request × regularizer all units optimised in one batch (on the trained network
and, as a control, on the same network with re-initialised weights; on each trained replicate, {rep}, for a
request with replicates: all), dataset exemplars per request, and attribution maps of the class logits (those two
on replicate 0)."""


rule visualize:
    input:
        unpack(model_and_dataset("participants", "volumes", "mask", "reference")),
        unpack(probe_inputs),
    output:
        nifti=f"{FEATVIZ}/units.nii.gz",
        randomized=f"{FEATVIZ}/randomized.nii.gz" if config["compare"]["randomized"] else [],
        cascade=f"{FEATVIZ}/cascade.nii.gz" if config["featviz"]["cascade"] else [],
        cascade_table=f"{FEATVIZ}/cascade.tsv" if config["featviz"]["cascade"] else [],
        table=f"{FEATVIZ}/units.tsv",
        trajectory=f"{FEATVIZ}/trajectory.tsv",
    params:
        code=code("visualize"),  # the library modules it runs (brainfv.provenance)
        request=lambda wc: visualize_request(wc),
        model=lambda wc: model_param(wc.task),
        model_key=lambda wc: f"tasks.{wc.task}.model",
    wildcard_constraints:
        task=r"[^/]+",
        rep=REP,
        layer=r"[^/]+",
        regularizer=r"[^/]+",
    log:
        f"{LOGS}/visualize/{{task}}_{{rep}}{{layer}}_{{regularizer}}.log",
    benchmark:
        f"{BENCH}/visualize/{{task}}_{{rep}}{{layer}}_{{regularizer}}.tsv"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=lambda wc, attempt: job_mem_mb(attempt, batch=3 * layer_unit_count(wc.task, wc.layer) * layer_seeds(wc.task, wc.layer)),
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
    """One unit as a target: results/featviz/{task}/{layer}/{regularizer}/unit-{unit}.nii.gz (its seeds; a trained
    replicate r >= 1: results/featviz/{task}/rep{r}/...).
    A unit the config lists is computed exactly as in its layer's job (same request, seeds and
    micro-batches, so the same volumes); any other unit of the layer is optimised alone."""
    input:
        unpack(model_and_dataset("participants", "volumes", "mask", "reference")),
        unpack(probe_inputs),
    output:
        nifti=f"{FEATVIZ}/unit-{{unit}}.nii.gz",
        table=f"{FEATVIZ}/unit-{{unit}}.tsv",
    params:
        code=code("visualize"),  # the library modules it runs (brainfv.provenance)
        request=lambda wc: visualize_request(wc, int(wc.unit)),
        model=lambda wc: model_param(wc.task),
        model_key=lambda wc: f"tasks.{wc.task}.model",
    wildcard_constraints:
        task=r"[^/]+",
        rep=REP,
        layer=r"[^/]+",
        regularizer=r"[^/]+",
        unit=r"\d+",
    log:
        f"{LOGS}/visualize/{{task}}_{{rep}}{{layer}}_{{regularizer}}_unit-{{unit}}.log",
    threads: config["compute"]["threads"]
    resources:
        gpu=config["compute"]["gpu"],
    conda:
        env("torch-gpu" if config["compute"]["gpu"] else "torch-cpu")
    script:
        "../scripts/visualize.py"


rule exemplars:
    """The real test volumes that activate each unit of a request most (one pass over the test split)."""
    input:
        unpack(model_and_dataset("participants", "volumes", "reference")),
        unpack(probe_inputs),
    output:
        nifti=f"{EXEMPLARS}/exemplars.nii.gz",
        table=f"{EXEMPLARS}/exemplars.tsv",
    params:
        code=code("exemplars"),  # the library modules it runs (brainfv.provenance)
        request=lambda wc: exemplars_request(wc),
        model=lambda wc: model_param(wc.task),
        model_key=lambda wc: f"tasks.{wc.task}.model",
    wildcard_constraints:
        layer=r"[^/]+",
    log:
        f"{LOGS}/exemplars/{{task}}_{{layer}}.log",
    benchmark:
        f"{BENCH}/exemplars/{{task}}_{{layer}}.tsv"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=lambda wc, attempt: job_mem_mb(attempt, batch=8),
        runtime=lambda wc, attempt: 30 * attempt,
        gpu=config["compute"]["gpu"],
    conda:
        env("torch-gpu" if config["compute"]["gpu"] else "torch-cpu")
    script:
        "../scripts/exemplars.py"


rule attribute:
    """Attribution maps (captum) of a task's class logits, averaged over correctly classified test subjects."""
    input:
        unpack(model_and_dataset("participants", "volumes", "reference")),
    output:
        **{m: f"{ATTRIBUTION}/{m}.nii.gz" for m in config["attribution"]["methods"]},
        table=f"{ATTRIBUTION}/attribution.tsv",
    params:
        code=code("attribute"),  # the library modules it runs (brainfv.provenance)
        model=lambda wc: model_param(wc.task),
        model_key=lambda wc: f"tasks.{wc.task}.model",
        methods=config["attribution"]["methods"],
        n_steps=config["attribution"]["n_steps"],
        max_per_class=config["attribution"]["max_per_class"],
        device=config["featviz"]["device"],
    log:
        f"{LOGS}/attribute/{{task}}.log",
    benchmark:
        f"{BENCH}/attribute/{{task}}.tsv"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=lambda wc, attempt: job_mem_mb(attempt, batch=32),
        runtime=lambda wc, attempt: 60 * attempt,
        gpu=config["compute"]["gpu"],
    conda:
        env("torch-gpu" if config["compute"]["gpu"] else "torch-cpu")
    script:
        "../scripts/attribute.py"
