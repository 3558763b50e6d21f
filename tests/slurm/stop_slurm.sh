#!/usr/bin/env bash
# Stop the single-node SLURM started by start_slurm.sh.
pkill -x slurmd 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
pkill -x munged 2>/dev/null || true
exit 0
