"""Data stage: the common grid, NIfTI input, the on-disk store, cohort sources and lesions."""
