# The workflow lives in workflow/Snakefile (Snakemake Workflow Catalog layout); this makes
# `snakemake` work from the repository root. Snakemake restores the default target after an
# `include:`, so the root needs its own default rule pointing at `all`.
include: "workflow/Snakefile"


localrules:
    study,


rule study:
    input:
        rules.all.input,
    default_target: True
