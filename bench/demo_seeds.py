"""SaHa batches against random batches over training seeds, on the demo's clusters and eval set.

  python bench/demo_seeds.py [--workdir g2e_demo_seeds] [--seeds 0,1,2] [--config.X=... ...]

Runs the demo's `prepare_demo` and `mine` once, in <workdir>/base. Then, for each seed s, a
copy <workdir>/seed_<s> runs `train`, `train_random`, `eval` and `eval_random` with
--config.seed=s (the seed of the adapters' init and of the batches' order; the mini-MMEB, the
generator and the clusters stay those of the base). Other --config flags go to every run.

Prints, per seed, the overall score of both rows and their paired difference with its 95%
interval (the same resampled queries for both, as report.json's `paired`); then the mean and
standard deviation over the seeds, whether every seed's difference is above zero (the README
claims SaHa beats random batches only then) and whether every seed's interval is. A finished
stage is not run again, so an interrupted bench resumes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np

from g2e import layout
from g2e.evaluation import report

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE_STAGES = "prepare_demo,mine"
SEED_STAGES = "prepare_demo,train,train_random,eval,eval_random"


def run_stages(workdir: pathlib.Path, stages: str, flags: list[str]) -> None:
    """`python -m g2e.main` on the demo config for `stages` in `workdir`; fails loudly."""
    command = [
        sys.executable,
        "-m",
        "g2e.main",
        f"--config={REPO}/configs/demo.py",
        f"--config.workdir={workdir}",
        f"--config.stages={stages}",
        *flags,
    ]
    print(f"$ {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def seed_row(workdir: pathlib.Path) -> dict[str, float]:
    """One seed's overall scores and their paired difference (SaHa - random, in points)."""
    saha = json.loads(layout.results_file(workdir, layout.EVAL).read_text())
    random = json.loads(layout.results_file(workdir, layout.EVAL_RANDOM).read_text())
    diff, (low, high) = report.paired_difference(saha, random, "overall")
    return {
        "saha": saha["overall"],
        "random": random["overall"],
        "diff": diff,
        "low": low,
        "high": high,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="g2e_demo_seeds")
    parser.add_argument("--seeds", default="0,1,2")
    args, flags = parser.parse_known_args(argv)
    root = pathlib.Path(args.workdir).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    run_stages(root / "base", BASE_STAGES, flags)
    rows = {}
    for seed in seeds:
        workdir = root / f"seed_{seed}"
        if not workdir.exists():
            shutil.copytree(root / "base", workdir)
        run_stages(workdir, SEED_STAGES, [*flags, f"--config.seed={seed}"])
        rows[seed] = seed_row(workdir)

    print("\nseed | SaHa overall | random overall | SaHa - random (95% paired interval)")
    for seed, row in rows.items():
        print(
            f"{seed:4d} | {row['saha']:12.2f} | {row['random']:14.2f} | "
            f"{row['diff']:+.2f} ({row['low']:+.2f} to {row['high']:+.2f})"
        )
    for key in ("saha", "random", "diff"):
        values = np.array([row[key] for row in rows.values()])
        print(f"{key}: mean {values.mean():.2f} +- sd {values.std(ddof=1):.2f} over {len(values)}")
    agree = all(row["diff"] > 0 for row in rows.values())
    surely = all(row["low"] > 0 for row in rows.values())
    print(
        f"every seed's difference above zero: {agree}; every seed's interval above zero: {surely}"
    )
    summary = {"seeds": rows, "every_seed_above_zero": agree, "every_interval_above_zero": surely}
    (root / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
