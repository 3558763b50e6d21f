"""Training stage: one CNN per task and replicate (seed)."""


rule train_model:
    input:
        volumes=lambda wc: f"{task_dataset_dir(wc.task)}/volumes.npy",
        participants=lambda wc: f"{task_dataset_dir(wc.task)}/participants.tsv",
    output:
        model=f"{R}/models/{{task}}/rep-{{rep}}/model.pt",
        metrics=f"{R}/models/{{task}}/rep-{{rep}}/metrics.json",
        predictions=f"{R}/models/{{task}}/rep-{{rep}}/predictions.tsv",
        history=f"{R}/models/{{task}}/rep-{{rep}}/history.tsv",
        curve=report(f"{R}/models/{{task}}/rep-{{rep}}/learning_curve.png",
                     caption="../report/learning_curve.rst", category="2. Models",
                     subcategory="{task}", labels={"task": "{task}", "replicate": "{rep}"}),
    params:
        task=lambda wc: wc.task,
        target=lambda wc: config["tasks"][wc.task]["target"],
        dataset_dir=lambda wc: task_dataset_dir(wc.task),
        arch=config["model"],
        training=lambda wc: task_training(wc.task),
        seed=config["seed"],
        checkpoint_dir=lambda wc: f"{R}/.checkpoints/{wc.task}/rep-{wc.rep}",
    wildcard_constraints:
        rep=r"\d+",
    log:
        f"{R}/logs/train_model/{{task}}_rep-{{rep}}.log",
    benchmark:
        f"{R}/benchmarks/train_model/{{task}}_rep-{{rep}}.tsv"
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
