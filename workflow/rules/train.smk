"""Training stage: per task, the visualised model (main), its independently trained replicates (rep{r},
training.replicates) and an independent model of another architecture (transfer)."""


rule describe_model:
    """A model the user gives (tasks.<task>.model): loaded, checked against the cohort grid, described."""
    input:
        model=lambda wc: model_file(wc.task),
        participants=lambda wc: dataset_file(task_dataset(wc.task), "participants"),
        reference=lambda wc: dataset_file(task_dataset(wc.task), "reference"),
    output:
        info=f"{R}/models/{{task}}/provided/model.json",
        units=report(f"{R}/models/{{task}}/provided/units.tsv", caption="../report/model_units.rst",
                     category="2. Models", subcategory="{task}"),
    params:
        code=code("describe_model"),  # the library modules it runs (brainfv.provenance)
        content=lambda wc: model_content(wc.task),  # the model file's content, not only its time
        task=lambda wc: wc.task,
        target=lambda wc: config["tasks"][wc.task]["target"],
        model=lambda wc: model_param(wc.task),
        model_key=lambda wc: f"tasks.{wc.task}.model",
    log:
        f"{LOGS}/describe_model/{{task}}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: job_mem_mb(attempt, batch=4),
        runtime=lambda wc, attempt: 20 * attempt,
    conda:
        env("torch-gpu" if config["compute"]["gpu"] else "torch-cpu")
    script:
        "../scripts/describe_model.py"


rule train_model:
    input:
        unpack(lambda wc: dataset_files(wc.task, "volumes", "participants", "reference", "manifest")),
    output:
        model=model_file("{task}", "{role}"),
        metrics=model_file("{task}", "{role}", "metrics.json"),
        predictions=model_file("{task}", "{role}", "predictions.tsv"),
        history=model_file("{task}", "{role}", "history.tsv"),
        curve=report(model_file("{task}", "{role}", "learning_curve.png"), caption="../report/learning_curve.rst",
                     category="2. Models", subcategory="{task}", labels={"task": "{task}", "model": "{role}"}),
    params:
        code=code("train_model"),  # the library modules it runs (brainfv.provenance)
        spec=lambda wc: model_spec(wc.task, wc.role),
        checkpoint_dir=lambda wc: f"{CHECKPOINTS}/{wc.task}/{wc.role}",
    wildcard_constraints:
        role=r"main|transfer|rep[1-9][0-9]*",
        task="|".join(trained_tasks()) or "(?!)",
    log:
        f"{LOGS}/train_model/{{task}}_{{role}}.log",
    benchmark:
        f"{BENCH}/train_model/{{task}}_{{role}}.tsv"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=lambda wc, attempt: job_mem_mb(attempt, batch=config["training"]["batch_size"] * 6),
        runtime=lambda wc, attempt: 120 * attempt,
        gpu=config["compute"]["gpu"],
    retries: 1
    conda:
        env("torch-gpu" if config["compute"]["gpu"] else "torch-cpu")
    script:
        "../scripts/train_model.py"


rule construct_model:
    """A positive-control network (tasks.<task>.positive_control): the study's architecture with weights set so
    that its preferred input is known (brainfv.models.positive); no training."""
    input:
        unpack(positive_control_inputs),
    output:
        model=model_file("{task}", "main"),
        info=model_file("{task}", "main", "metrics.json"),
        known=model_file("{task}", "main", KNOWN_FILE),  # its known optimum per class logit (known_corr)
    params:
        code=code("construct_model"),  # the library modules it runs (brainfv.provenance)
        task=lambda wc: wc.task,
        target=lambda wc: config["tasks"][wc.task]["target"],
        arch=lambda wc: bfv_config.task_arch(config, wc.task),
    wildcard_constraints:
        task="|".join(constructed_tasks()) or "(?!)",
    log:
        f"{LOGS}/construct_model/{{task}}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: job_mem_mb(attempt),
        runtime=lambda wc, attempt: 10 * attempt,
    conda:
        env("torch-cpu")
    script:
        "../scripts/construct_model.py"
