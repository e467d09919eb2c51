#!/usr/bin/env python
"""Benchmark: convert a randomly initialised full ViT-B MAE checkpoint (USF-MAE's architecture).

Prints wall time and peak resident memory of the conversion (with verification), the latter as a
ratio to the checkpoint's file size, plus the same for a process that only imports the libraries,
so the conversion's own share is visible. Targets (issue 2): <= 10 s, peak RSS <= 2.5x file size.

    python benchmarks/bench_convert.py [--no-verify] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Peak RSS is VmHWM of the child's own address space: ru_maxrss would carry over the parent's
# peak through fork + exec on Linux.
CHILD = """
import json, re, sys, time
start = time.perf_counter()
from usfmae_hf.model.conversion import convert_checkpoint
imported = time.perf_counter()
if sys.argv[1] != "imports-only":
    convert_checkpoint(sys.argv[1], sys.argv[2], verify=sys.argv[3] == "1")
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "convert_s": done - imported,
                  "peak_rss_bytes": int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024}))
"""


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-verify", action="store_true", help="measure conversion without the reference check")
    parser.add_argument(
        "--repeats", type=int, default=2, help="conversions to time; the fastest is reported (default: 2)"
    )
    args = parser.parse_args()

    import torch

    from usfmae_hf.model.reference_mae import ReferenceMAE

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "usfmae_vit_base.pth"
        torch.manual_seed(0)
        torch.save(ReferenceMAE().state_dict(), checkpoint)
        size = checkpoint.stat().st_size
        baseline = run_child("imports-only", "", "0")
        runs = [
            run_child(str(checkpoint), str(Path(tmp) / f"out{i}"), "0" if args.no_verify else "1")
            for i in range(args.repeats)
        ]
    best = min(runs, key=lambda r: r["convert_s"])
    peak = max(r["peak_rss_bytes"] for r in runs)
    print(f"checkpoint: ViT-B MAE, {size / 2**20:.0f} MiB, verify={'off' if args.no_verify else 'on'}")
    print(f"conversion time (best of {args.repeats}): {best['convert_s']:.2f} s   [target <= 10 s]")
    print(f"peak RSS: {peak / 2**20:.0f} MiB = {peak / size:.2f}x file size   [target <= 2.5x]")
    print(
        f"  of which imports alone: {baseline['peak_rss_bytes'] / 2**20:.0f} MiB; "
        f"conversion's own: {(peak - baseline['peak_rss_bytes']) / size:.2f}x file size"
    )


if __name__ == "__main__":
    main()
