"""The workflow's adapters: one ``*_job`` per Snakemake rule, over :class:`~brainfv.jobs.base.Job`.

The top floor of the library: jobs read a rule's files and params, call the domain modules below and write
the rule's outputs. Nothing below this package imports it.
"""
