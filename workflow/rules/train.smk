"""Training stage: per task, the visualised model (main) and an independent one (transfer)."""


rule train_model:
    input:
        unpack(lambda wc: dataset_files(wc.task, "volumes", "participants", "reference")),
    output:
        model=model_file("{task}", "{role}"),
        metrics=model_file("{task}", "{role}", "metrics.json"),
        predictions=model_file("{task}", "{role}", "predictions.tsv"),
        history=model_file("{task}", "{role}", "history.tsv"),
        curve=report(model_file("{task}", "{role}", "learning_curve.png"), caption="../report/learning_curve.rst",
                     category="2. Models", subcategory="{task}", labels={"task": "{task}", "model": "{role}"}),
    params:
        spec=lambda wc: model_spec(wc.task, wc.role),
        checkpoint_dir=lambda wc: f"{CHECKPOINTS}/{wc.task}/{wc.role}",
    wildcard_constraints:
        role="main|transfer",
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
