"""Comparison metrics, tables and figures of the study."""
