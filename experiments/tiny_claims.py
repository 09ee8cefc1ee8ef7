"""Both papers' claims on the tiny worlds, from one command (issue 10's budget: <= 60 min on 2 cores).

    python experiments/tiny_claims.py            # SOAR (10 seeds) beside SIP (Figure 8, K = 2 / 4 / 8)
    python experiments/tiny_claims.py --only sip

Runs ``experiments/soar_tiny_comparison.py`` with its defaults (docs/soar_comparison.json / .png) and
``experiments/sip_crossover.py --quick`` (docs/sip_crossover.json, docs/sip_selection.png) at the same
time: every training in both is a single-threaded process (SOAR two at a time, SIP one at a time),
so together they keep both cores busy until the end instead of leaving one idle through SIP's
one-at-a-time trainings. Each part's output goes to ``runs/tiny_claims_<part>.log``; the wall
times go to ``docs/tiny_claims.json``. ``--sequential`` runs the parts one after the other.
``--soar-args`` / ``--sip-args`` (quoted strings) pass extra arguments to one part.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = {
    "soar": ["experiments/soar_tiny_comparison.py"],
    "sip": ["experiments/sip_crossover.py", "--quick"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(PARTS), nargs="+", default=list(PARTS))
    p.add_argument("--soar-args", default="", help="extra arguments for soar_tiny_comparison.py")
    p.add_argument("--sip-args", default="", help="extra arguments for sip_crossover.py")
    p.add_argument("--sequential", action="store_true", help="one part after the other")
    p.add_argument("--out", default="docs/tiny_claims.json")
    args = p.parse_args()
    extra = {"soar": shlex.split(args.soar_args), "sip": shlex.split(args.sip_args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "sequential": args.sequential, "parts": {}}
    t0 = time.time()
    running = {}
    for part in args.only:
        cmd = [sys.executable, *PARTS[part], *extra[part]]
        log = REPO / "runs" / f"tiny_claims_{part}.log"
        log.parent.mkdir(exist_ok=True)
        print("+", " ".join(cmd), f"> {log}", flush=True)
        running[part] = (
            subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT),
            time.time(),
        )
        record["parts"][part] = {"command": " ".join(cmd[1:]), "log": str(log)}
        if args.sequential:
            wait(running, record)
    wait(running, record)
    record["wall_s"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


def wait(running: dict, record: dict) -> None:
    """Wait for the started parts; a failed part stops the others and raises."""
    while running:
        for part, (proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[part]
            record["parts"][part]["wall_s"] = round(time.time() - start, 1)
            print(f"{part} finished in {time.time() - start:.0f} s (rc {proc.returncode})", flush=True)
            if proc.returncode:
                for other, _ in running.values():
                    other.terminate()
                raise SystemExit(f"{part} failed (rc {proc.returncode}); see {record['parts'][part]['log']}")
        time.sleep(2)


if __name__ == "__main__":
    main()
