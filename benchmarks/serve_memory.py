"""Does the server's memory stay flat under load? RSS of a real `devise serve` process before and after
a long run of mixed requests.

Starts `devise serve` (a subprocess, so the RSS is the server's alone) on 127.0.0.1 on an ephemeral port
over an index of real photos (foolbox's 20 ImageNet photos and skimage's chelsea/coffee/astronaut, unless
--index is given), warms it up, reads its RSS, sends --requests requests from --clients threads (a bounded
loop: predict and search mixed, every upload a different real image crop, k and query words varying, a
few bad uploads and unknown words among them), reads its RSS again and stops it.
Last line: RESULT {"rss_warm_mb": .., "rss_end_mb": .., "growth": ..} with growth = end / warm - 1
(goal: under 0.10), plus the highest RSS sampled every --sample requests (peak_growth: a server that
reloads something big per request swings up and down with the garbage collector) and the request rate.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

# Ordinary nouns (GloVe has them all) and a few words it has no vector for (those answer 400).
WORDS = ("cat dog bird fish car truck boat plane train bicycle house tree flower fruit apple orange banana "
         "coffee tea cup bottle glass chair table bed lamp clock phone computer keyboard book pen paper "
         "ball game guitar piano drum violin horse cow sheep pig chicken duck goose owl eagle snake lizard "
         "turtle frog spider insect bee butterfly shark whale dolphin seal bear wolf fox lion tiger leopard "
         "monkey elephant giraffe zebra camel rabbit mouse rat squirrel mountain river lake sea beach sky "
         "cloud rain snow sun moon star fire water stone rock sand grass leaf forest garden road bridge "
         "city street building church tower castle door window wall roof kitchen bread cheese cake pizza "
         "soup meat egg milk wine beer shoe hat shirt dress coat bag umbrella ring watch knife fork spoon "
         "plate bowl pot pan oven stove fridge television radio camera lens mirror brush soap towel").split()
PHRASES = ("water buffalo", "musical instrument", "sports car", "coffee mug", "tiger cat", "golden retriever")
UNKNOWN = ("qzxvbnmw", "blorptangle", "xxyzzq")


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MB (from /proc: no psutil needed)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def source_images() -> list[np.ndarray]:
    """Real photos as RGB arrays."""
    import skimage.data

    from devise.assets import foolbox_data_dir

    images = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()]
    images += [np.asarray(Image.open(p).convert("RGB")) for p in sorted(foolbox_data_dir().glob("imagenet_*.jpg"))]
    return images


def build_photo_index(images: list[np.ndarray], scratch: Path) -> Path:
    from devise.serving.search import build_index

    photos = scratch / "photos"
    photos.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(photos / f"photo_{i:02d}.jpg", quality=92)
    return build_index(photos, out=scratch / "photos.index", progress=False).folder


def upload_bytes(images: list[np.ndarray], rng: np.random.Generator) -> tuple[str, bytes]:
    """A different upload every time: a random crop of a real photo at a random size, JPEG or PNG."""
    image = images[rng.integers(len(images))]
    h, w = image.shape[:2]
    ch, cw = rng.integers(h // 3, h + 1), rng.integers(w // 3, w + 1)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(image[y:y + ch, x:x + cw])
    side = int(rng.integers(64, 900))
    crop = crop.resize((side, max(16, int(side * ch / cw))))
    buf = io.BytesIO()
    if rng.random() < 0.7:
        crop.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
        return "upload.jpg", buf.getvalue()
    crop.save(buf, "PNG")
    return "upload.png", buf.getvalue()


def one_request(c: httpx.Client, images, rng: np.random.Generator) -> int:
    kind = rng.random()
    k = int(rng.integers(1, 101))
    if kind < 0.45:
        name, data = upload_bytes(images, rng)
        return c.post("/api/predict", params={"k": k}, files={"image": (name, data)}).status_code
    if kind < 0.48:  # bad uploads: not an image, truncated
        data = b"not an image at all\n" * int(rng.integers(1, 50)) if rng.random() < 0.5 else \
            upload_bytes(images, rng)[1][:200]
        return c.post("/api/predict", params={"k": k}, files={"image": ("bad.jpg", data)}).status_code
    r = rng.random()
    q = UNKNOWN[rng.integers(len(UNKNOWN))] if r < 0.03 else PHRASES[rng.integers(len(PHRASES))] if r < 0.2 \
        else WORDS[rng.integers(len(WORDS))]
    response = c.get("/api/search", params={"q": q, "k": k})
    if response.status_code == 200 and response.json()["results"] and rng.random() < 0.2:
        c.get("/api/image", params={"path": response.json()["results"][0]["image"]})
    return response.status_code


def send(url: str, images, count: int, clients: int, seed: int, on_done=None, server=None) -> dict:
    """`count` requests over `clients` threads (a bounded loop each); status code counts. A transport
    error (an idle keep-alive connection closed by the server as the next request went out) is counted
    as "transport_error" and the request sent again once on a new connection, unless the server died."""
    counts: dict[int, int] = {}
    lock = threading.Lock()
    done = [0]

    def worker(w: int) -> None:
        rng = np.random.default_rng([seed, w])
        with httpx.Client(base_url=url, timeout=300) as c:
            for _ in range(count // clients + (w < count % clients)):
                state = rng.bit_generator.state
                try:
                    status = one_request(c, images, rng)
                except httpx.TransportError:
                    if server is not None and server.poll() is not None:
                        raise SystemExit(f"the server died (exit code {server.returncode})") from None
                    with lock:
                        counts["transport_error"] = counts.get("transport_error", 0) + 1
                    rng.bit_generator.state = state  # the same request again
                    status = one_request(c, images, rng)
                with lock:
                    counts[status] = counts.get(status, 0) + 1
                    done[0] += 1
                    if on_done:
                        on_done(done[0])

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return counts


def start_server(index: Path, port: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "devise.cli", "serve", "--index", str(index), "--host", "127.0.0.1",
               "--port", str(port), *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    deadline = time.monotonic() + 600
    for line in proc.stdout:  # "devise: serving on http://127.0.0.1:PORT/ ..."
        sys.stderr.write("server: " + line)
        m = re.search(r"serving on (http://[^/\s]+)/", line)
        if m:
            url = m.group(1)
            break
        if time.monotonic() > deadline:
            break
    if url is None:
        proc.kill()
        raise SystemExit(f"server did not start: {' '.join(command)}")
    # keep draining its output so a chatty server never blocks on a full pipe
    threading.Thread(target=lambda: [sys.stderr.write("server: " + line) for line in proc.stdout], daemon=True).start()
    if url.endswith(":0"):  # a server that does not report the port it bound: ask for an explicit one
        proc.kill()
        raise SystemExit("the server printed port 0; pass --port N")
    for _ in range(600):  # it printed its URL; wait until it answers
        try:
            if httpx.get(url + "/api/info", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server never answered")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sample", type=int, default=200, help="read the RSS every this many requests")
    parser.add_argument("--index", default=None, help="an index folder (default: one built from real photos)")
    parser.add_argument("--port", type=int, default=0, help="0: an ephemeral port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", default="imagenet1k",
                        help="the server's label space (default imagenet1k: 'wordnet' with MiniLM vectors first "
                             "encodes 79K labels, over 10 minutes on 2 CPU cores when not cached yet)")
    parser.add_argument("--server-arg", action="append", default=[], help="passed on to devise serve")
    args = parser.parse_args()

    images = source_images()
    scratch = Path(tempfile.mkdtemp(prefix="devise-serve-mem-"))
    try:
        index = Path(args.index) if args.index else build_photo_index(images, scratch)
        proc, url = start_server(index, args.port, ["--vocab", args.vocab, *args.server_arg])
        try:
            rss_start = rss_mb(proc.pid)
            warm_counts = send(url, images, args.warmup, args.clients, args.seed + 1, server=proc)
            rss_warm = rss_mb(proc.pid)
            samples = [(0, round(rss_warm, 1))]

            def on_done(n: int) -> None:
                if n % args.sample == 0:
                    samples.append((n, round(rss_mb(proc.pid), 1)))

            t0 = time.perf_counter()
            counts = send(url, images, args.requests, args.clients, args.seed, on_done, server=proc)
            seconds = time.perf_counter() - t0
            rss_end = rss_mb(proc.pid)
            rss_peak = max([rss_end] + [mb for _, mb in samples])
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"rss (MB) after n requests: {samples}", flush=True)
    print("RESULT " + json.dumps({
        "rss_start_mb": round(rss_start, 1), "rss_warm_mb": round(rss_warm, 1), "rss_end_mb": round(rss_end, 1),
        "growth": round(rss_end / rss_warm - 1, 4), "rss_peak_mb": round(rss_peak, 1),
        "peak_growth": round(rss_peak / rss_warm - 1, 4), "requests": args.requests, "clients": args.clients,
        "vocab": args.vocab,
        "requests_per_s": round(args.requests / seconds, 1), "status_counts": {str(k): v for k, v in sorted(counts.items(), key=str)},
        "warmup_status_counts": {str(k): v for k, v in sorted(warm_counts.items(), key=str)}}), flush=True)


if __name__ == "__main__":
    main()
