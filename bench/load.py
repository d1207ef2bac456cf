"""Load test of POST /verify through HTTP on loopback: pairs/s, p50 and p99 per concurrency.

Starts `idverify serve` itself on 127.0.0.1 (a free port) against a fresh database: SQLite in a
temporary folder, or a new PostgreSQL database on `--pg` (created, migrated, dropped at the end),
with a bootstrap admin key as the client's key. Then, for each concurrency C in `--concurrency`,
C client threads (one keep-alive connection each, requests prepared once) post the same pair
for `--seconds`, after `--warmup` seconds untimed. Every run is bounded in time and only talks
to 127.0.0.1.

Pairs: the chip (models.eval.chipsim, 102x126 JPEG2000, from one LFW image as bench/latency.py
makes it) with a live photo: `lfw` (the 250x250 LFW JPEG) or `frame` (640x480 JPEG).

Reference (`--reference face_recognition`, the default when that library is importable;
`--reference none` skips it): after the HTTP levels, the face_recognition library is timed in
this process on the same chip and live bytes (bench/reference.py), and the table gives the
ratio of its p50 to the 1-client /verify p50.

Server settings come from the environment (IDV_*), e.g. `IDV_ONNX_THREADS=1 IDV_WORKERS=2`;
`--env K=V` adds some for this run only. Peak RSS: VmHWM of every server process (the master
and each uvicorn worker) at the end. "Server CPU ms / pair": user + system CPU time of the server
processes over the measured seconds, divided by the pairs answered: what a pair costs whatever
else runs on the machine (a 2-core box serves at most 2000 / that pairs per second), the figure
to compare thread settings by on a shared machine.

    .venv/bin/python bench/load.py [--db sqlite|postgresql] [--live lfw|frame] [--concurrency 1,2,4,8,16]
                                   [--seconds 15] [--env IDV_WORKERS=2] [--root DIR] [--write-docs LABEL]
                                   [--reference face_recognition|none] [--reference-upsample 1,2]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import reference  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
PG_DEFAULT = os.environ.get("IDV_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(fields: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, (filename, data) in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def make_pair(live: str) -> tuple[bytes, str, str, bytes, bytes]:
    """(body, content type, description, chip bytes, live bytes) of one /verify request."""
    from latency import make_inputs, source_face

    from service.settings import Settings

    settings = Settings()
    img, data, desc = source_face(settings.data_dir)
    if not desc.startswith("LFW"):
        raise SystemExit(f"bench/load.py needs LFW under {settings.data_dir} (found {desc})")
    inputs = make_inputs(None, img, data, is_lfw=True)
    chip, live_bytes = inputs["chip"][0], inputs[live][0]
    body, ctype = multipart({"id_photo": ("chip.jp2", chip), "live_photo": (f"{live}.jpg", live_bytes)})
    return body, ctype, f"chip {inputs['chip'][2]} + {inputs[live][2]} ({desc})", chip, live_bytes


class Server:
    """`idverify serve` in a subprocess on a fresh database; stopped (and the database dropped)
    by `close()`."""

    def __init__(self, db: str, env: dict[str, str], pg: str = PG_DEFAULT, root: Path = ROOT):
        self.tmp = tempfile.TemporaryDirectory(prefix="idv-load-")
        self.port = free_port()
        self.key = secrets.token_hex(24)
        self.pg_admin, self.pg_name = None, None
        self.model_version = "unknown"
        if db == "sqlite":
            url = f"sqlite:///{self.tmp.name}/audit.db"
        else:
            from sqlalchemy import create_engine, text

            self.pg_admin = create_engine(pg, isolation_level="AUTOCOMMIT")
            self.pg_name = f"idv_load_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            with self.pg_admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{self.pg_name}"'))
            url = pg.rsplit("/", 1)[0] + "/" + self.pg_name
        self.env = {**os.environ, **env, "IDV_DATABASE_URL": url, "IDV_HOST": "127.0.0.1",
                    "IDV_PORT": str(self.port), "IDV_BOOTSTRAP_ADMIN_KEY": self.key,
                    "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cli = [sys.executable, "-m", "service.cli"]
        subprocess.run([*cli, "migrate"], env=self.env, cwd=root, check=True, capture_output=True, timeout=120)
        self.log = open(Path(self.tmp.name) / "server.log", "wb")
        self.proc = subprocess.Popen([*cli, "serve"], env=self.env, cwd=root, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/readyz")
                resp = c.getresponse()
                if resp.status == 200:
                    self.model_version = str(json.loads(resp.read()).get("model_version") or "unknown")
                    return
            except OSError:
                pass
            except (ValueError, AttributeError):   # an older checkout's /readyz (--root): no version
                return
            time.sleep(0.3)
        raise SystemExit(f"server not ready after {timeout:.0f} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return (Path(self.tmp.name) / "server.log").read_text(errors="replace")[-4000:]

    def pids(self) -> list[int]:
        """The server process and its children (uvicorn workers)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [self.proc.pid, *(int(p) for p in out.stdout.split())]

    def peak_rss_mb(self) -> dict[int, float]:
        rss = {}
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        rss[pid] = int(line.split()[1]) / 1024.0
            except OSError:
                pass
        return rss

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server processes so far (/proc/<pid>/stat)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        return total

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        if self.pg_admin is not None:
            from sqlalchemy import text

            with self.pg_admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)'))
            self.pg_admin.dispose()
        self.tmp.cleanup()


def run_level(server: "Server", body: bytes, ctype: str, clients: int, seconds: float,
              warmup: float) -> dict:
    """`clients` threads posting for warmup + seconds; latencies of those that started after warm-up."""
    port = server.port
    headers = {"X-API-Key": server.key, "Content-Type": ctype, "Content-Length": str(len(body))}
    cpu = {}
    t_start = time.monotonic()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    server_ms: list[list[float]] = [[] for _ in range(clients)]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            t0 = time.monotonic()
            if t0 >= t_end:
                break
            conn.request("POST", "/verify", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            t1 = time.monotonic()
            if t0 >= t_measure:
                if resp.status == 200:
                    lat[i].append((t1 - t0) * 1e3)
                    server_ms[i].append(json.loads(data)["timings_ms"].get("total", 0.0))
                else:
                    errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_measure - time.monotonic()))
    cpu["start"] = server.cpu_seconds()
    time.sleep(max(0.0, t_end - time.monotonic()))
    cpu["end"] = server.cpu_seconds()
    for t in threads:
        t.join(timeout=60)
    all_lat = np.asarray([x for xs in lat for x in xs])
    srv = np.asarray([x for xs in server_ms for x in xs])
    n = len(all_lat)
    return {"clients": clients, "n": n, "errors": sum(errors), "pairs_s": n / seconds,
            "p50": float(np.percentile(all_lat, 50)) if n else float("nan"),
            "p99": float(np.percentile(all_lat, 99)) if n else float("nan"),
            "server_p50": float(np.percentile(srv, 50)) if n else float("nan"),
            "cpu_ms": (cpu["end"] - cpu["start"]) * 1e3 / n if n else float("nan")}


def load_avg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def table(rows: list[dict]) -> str:
    lines = ["| clients | pairs/s | p50 (ms) | p99 (ms) | server total p50 (ms) | server CPU ms / pair | requests | errors |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['pairs_s']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['server_p50']:.1f} | {r['cpu_ms']:.1f} | {r['n']} | {r['errors']} |")
    return "\n".join(lines)


def write_docs(label: str, block: str) -> None:
    start, end = f"<!-- bench/load.py {label}:start -->", f"<!-- bench/load.py {label}:end -->"
    text = DOC.read_text()
    section = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n### {label}\n\n{section}\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL server URL (a database on it is created)")
    ap.add_argument("--live", choices=("lfw", "frame"), default="lfw")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per concurrency")
    ap.add_argument("--warmup", type=float, default=3.0, help="untimed seconds before each concurrency")
    ap.add_argument("--env", action="append", default=[], help="K=V server setting for this run (repeatable)")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="serve the code of another checkout (e.g. `git archive <rev>` unpacked: before/after)")
    ap.add_argument("--write-docs", metavar="LABEL", default=None, help=f"put the table in {DOC.name} under LABEL")
    ap.add_argument("--reference", choices=(reference.NAME, "none"),
                    default=reference.NAME if reference.available() else "none",
                    help="time this library on the same pair after the HTTP levels (default: when importable)")
    ap.add_argument("--reference-runs", type=int, default=20, help="timed reference pairs (after the warm-up)")
    ap.add_argument("--reference-warmup", type=int, default=2, help="untimed reference pairs first")
    ap.add_argument("--reference-upsample", default="1",
                    help="HOG upsample counts to time; 1 is the library default and the ratio's reference, "
                         "others are reported as labelled variants (e.g. 1,2)")
    args = ap.parse_args(argv)
    if args.reference != "none" and not reference.available():
        raise SystemExit(f"--reference {args.reference}: not importable here (see the Makefile's test setup)")
    upsamples = [1, *(u for u in dict.fromkeys(int(x) for x in args.reference_upsample.split(",")) if u != 1)]
    env = dict(kv.split("=", 1) for kv in args.env)
    levels = [int(c) for c in args.concurrency.split(",")]

    body, ctype, desc, chip, live_bytes = make_pair(args.live)
    before = load_avg()
    server = Server(args.db, env, args.pg, args.root)
    try:
        rows = []
        for c in levels:
            r = run_level(server, body, ctype, c, args.seconds, args.warmup)
            rows.append(r)
            print(f"clients {c:2d}: {r['pairs_s']:6.1f} pairs/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms  "
                  f"(server p50 {r['server_p50']:.1f} ms, CPU {r['cpu_ms']:.1f} ms/pair, {r['n']} requests, "
                  f"{r['errors']} errors)", flush=True)
        rss = server.peak_rss_mb()
    finally:
        server.close()
    after = load_avg()
    ours = next((r for r in rows if r["clients"] == 1), None)
    refs = []
    if args.reference != "none":   # after the server is gone: nothing else of this run competes
        for u in upsamples:
            refs.append(reference.time_pairs(chip, live_bytes, args.reference_runs, args.reference_warmup, u))
        print("\n" + reference.table(refs, ours), flush=True)
    settings_env = {k: v for k, v in {**os.environ, **env}.items() if k.startswith("IDV_") and k not in
                    ("IDV_DATABASE_URL", "IDV_BOOTSTRAP_ADMIN_KEY", "IDV_HOST", "IDV_PORT")}
    cmd = " ".join([*(f"{k}={v}" for k, v in sorted(settings_env.items())), "python", "bench/load.py",
                    *(a for a in (argv if argv is not None else sys.argv[1:]))])
    from latency import cpu_model, git_commit

    rss_txt = ", ".join(f"{v:.0f} MB" for v in rss.values())
    block = "\n".join([
        f"Command: `{cmd}`",
        "",
        f"Machine: {os.cpu_count()} CPUs, {cpu_model()}; load average (1/5/15 min) {before} before, {after} after; "
        f"commit {git_commit() if args.root == ROOT else f'of {args.root}'}; database {args.db}; "
        f"client threads in the same machine (loopback)",
        "",
        f"Pair: {desc}; served model {server.model_version}; "
        f"peak RSS per server process (VmHWM; master first, then workers): {rss_txt}",
        "",
        table(rows),
    ])
    if refs:
        block += "\n\n" + reference.describe(args.reference_runs, args.reference_warmup) + "\n\n" + \
            reference.table(refs, ours)
    print("\n" + block)
    if args.write_docs:
        write_docs(args.write_docs, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
