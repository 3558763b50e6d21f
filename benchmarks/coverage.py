"""Coverage of the summary's 95 % intervals at the default study's numbers, per interval method.

    PYTHONPATH=src .venv/bin/python benchmarks/coverage.py

Simulates 2,000 studies per structure (replicates × units × seeds) and variance split (replicate, unit,
seed SDs), with normal and skewed (gamma) effects, and prints the share of intervals that cover the true
mean (brainfv.report.stats.simulate_coverage). The last rows score the interval of the smallest of three
equal, correlated gains (the intersection–union statistic, brainfv.report.stats.joint_gains).
"""
from brainfv.report.stats import simulate_coverage

STRUCTURES = {
    "class logit, 1 unit x 4 seeds (before)": (1, 1, 4),
    "class logit, 1 unit x 16 seeds (default)": (1, 1, 16),
    "block2 neurons, 8 units x 2 seeds": (1, 8, 2),
    "block4 channels, 4 units x 2 seeds": (1, 4, 2),
    "class logit, 2 replicates x 16 seeds": (2, 1, 16),
    "class logit, 5 replicates x 16 seeds (paper)": (5, 1, 16),
}
SPLITS = {"seed-dominated": (0.3, 0.3, 1.0), "unit-dominated": (0.3, 1.0, 0.3), "replicate-dominated": (1.0, 0.5, 0.5)}


def main():
    print(f"{'structure':46} {'variance':20} {'dist':7} {'t':>6} {'boot':>6} {'BCa':>6}")
    for name, n in STRUCTURES.items():
        for split, sd in SPLITS.items():
            for dist in ("normal", "skewed"):
                c = simulate_coverage(*n, sd=sd, dist=dist, n_studies=2000, n_boot=999)
                print(f"{name:46} {split:20} {dist:7} {c['t']:6.3f} {c['bootstrap']:6.3f} {c['bca']:6.3f}")
    for name, n in STRUCTURES.items():
        c = simulate_coverage(*n, methods=("t", "bootstrap"), controls=3, n_studies=2000, n_boot=999)
        print(f"min of 3 gains: {name:30} {'equal, correlated':20} {'normal':7} {c['t']:6.3f} {c['bootstrap']:6.3f}")


if __name__ == "__main__":
    main()
