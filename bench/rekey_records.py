"""Re-key the committed table records (``bench/results/records/``) after a change of the record key.

A table process keeps the key function it started with, so records it writes after the key changed carry the old
key. A record is re-keyed only when its config digest is the old-style digest (the whole parsed config) of the
current config or of a version in the config's git history, *and* that version equals the current config in every
value the run reads (:func:`semisup_demo.config_digest` with its method): the run is then the same run. Anything else
is reported as stale and left alone (the table script will make it again).

    python bench/rekey_records.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from semisup_demo import RESULTS, config_digest

REPO = Path(__file__).resolve().parents[1]


def _versions(name: str) -> list[str]:
    """The config's current text, then every committed version, newest first."""
    path = f"configs/finetune/{name}"
    revs = subprocess.run(["git", "rev-list", "HEAD", "--", path], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.split()
    texts = [(REPO / path).read_text()]
    for rev in revs:
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode == 0:
            texts.append(shown.stdout)
    return texts


def main() -> int:
    versions: dict[str, list[str]] = {}
    for record in sorted((RESULTS / "records").rglob("*.json")):
        data = json.loads(record.read_text())
        args = data["args"]
        method = [o.split("=", 1)[1] for o in args["overrides"] if o.startswith("method=")][-1]
        texts = versions.setdefault(args["config"], _versions(args["config"]))
        current = config_digest(texts[0], method)
        if args.get("config_content_sha256") == current:
            continue
        same = [t for t in texts if config_digest(t) == args.get("config_content_sha256")]
        if same and config_digest(same[0], method) == current:
            args["config_content_sha256"] = current
            record.write_text(json.dumps(data, indent=1) + "\n")
            print(f"re-keyed {record.relative_to(REPO)}")
        else:
            print(f"stale {record.relative_to(REPO)} (made from other config values: it will be run again)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
