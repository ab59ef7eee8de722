"""Does a fresh server build its models once, however many requests arrive first? Peak RSS of a real
`devise serve` process answering its first text queries: one query alone, then (in a fresh server) N at once.

Each server is a subprocess on 127.0.0.1 (an ephemeral port) over one index of real photos (built once,
in the default MiniLM label space, whose sentence model a server builds on its first text query). Once
it answers /api/info its peak RSS is reset (/proc/PID/clear_refs, "5"), the queries are sent (N threads
released together by a barrier, each a different word) and VmHWM, the kernel's record of the highest
RSS since the reset, is read. Built once per request instead (no lock), the text model and its traced
and compiled forward cost ~220 MB each, so the peak grows with N (main at 5409ad1, 2 shared cores: one
query 749 MB, 30 at once 7283 MB, ratio 9.7; 40 s against 5 s).
Last line: RESULT {"one_query_peak_mb", "concurrent_peak_mb", "ratio", "status_counts", ...}
(goal: ratio <= 1.5, every answer a 200).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_memory import WORDS, build_photo_index, source_images, start_server  # noqa: E402


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def first_queries(index: Path, count: int, vocab: str) -> dict:
    """A fresh server, `count` concurrent first text queries: peak RSS above the idle server, statuses."""
    proc, url = start_server(index, 0, ["--vocab", vocab])
    try:
        idle_mb = status_kb(proc.pid, "VmRSS") / 1024
        with open(f"/proc/{proc.pid}/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        barrier = threading.Barrier(count)

        def query(i: int) -> int | str:
            with httpx.Client(base_url=url, timeout=600) as c:
                barrier.wait()
                try:
                    return c.get("/api/search", params={"q": WORDS[i % len(WORDS)], "k": 3}).status_code
                except httpx.HTTPError as exc:
                    return type(exc).__name__

        t0 = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            statuses = list(pool.map(query, range(count)))
        seconds = time.perf_counter() - t0
        peak_mb = status_kb(proc.pid, "VmHWM") / 1024
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except Exception:
            proc.kill()
    counts: dict[str, int] = {}
    for s in statuses:
        counts[str(s)] = counts.get(str(s), 0) + 1
    return {"idle_mb": round(idle_mb, 1), "peak_mb": round(peak_mb, 1), "seconds": round(seconds, 2),
            "status_counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrent", type=int, default=30)
    parser.add_argument("--index", default=None, help="an index folder (default: one built from real photos)")
    parser.add_argument("--vocab", default="imagenet1k")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="devise-serve-first-"))
    try:
        index = Path(args.index) if args.index else build_photo_index(source_images(), scratch)
        one = first_queries(index, 1, args.vocab)
        print(f"one query: {one}", file=sys.stderr, flush=True)
        many = first_queries(index, args.concurrent, args.vocab)
        print(f"{args.concurrent} queries: {many}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("RESULT " + json.dumps({
        "one_query_peak_mb": one["peak_mb"], "concurrent_peak_mb": many["peak_mb"],
        "ratio": round(many["peak_mb"] / one["peak_mb"], 3), "concurrent": args.concurrent,
        "idle_mb": [one["idle_mb"], many["idle_mb"]], "seconds": [one["seconds"], many["seconds"]],
        "status_counts": many["status_counts"], "one_query_status": one["status_counts"]}), flush=True)


if __name__ == "__main__":
    main()
