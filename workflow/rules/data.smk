"""Data stage: cohort preparation and artificial-lesion synthesis."""


rule prepare_cohort:
    input:
        cohort_inputs,
    output:
        volumes=dataset_file("cohort", "volumes"),
        wm=dataset_file("cohort", "wm"),
        participants=dataset_file("cohort", "participants"),
        qc=dataset_file("cohort", "qc"),
        reference=dataset_file("cohort", "reference"),
        mask=dataset_file("cohort", "mask"),
        sex_effect=dataset_file("cohort", "sex_effect"),
        sex_effect_regional=dataset_file("cohort", "sex_effect_regional"),
        manifest=dataset_file("cohort", "manifest"),
        figure=report(dataset_file("cohort", "qc_figure"), caption="../report/cohort_qc.rst",
                      category="1. Data"),
    params:
        code=code("prepare_cohort"),  # the library modules it runs (brainfv.provenance)
        cfg=data_params("grid", "cohort"),
        content=cohort_content,  # the input files' content (brainfv.data.sources.inputs_digest)
    log:
        f"{LOGS}/prepare_cohort.log",
    benchmark:
        f"{BENCH}/prepare_cohort.tsv"
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
        **{k: v for k, v in rules.prepare_cohort.output.items() if k not in ("figure", "qc", "manifest")},
    output:
        volumes=dataset_file("lesions", "volumes"),
        masks=dataset_file("lesions", "lesion_masks"),
        participants=dataset_file("lesions", "participants"),
        lesions=dataset_file("lesions", "lesions"),
        frequency=dataset_file("lesions", "lesion_frequency"),
        reference=dataset_file("lesions", "reference"),
        mask=dataset_file("lesions", "mask"),
        sex_effect=dataset_file("lesions", "sex_effect"),
        sex_effect_regional=dataset_file("lesions", "sex_effect_regional"),
        manifest=dataset_file("lesions", "manifest"),
        figure=report(dataset_file("lesions", "lesion_examples"), caption="../report/lesion_examples.rst",
                      category="1. Data"),
    params:
        code=code("synthesize_lesions"),  # the library modules it runs (brainfv.provenance)
        cfg=data_params("lesions"),
    log:
        f"{LOGS}/synthesize_lesions.log",
    benchmark:
        f"{BENCH}/synthesize_lesions.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        env("data")
    script:
        "../scripts/synthesize_lesions.py"
