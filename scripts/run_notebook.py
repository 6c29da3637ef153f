"""Execute reproduce_all.ipynb on a results folder and save it, outputs included, beside the reports.

    python scripts/run_notebook.py [RESULTS]      (default: results)

Writes RESULTS/_reports/reproduce_all.ipynb; the notebook itself writes the tables, the inventory,
the audit reports and the plots to RESULTS/_reports/. Trains nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    results = Path(argv[0] if argv else "results").resolve()
    if not results.is_dir():
        print(
            f"run_notebook: no results folder {results}; train some runs first (creditaudit audit)",
            file=sys.stderr,
        )
        return 2
    os.environ["CREDITAUDIT_RESULTS"] = str(results)
    os.environ.setdefault("MPLBACKEND", "Agg")
    # The kernel is this interpreter (the project's virtualenv), wherever PATH points.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    nb = nbformat.read(ROOT / "reproduce_all.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    out = results / "_reports" / "reproduce_all.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    print(f"executed notebook: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
