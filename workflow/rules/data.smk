"""Data stage: cohort preparation and artificial-lesion synthesis."""

COHORT = dataset_dir("cohort")
LESIONS = dataset_dir("lesions")


rule prepare_cohort:
    input:
        unpack(cohort_inputs),
    output:
        volumes=f"{COHORT}/volumes.npy",
        wm=f"{COHORT}/wm.npy",
        participants=f"{COHORT}/participants.tsv",
        qc=f"{COHORT}/qc.tsv",
        reference=f"{COHORT}/reference.nii.gz",
        mask=f"{COHORT}/mask.nii.gz",
        sex_effect=f"{COHORT}/sex_effect.nii.gz",
        figure=report(f"{COHORT}/qc.png", caption="../report/cohort_qc.rst", category="1. Data"),
    params:
        cfg=data_params("grid", "cohort"),
    log:
        f"{R}/logs/prepare_cohort.log",
    benchmark:
        f"{R}/benchmarks/prepare_cohort.tsv"
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 3000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        env("data")
    script:
        "../scripts/prepare_cohort.py"


rule synthesize_lesions:
    input:
        volumes=rules.prepare_cohort.output.volumes,
        wm=rules.prepare_cohort.output.wm,
        participants=rules.prepare_cohort.output.participants,
        reference=rules.prepare_cohort.output.reference,
        mask=rules.prepare_cohort.output.mask,
        sex_effect=rules.prepare_cohort.output.sex_effect,
    output:
        volumes=f"{LESIONS}/volumes.npy",
        masks=f"{LESIONS}/lesion_masks.npy",
        participants=f"{LESIONS}/participants.tsv",
        lesions=f"{LESIONS}/lesions.tsv",
        frequency=f"{LESIONS}/lesion_frequency.nii.gz",
        reference=f"{LESIONS}/reference.nii.gz",
        mask=f"{LESIONS}/mask.nii.gz",
        sex_effect=f"{LESIONS}/sex_effect.nii.gz",
        figure=report(f"{LESIONS}/examples.png", caption="../report/lesion_examples.rst", category="1. Data"),
    params:
        cfg=data_params("lesions"),
        cohort_dir=lambda wc, input: str(Path(input.volumes).parent),
    log:
        f"{R}/logs/synthesize_lesions.log",
    benchmark:
        f"{R}/benchmarks/synthesize_lesions.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        env("data")
    script:
        "../scripts/synthesize_lesions.py"
