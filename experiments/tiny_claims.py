"""Both papers' claims on the tiny worlds, from one command (issue 10's budget: <= 60 min on 2 cores).

    python experiments/tiny_claims.py            # SOAR (5 seeds) then SIP (Figure 8, K = 2 / 4 / 8)
    python experiments/tiny_claims.py --only sip

Runs ``experiments/soar_tiny_comparison.py`` with its defaults (docs/soar_comparison.json / .png) and
``experiments/sip_crossover.py --quick`` (docs/sip_crossover.json, docs/sip_selection.png), one
after the other so that each has both cores, and writes their wall times to ``docs/tiny_claims.json``.
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
    p.add_argument("--out", default="docs/tiny_claims.json")
    args = p.parse_args()
    extra = {"soar": shlex.split(args.soar_args), "sip": shlex.split(args.sip_args)}
    record = {"command": " ".join(sys.argv), "parts": {}}
    t0 = time.time()
    for part in args.only:
        cmd = [sys.executable, *PARTS[part], *extra[part]]
        print("+", " ".join(cmd), flush=True)
        start = time.time()
        subprocess.run(cmd, cwd=REPO, check=True)
        record["parts"][part] = {"command": " ".join(cmd[1:]), "wall_s": round(time.time() - start, 1)}
    record["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
