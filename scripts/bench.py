#!/usr/bin/env python3
"""Runs every benchmark of ratethrottle and prints one table.

Started by scripts/bench.sh (which provides Redis, Redis Cluster and Envoy through the
environment, like the test command). Rows:
  1. cargo bench (criterion): decisions/s per algorithm, one hot key and 1M distinct keys.
  2. gRPC ShouldRateLimit with h2load: an OK-only tonic server (the ceiling), ratethrottle on
     memory, Redis and Redis Cluster. The grpc-status of a probe is checked first (h2load
     counts HTTP 200s even when gRPC fails) and decisions are counted from the server's own
     metrics.
  3. HTTP through Envoy with wrk: Envoy alone, Envoy + ratethrottle, Envoy + the OK-only
     service (the ceiling for the filter's own cost).
  4. gRPC Check over the limit (every answer a 429, so the violation ring feeds
     `violation_rate` alerts every second) with alerts off, and with alerts to a sink that
     never answers plus one that answers 500: what a dead sink costs the request path.
  5. gRPC ShouldRateLimit (memory) with OpenTelemetry tracing off and on at 1 % sampling,
     exporting to a real OTLP receiver (tests/support/otlp_collector.py, when the test
     command installed it; else to a closed port, spans dropped): runs interleaved
     off/on/off/on..., the ratio of the medians is the cost of tracing.
  6. The anomaly module off vs on (ShouldRateLimit and Check, memory), `adaptive` on a rule
     vs off (ShouldRateLimit, memory and Redis): interleaved like 5, BENCH_ROUNDS runs each.
  7. Memory per tracked key of the in-memory store, per algorithm at 1M and 5M keys
     (benches/memory.rs: RSS growth / keys, each case in a fresh process); its own table.
  8. The gRPC port's runtime layout: tokio's shared pool vs one single-threaded runtime per
     core (`--grpc-threads`), interleaved like 5 (memory at 16x32 and 4x8, Check, Redis).
  9. ratethrottle vs Kuadrant Limitador (bench/limitador: its RLS server ported over the
     `limitador` crate), ShouldRateLimit in the same h2load runs, interleaved: memory at 4x8 and
     16x32, Redis vs Limitador's redis_cached and redis at 16x32, with ratios per round.
 10. ShouldRateLimit vs Check on memory at 16x32, interleaved like 5: the paired ratio of CPU
     per call.
`BENCH_ONLY=redis|anomaly|adaptive|tracing|memory|runtime|limitador|check` runs only those rows.
CPU seconds per request = CPU time the server processes (sidecar, Redis, Envoy) used during
the run / requests.
"""
import http.server, os, re, shutil, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# RATETHROTTLE_BENCH_BIN: another build of the sidecar (e.g. a before/after comparison).
BIN = os.environ.get("RATETHROTTLE_BENCH_BIN") or os.path.join(ROOT, "target/release/ratethrottle")
OK_RLS = os.path.join(ROOT, "target/release/examples/ok_rls")
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
TICK = os.sysconf("SC_CLK_TCK")
ROWS = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def redis_pids():
    out = subprocess.run(["pgrep", "-f", "redis-server"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def metric(admin, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def grpc_body(domain, descriptors):
    """A gRPC-framed RateLimitRequest: descriptors, each a list of (key, value) entries."""
    def varint(n):
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            if n:
                out += bytes([b | 0x80])
            else:
                return out + bytes([b])

    def field(num, payload):
        return varint((num << 3) | 2) + varint(len(payload)) + payload

    req = field(1, domain.encode())
    for entries in descriptors:
        req += field(2, b"".join(field(1, field(1, k.encode()) + field(2, v.encode())) for k, v in entries))
    return b"\x00" + len(req).to_bytes(4, "big") + req


def percentiles(latencies_us):
    if not latencies_us:
        return 0, 0
    latencies_us.sort()
    p = lambda q: latencies_us[min(len(latencies_us) - 1, int(len(latencies_us) * q))] / 1000
    return p(0.5), p(0.99)


RLS_PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"


def h2load(port, body_path, log_path, streams=32, conns=16, path=RLS_PATH, requests=None):
    timing = ["-n", str(requests)] if requests else ["-D", str(SECONDS)]
    if os.path.exists(log_path):
        os.remove(log_path)
    cmd = ["h2load", *timing, "-c", str(conns), "-m", str(streams), "-t", "1",
           "-d", body_path, "-H", "content-type: application/grpc", "-H", "te: trailers",
           f"--log-file={log_path}", f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    lat = []
    with open(log_path) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] == "200":
                lat.append(int(parts[2]))
    return float(m.group(1)) if m else 0.0, int(done.group(2)) if done else 0, lat


def start(cmd, port):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()


def settings(tmp, storage, extra="", rule=""):
    """`rule` is appended inside the bench domain's `identity` rate_limit (e.g. adaptive)."""
    path = os.path.join(tmp, f"bench-{abs(hash(storage + extra + rule))}.yaml")
    with open(path, "w") as f:
        f.write(extra)
        f.write(
            "settings:\n"
            f"  storage: \"{storage}\"\n"
            "  redis: {timeout: 1s, prefix: \"bench:\"}\n"
            "domains:\n"
            "  - domain: bench\n    descriptors:\n"
            "      - key: api_key\n        rate_limit: {unit: hour, requests_per_unit: 1000000000}\n"
            f"      - key: identity\n        rate_limit: {{unit: hour, requests_per_unit: 1000000000{rule}}}\n"
            "  - domain: example\n    descriptors:\n"
            "      - key: api_key\n        rate_limit: {unit: hour, requests_per_unit: 1000000000}\n"
            "      - key: remote_address\n        rate_limit: {unit: hour, requests_per_unit: 1000000000}\n"
            "      - key: identity\n        rate_limit: {unit: hour, requests_per_unit: 1000000000}\n"
            "      - key: generic_key\n        value: api\n        descriptors:\n"
            "          - key: identity\n            rate_limit: {unit: hour, requests_per_unit: 1000000000}\n"
            "authz:\n"
            "  domain: example\n"
            "  identity:\n    sources:\n      - header: x-api-key\n        name: api_key\n      - client_ip\n"
            "  lists:\n    block:\n      - 203.0.113.0/24\n"
            "  policies:\n    - name: api\n      match: {path: {prefix: /}}\n"
            "      descriptors:\n        - [{generic_key: {descriptor_value: api}}, {identity: {}}]\n"
        )
    return path


def sidecar(tmp, storage, extra="", rule="", args=()):
    grpc, admin = free_port(), free_port()
    p = start([BIN, "serve", "--config", settings(tmp, storage, extra, rule), "--grpc-addr", f"127.0.0.1:{grpc}",
               "--admin-addr", f"127.0.0.1:{admin}", *args], grpc)
    return p, grpc, admin


def probe(port, domain="bench"):
    out = subprocess.run([BIN, "check", "--addr", f"127.0.0.1:{port}", "--domain", domain,
                          "--descriptor", "api_key=probe"], capture_output=True, text=True)
    if "overall_code: OK" not in out.stdout:
        raise SystemExit(f"probe on {port} failed: {out.stdout} {out.stderr}")


def grpc_rows(tmp):
    subprocess.run([OK_RLS, "--write-bodies", tmp], check=True)
    log = os.path.join(tmp, "h2load.log")
    servers = [("ShouldRateLimit", "OK-only tonic server (ceiling)", None, 16, 32)]
    servers.append(("ShouldRateLimit", "ratethrottle, memory", "memory", 16, 32))
    redis = [(label, os.environ[var]) for label, var in [
        ("ratethrottle, Redis", "RATETHROTTLE_TEST_REDIS_URL"),
        ("ratethrottle, Redis Cluster", "RATETHROTTLE_TEST_REDIS_CLUSTER_URL")] if os.environ.get(var)]
    for label, url in redis:
        servers.append(("ShouldRateLimit", label, url, 16, 32))
    # Low load: one connection, one stream, sequential (latency, not throughput).
    servers.append(("ShouldRateLimit", "ratethrottle, memory", "memory", 1, 1))
    for label, url in redis:
        servers.append(("ShouldRateLimit", label, url, 1, 1))
    if os.environ.get("BENCH_ONLY") != "redis":
        servers.append(("Check", "OK-only tonic server (ceiling)", None, 16, 32))
        servers.append(("Check", "ratethrottle, memory", "memory", 16, 32))
    for rpc, label, storage, conns, streams in servers:
        body = os.path.join(tmp, "rls.bin" if rpc == "ShouldRateLimit" else "check.bin")
        path = RLS_PATH if rpc == "ShouldRateLimit" else CHECK_PATH
        counter = ("ratelimit_service_should_rate_limit_total" if rpc == "ShouldRateLimit"
                   else 'ratethrottle_authz_checks_total{outcome="allowed"}')
        if storage is None:
            port = free_port()
            p = start([OK_RLS, f"127.0.0.1:{port}"], port)
            admin = None
        else:
            p, port, admin = sidecar(tmp, storage)
        if rpc == "ShouldRateLimit":
            probe(port)
        if admin:
            # Probe: ten requests must be ten decisions the server itself counted as OK
            # (h2load counts HTTP 200 even when grpc-status says otherwise).
            before = metric(admin, counter)
            h2load(port, body, log, streams=1, conns=1, path=path, requests=10)
            if metric(admin, counter) - before != 10:
                raise SystemExit(f"probe failed for {rpc} on {label}")
        redis_side = redis_pids() if storage and storage != "memory" else []
        pids = [p.pid] + redis_side
        before_cpu = cpu_seconds(pids)
        before_redis = cpu_seconds(redis_side)
        before = metric(admin, counter) if admin else 0
        cmds0 = metric(admin, "ratethrottle_redis_commands_total") if admin else 0
        batches0 = metric(admin, "ratethrottle_redis_batch_calls_total") if admin else 0
        batched0 = metric(admin, "ratethrottle_redis_batched_requests_total") if admin else 0
        rps, ok, lat = h2load(port, body, log, streams=streams, conns=conns, path=path)
        cpu = cpu_seconds(pids) - before_cpu
        redis_cpu = cpu_seconds(redis_side) - before_redis
        decided = (metric(admin, counter) - before) if admin else ok
        cmds = (metric(admin, "ratethrottle_redis_commands_total") - cmds0) if admin else 0
        fallbacks = metric(admin, "ratethrottle_redis_failure_mode_answers_total") if admin else 0
        batches = (metric(admin, "ratethrottle_redis_batch_calls_total") - batches0) if admin else 0
        batched = (metric(admin, "ratethrottle_redis_batched_requests_total") - batched0) if admin else 0
        stop(p)
        p50, p99 = percentiles(lat)
        note = f"{cmds / max(decided, 1):.2f} Redis cmd/req" if storage and storage != "memory" else ""
        if redis_side:
            note += f", Redis {redis_cpu / max(decided, 1) * 1e6:.1f} µs/req"
        if batches:
            note += f", batches of {batched / batches:.1f}"
        if admin and decided < ok * 0.99:
            note += f" (only {int(decided)} of {ok} counted!)"
        if storage and storage != "memory":
            # Calls that missed the deadline (or failed) are answered by the failure mode:
            # the share the issue asks to report, 0 when every decision was Redis's.
            note += f", {fallbacks / max(decided, 1) * 100:.2f} % failure-mode answers"
        ROWS.append((f"gRPC {rpc} (h2load {conns}x{streams})", label, rps, p50, p99,
                     cpu / max(decided, 1) * 1e6, note))


def envoy_config(tmp, mode, rls_port, config="http-ratelimit.yaml"):
    src = open(os.path.join(ROOT, "k8s/examples/envoy", config)).read()
    listen, upstream, admin = free_port(), free_port(), free_port()
    text = (src.replace("port_value: 10000", f"port_value: {listen}")
            .replace("port_value: 10001", f"port_value: {upstream}")
            .replace("port_value: 9901", f"port_value: {admin}")
            .replace("port_value: 8081", f"port_value: {rls_port or 1}")
            .replace("address: 0.0.0.0", "address: 127.0.0.1"))
    if mode == "alone":
        # Drop the rate limit filter: Envoy and its upstream only.
        text = re.sub(r"                  - name: envoy.filters.http.ratelimit\n(?:                    .*\n)+", "", text)
    path = os.path.join(tmp, f"envoy-{mode}-{config}")
    with open(path, "w") as f:
        f.write(text)
    return path, listen, admin


def wrk(port):
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{SECONDS}s", "--latency", "-H", "x-api-key: bench",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def lat(q):
        m = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    return rps, total, lat(50), lat(99), int(non2xx.group(1)) if non2xx else 0


def envoy_rows(tmp):
    envoy = os.environ.get("RATETHROTTLE_TEST_ENVOY")
    if not envoy:
        return
    for label, mode, config in [
        ("Envoy alone", "alone", "http-ratelimit.yaml"),
        ("Envoy + OK-only RLS (ceiling)", "ok", "http-ratelimit.yaml"),
        ("Envoy + ratethrottle RLS (memory)", "ratethrottle", "http-ratelimit.yaml"),
        ("Envoy + OK-only, both filters (ceiling)", "ok", "ratelimit-and-ext-authz.yaml"),
        ("Envoy + ratethrottle, both filters", "ratethrottle", "ratelimit-and-ext-authz.yaml"),
    ]:
        side, rls_port = None, None
        if mode == "ok":
            rls_port = free_port()
            side = start([OK_RLS, f"127.0.0.1:{rls_port}"], rls_port)
        elif mode == "ratethrottle":
            side, rls_port, _ = sidecar(tmp, "memory")
            probe(rls_port, "example")
        path, listen, admin = envoy_config(tmp, mode, rls_port, config)
        e = start([envoy, "-c", path, "--concurrency", "1", "--use-dynamic-base-id", "-l", "error"], listen)
        time.sleep(0.5)
        pids = [e.pid] + ([side.pid] if side else [])
        c0 = cpu_seconds(pids)
        rps, total, p50, p99, bad = wrk(listen)
        cpu = cpu_seconds(pids) - c0
        stop(e)
        if side:
            stop(side)
        ROWS.append(("HTTP through Envoy (wrk 32 conns)", label, rps, p50, p99, cpu / max(total, 1) * 1e6,
                     f"{bad} non-2xx" if bad else ""))


def bad_sinks():
    """A sink that accepts and never answers, and one that answers 500: their URLs."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(1024)
    held = []

    def accept():
        while True:
            held.append(hung.accept()[0])

    class Fail(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(500)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    fail = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fail)
    threading.Thread(target=accept, daemon=True).start()
    threading.Thread(target=fail.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{hung.getsockname()[1]}/", f"http://127.0.0.1:{fail.server_port}/"


def alert_rows(tmp):
    hung, failing = bad_sinks()
    body = os.path.join(tmp, "check.bin")
    log = os.path.join(tmp, "h2load-alerts.log")
    counter = 'ratethrottle_authz_checks_total{outcome="rate_limited"}'
    for label, alerts in [("over limit, alerts off", ""),
                          ("over limit, alerts to a hung + a 500 sink", (
                              "alerts:\n  timeout: 1s\n  deadline: 3s\n  sinks:\n"
                              f"    - {{name: hung, type: webhook, url: '{hung}'}}\n"
                              f"    - {{name: failing, type: slack, url: '{failing}'}}\n"
                              "  kinds:\n    violation_rate: {threshold: 1, window: 0s, cooldown: 0s}\n"))]:
        path = os.path.join(tmp, f"alerts-{bool(alerts)}.yaml")
        with open(path, "w") as f:
            f.write("domains:\n  - domain: example\n    descriptors:\n"
                    "      - key: generic_key\n        value: api\n        descriptors:\n"
                    "          - key: identity\n            rate_limit: {unit: hour, requests_per_unit: 1}\n"
                    "authz:\n  domain: example\n"
                    "  identity:\n    sources:\n      - header: x-api-key\n        name: api_key\n"
                    "  policies:\n    - name: api\n      match: {path: {prefix: /}}\n"
                    "      descriptors:\n        - [{generic_key: {descriptor_value: api}}, {identity: {}}]\n"
                    + alerts)
        grpc, admin = free_port(), free_port()
        p = start([BIN, "serve", "--config", path, "--grpc-addr", f"127.0.0.1:{grpc}",
                   "--admin-addr", f"127.0.0.1:{admin}"], grpc)
        before = metric(admin, counter)
        h2load(grpc, body, log, streams=1, conns=1, path=CHECK_PATH, requests=10)
        if metric(admin, counter) - before < 9:
            raise SystemExit(f"probe failed for {label}")
        c0 = cpu_seconds([p.pid])
        before = metric(admin, counter)
        rps, ok, lat = h2load(grpc, body, log, path=CHECK_PATH)
        cpu = cpu_seconds([p.pid]) - c0
        decided = metric(admin, counter) - before
        note = ""
        if alerts:
            failed = sum(metric(admin, f'ratethrottle_alerts_failed_total{{sink="{n}",type="{t}"}}')
                         for n, t in [("hung", "webhook"), ("failing", "slack")])
            made = metric(admin, 'ratethrottle_alerts_total{kind="violation_rate"}')
            dead = metric(admin, 'ratethrottle_alerts_sink_dead{sink="failing",type="slack"}')
            note = f"{int(made)} alerts, {int(failed)} deliveries failed, failing sink dead={int(dead)}"
        stop(p)
        p50, p99 = percentiles(lat)
        ROWS.append(("gRPC Check, alerts (h2load 16x32)", label, rps, p50, p99,
                     cpu / max(decided, 1) * 1e6, note))


ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
# The anomaly module with its defaults; `warmup` keeps every decision a dry run, so the
# bench's one hot caller is judged (full detector cost) without being blocked mid-run.
ANOMALY = "anomaly:\n  enabled: true\n  warmup: 1h\n"
ADAPTIVE = ", adaptive: {min_factor: 0.5, max_factor: 2.0}"


def ab_rows(tmp, suite, rpc, storage, modes, body, rounds=ROUNDS, conns=16, streams=32, redis_cpu=False):
    """One setting off vs on, interleaved off/on/off/on... with a fresh sidecar per run; each
    mode's row is the median of its runs, and the `on` row carries the ratios to `off`.
    `modes`: [(label, extra settings, extra inside the identity rule[, serve flags[, (rpc,
    body)]])] with `off` first; the last element makes that mode call another RPC."""
    log = os.path.join(tmp, "h2load-ab.log")
    runs = {mode[0]: [] for mode in modes}
    redis_side = redis_pids() if storage != "memory" or redis_cpu else []
    for _ in range(rounds):
        for label, extra, rule, *rest in modes:
            args = rest[0] if rest else ()
            mrpc, mbody = rest[1] if len(rest) > 1 else (rpc, body)
            path = RLS_PATH if mrpc == "ShouldRateLimit" else CHECK_PATH
            counter = ("ratelimit_service_should_rate_limit_total" if mrpc == "ShouldRateLimit"
                       else 'ratethrottle_authz_checks_total{outcome="allowed"}')
            p, grpc, admin = sidecar(tmp, storage, extra, rule, args)
            probe(grpc)
            before = metric(admin, counter)
            h2load(grpc, mbody, log, streams=1, conns=1, path=path, requests=10)
            if metric(admin, counter) - before != 10:
                raise SystemExit(f"probe failed for {mrpc} {label}")
            pids = [p.pid] + redis_side
            c0, n0 = cpu_seconds(pids), metric(admin, counter)
            rps, ok, lat = h2load(grpc, mbody, log, path=path, conns=conns, streams=streams)
            cpu = cpu_seconds(pids) - c0
            decided = metric(admin, counter) - n0
            extra_counts = {m: metric(admin, m) for m in (
                "ratethrottle_trace_spans_exported_total", "ratethrottle_anomaly_events_total",
                "ratethrottle_anomaly_events_dropped_total")}
            stop(p)
            if decided < ok * 0.99:
                raise SystemExit(f"{mrpc} {label}: only {int(decided)} of {ok} answers were decisions")
            p50, p99 = percentiles(lat)
            runs[label].append((rps, p50, p99, cpu / max(decided, 1) * 1e6, extra_counts))
    med = lambda xs: sorted(xs)[len(xs) // 2]
    off = modes[0][0]
    base = [med([r[i] for r in runs[off]]) for i in range(4)]
    for label, *_ in modes:
        m = [med([r[i] for r in runs[label]]) for i in range(4)]
        note = f"median of {rounds} interleaved runs; req/s per run: " + ", ".join(f"{r[0]:,.0f}" for r in runs[label])
        if label != off:
            note += (f"; vs {off}: req/s {m[0] / max(base[0], 1):.3f}x, p99 {m[2] / max(base[2], 1e-9):.3f}x, "
                     f"CPU/req {m[3] / max(base[3], 1e-9):.3f}x")
            # Runs are interleaved in pairs (off, on) a few seconds apart: the median of the
            # per-pair ratios cancels the machine's drift between rounds, which the ratio of
            # medians does not.
            pairs = lambda i: med([r[i] / max(o[i], 1e-9) for r, o in zip(runs[label], runs[off])])
            note += (f"; paired (median of per-round ratios): req/s {pairs(0):.3f}x, "
                     f"p99 {pairs(2):.3f}x, CPU/req {pairs(3):.3f}x")
            for name, short in (("ratethrottle_trace_spans_exported_total", "spans exported"),
                                ("ratethrottle_anomaly_events_total", "anomaly events observed"),
                                ("ratethrottle_anomaly_events_dropped_total", "dropped")):
                total = sum(r[4][name] for r in runs[label])
                if total or name.endswith("dropped_total") and "anomaly" in label:
                    note += f"; {int(total)} {short}"
        ROWS.append((suite, label, m[0], m[1], m[2], m[3], note))


def redis_ratio_rows(tmp):
    """Memory vs one Redis, ShouldRateLimit at 16x32, interleaved memory/Redis/memory/Redis...:
    the paired ratio of CPU per decision cancels the machine's drift between rounds, which
    two rows measured minutes apart do not. Every Redis process's CPU counts in both modes
    (idle on the memory runs)."""
    url = os.environ.get("RATETHROTTLE_TEST_REDIS_URL")
    if not url:
        return
    subprocess.run([OK_RLS, "--write-bodies", tmp], check=True)
    ab_rows(tmp, "gRPC ShouldRateLimit, memory vs Redis (h2load 16x32)", "ShouldRateLimit", "memory",
            [("memory", "", "", []), ("one Redis", "", "", ["--storage", url])],
            os.path.join(tmp, "rls.bin"), redis_cpu=True)


def check_ratio_rows(tmp):
    """ShouldRateLimit vs Check on memory at 16x32, interleaved: the paired ratio of sidecar
    CPU per call (issue 16: Check within 10 % of ShouldRateLimit). Check runs the bench
    config's policy (identity from `x-api-key`, the lists, two descriptors counted) on the
    realistic CheckRequest of `ok_rls --write-bodies` (ten headers, both peers)."""
    subprocess.run([OK_RLS, "--write-bodies", tmp], check=True)
    rls, check = os.path.join(tmp, "rls.bin"), os.path.join(tmp, "check.bin")
    ab_rows(tmp, "gRPC ShouldRateLimit vs Check, memory (h2load 16x32)", "ShouldRateLimit", "memory",
            [("ShouldRateLimit", "", "", []), ("Check", "", "", [], ("Check", check))], rls)


def runtime_rows(tmp):
    """The gRPC port on tokio's shared pool vs one single-threaded runtime per core
    (`--grpc-threads`), on memory (ShouldRateLimit at 16x32 and 4x8, Check) and one Redis."""
    subprocess.run([OK_RLS, "--write-bodies", tmp], check=True)
    cores = str(os.cpu_count())
    modes = [("shared pool", "", "", ["--grpc-threads", "0"]),
             (f"per core ({cores} threads)", "", "", ["--grpc-threads", cores])]
    rls, check = os.path.join(tmp, "rls.bin"), os.path.join(tmp, "check.bin")
    ab_rows(tmp, "gRPC ShouldRateLimit, memory (h2load 16x32)", "ShouldRateLimit", "memory", modes, rls)
    ab_rows(tmp, "gRPC ShouldRateLimit, memory (h2load 4x8)", "ShouldRateLimit", "memory", modes, rls,
            conns=4, streams=8)
    ab_rows(tmp, "gRPC Check, memory (h2load 16x32)", "Check", "memory", modes, check)
    if os.environ.get("RATETHROTTLE_TEST_REDIS_URL"):
        ab_rows(tmp, "gRPC ShouldRateLimit, Redis (h2load 16x32)", "ShouldRateLimit",
                os.environ["RATETHROTTLE_TEST_REDIS_URL"], modes, rls)


def tracing_rows(tmp):
    """ShouldRateLimit on memory, tracing off vs on at 1 % sampling."""
    subprocess.run([OK_RLS, "--write-bodies", tmp], check=True)
    collector = None
    python = os.environ.get("RATETHROTTLE_TEST_OTLP_PYTHON")
    if python:
        collector = subprocess.Popen([python, os.path.join(ROOT, "tests/support/otlp_collector.py")],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        port = int(collector.stdout.readline().split()[1])
        # Spans are read and discarded (a pipe nobody reads would block the collector).
        threading.Thread(target=lambda: [None for _ in collector.stdout], daemon=True).start()
    else:
        port = free_port()
    on = f"tracing:\n  endpoint: http://127.0.0.1:{port}\n  sample_ratio: 0.01\n"
    label = "tracing on, 1 % sampled, OTLP export" + ("" if collector else " (no receiver)")
    try:
        ab_rows(tmp, "gRPC ShouldRateLimit, memory (h2load)", "ShouldRateLimit", "memory",
                [("tracing off", "", ""), (label, on, "")], os.path.join(tmp, "rls.bin"))
    finally:
        if collector:
            collector.kill()
            collector.wait()


def anomaly_rows(tmp):
    """The anomaly module off vs on (every request observed), ShouldRateLimit and Check."""
    subprocess.run([OK_RLS, "--write-bodies", tmp], check=True)
    modes = [("anomaly off", "", ""), ("anomaly on (dry run: warmup)", ANOMALY, "")]
    # The module hears of a ShouldRateLimit through its remote_address entry (as Envoy's
    # `remote_address` action sends it): the request carries one beside the API key.
    body = os.path.join(tmp, "rls-address.bin")
    with open(body, "wb") as f:
        f.write(grpc_body("bench", [[("api_key", "bench-key")], [("remote_address", "10.1.2.3")]]))
    ab_rows(tmp, "gRPC ShouldRateLimit, memory (h2load)", "ShouldRateLimit", "memory", modes, body)
    ab_rows(tmp, "gRPC Check, memory (h2load)", "Check", "memory", modes, os.path.join(tmp, "check.bin"))


def adaptive_rows(tmp):
    """`adaptive` on a rule vs off, memory and Redis. The request carries an `identity` entry,
    so every decision looks its caller up in the trust table; the anomaly module (which keeps
    the trust book) is on in both modes, so the difference is the adaptive limit alone."""
    body = os.path.join(tmp, "rls-identity.bin")
    with open(body, "wb") as f:
        f.write(grpc_body("bench", [[("identity", "bench-caller")]]))
    stores = [("memory", "memory")]
    if os.environ.get("RATETHROTTLE_TEST_REDIS_URL"):
        stores.append(("Redis", os.environ["RATETHROTTLE_TEST_REDIS_URL"]))
    for name, storage in stores:
        ab_rows(tmp, f"gRPC ShouldRateLimit, {name} (h2load)", "ShouldRateLimit", storage,
                [("adaptive off (anomaly on)", ANOMALY, ""), ("adaptive on the rule", ANOMALY, ADAPTIVE)], body)


# bench/limitador: Kuadrant Limitador's RLS server ported over the `limitador` crate (see its
# header comment); scripts/bench.sh builds it and sets this only when the build succeeded.
LIMITADOR = os.environ.get("RATETHROTTLE_BENCH_LIMITADOR")
# Upstream's limits-file format. The bench limit counts per api_key value, like the bench
# rule of `settings()`; the probe limit (its own namespace, so it costs the bench requests
# nothing) proves that the descriptor → CEL mapping really reaches a limit.
LIMITADOR_LIMITS = (
    "- namespace: bench\n  max_value: 1000000000\n  seconds: 3600\n  conditions: []\n"
    "  variables:\n    - descriptors[0].api_key\n"
    "- namespace: bench-probe\n  max_value: 1\n  seconds: 3600\n  conditions: []\n"
    "  variables:\n    - descriptors[0].api_key\n"
)


def limitador_probe(port):
    """Limitador answers OK on the bench domain, and a limit of 1 in the probe namespace
    answers OK then OVER_LIMIT (h2load alone counts HTTP 200s even on gRPC errors)."""
    probe(port)
    codes = []
    # A key of its own per run: on Redis the counters outlive the server.
    key = f"probe-{time.time_ns()}"
    for _ in range(2):
        out = subprocess.run([BIN, "check", "--addr", f"127.0.0.1:{port}", "--domain", "bench-probe",
                              "--descriptor", f"api_key={key}"], capture_output=True, text=True).stdout
        codes.append(out.split("overall_code: ", 1)[-1].split()[0] if "overall_code: " in out else out)
    if codes != ["OK", "OVER_LIMIT"]:
        raise SystemExit(f"Limitador probe on {port}: the limit of 1 answered {codes}, not OK then OVER_LIMIT")


def limitador_rows(tmp):
    """ShouldRateLimit, ratethrottle vs Limitador in the same h2load runs, interleaved over
    BENCH_ROUNDS rounds (one run of every row per round, a fresh server per run): memory at
    4x8 and 16x32; ratethrottle on Redis vs Limitador `redis_cached` and `redis` at 16x32."""
    suite_mem = "vs Limitador, memory"
    if not LIMITADOR:
        print("\n*** WARNING: the Limitador server (bench/limitador) did not build: no Limitador rows ***\n",
              file=sys.stderr, flush=True)
        ROWS.append((suite_mem, "Limitador: NOT BUILT (see the build error above)", 0, None, None, None, "skipped"))
        return
    subprocess.run([OK_RLS, "--write-bodies", tmp], check=True)
    body = os.path.join(tmp, "rls.bin")
    log = os.path.join(tmp, "h2load-limitador.log")
    limits = os.path.join(tmp, "limitador-limits.yaml")
    with open(limits, "w") as f:
        f.write(LIMITADOR_LIMITS)
    counter = "ratelimit_service_should_rate_limit_total"
    # (suite, label, server, storage, conns, streams); each Limitador row is compared with the
    # ratethrottle row of its suite (the first one).
    cases = []
    for conns, streams in ((4, 8), (16, 32)):
        suite = f"{suite_mem} (h2load {conns}x{streams})"
        cases += [(suite, "ratethrottle, memory", "ratethrottle", "memory", conns, streams),
                  (suite, "Limitador, memory", "limitador", ["memory"], conns, streams)]
    redis = os.environ.get("RATETHROTTLE_TEST_REDIS_URL")
    if redis:
        suite = "vs Limitador, Redis (h2load 16x32)"
        cases += [(suite, "ratethrottle, Redis (exact)", "ratethrottle", redis, 16, 32),
                  (suite, "Limitador, redis_cached (approximate)", "limitador", ["redis_cached", redis], 16, 32),
                  (suite, "Limitador, redis (exact)", "limitador", ["redis", redis], 16, 32)]
    runs = {i: [] for i in range(len(cases))}
    for _ in range(ROUNDS):
        for i, (suite, label, server, storage, conns, streams) in enumerate(cases):
            redis_side = redis_pids() if storage not in ("memory", ["memory"]) else []
            if server == "ratethrottle":
                p, port, admin = sidecar(tmp, storage)
                probe(port)
                before = metric(admin, counter)
                h2load(port, body, log, streams=1, conns=1, requests=10)
                if metric(admin, counter) - before != 10:
                    raise SystemExit(f"probe failed for {label}")
                n0 = metric(admin, counter)
            else:
                port = free_port()
                p = subprocess.Popen([LIMITADOR, limits, "--rls-ip", "127.0.0.1", "--rls-port", str(port), *storage],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                wait_port(port)
                limitador_probe(port)
            pids = [p.pid] + redis_side
            c0, r0 = cpu_seconds(pids), cpu_seconds(redis_side)
            rps, ok, lat = h2load(port, body, log, streams=streams, conns=conns)
            cpu, redis_cpu = cpu_seconds(pids) - c0, cpu_seconds(redis_side) - r0
            if server == "ratethrottle":
                decided = metric(admin, counter) - n0
                stop(p)
            else:
                stop(p)
                # The exposition printed on SIGTERM; the bench probe was one authorized call.
                m = re.search(r'^authorized_calls\{limitador_namespace="bench"\} (\d+)', p.stdout.read(), re.M)
                decided = (int(m.group(1)) - 1) if m else 0
            if decided < ok * 0.99:
                raise SystemExit(f"{label}: only {int(decided)} of {ok} answers were OK decisions")
            p50, p99 = percentiles(lat)
            runs[i].append((rps, p50, p99, cpu / max(decided, 1) * 1e6, redis_cpu / max(decided, 1) * 1e6))
    med = lambda xs: sorted(xs)[len(xs) // 2]
    base = {}
    for i, (suite, label, server, storage, conns, streams) in enumerate(cases):
        m = [med([r[k] for r in runs[i]]) for k in range(5)]
        note = f"median of {ROUNDS} interleaved runs; req/s per run: " + ", ".join(f"{r[0]:,.0f}" for r in runs[i])
        if redis and storage not in ("memory", ["memory"]):
            note += f"; incl. Redis {m[4]:.1f} µs/req"
            if server == "limitador" and os.environ.get("LIMITADOR_PORT_SPAN_LEVEL"):
                # Not upstream's setup: the port's tracing layer capped (bench/limitador).
                note += f"; NOT upstream: spans capped at {os.environ['LIMITADOR_PORT_SPAN_LEVEL']}"
        if server == "ratethrottle":
            base[suite] = i
        else:
            b = runs[base[suite]]
            bm = [med([r[k] for r in b]) for k in range(4)]
            # Targets are stated as ratethrottle ÷ Limitador: req/s above 1 is ratethrottle
            # faster; p99 and CPU/req below 1 are ratethrottle lower. The paired figure is the
            # median of the per-round ratios (each round's two runs are seconds apart, so the
            # machine's drift between rounds cancels).
            pair = lambda k: med([o[k] / max(r[k], 1e-9) for o, r in zip(b, runs[i])])
            note += (f"; ratethrottle ÷ Limitador: req/s {bm[0] / max(m[0], 1):.2f}x, p99 {bm[2] / max(m[2], 1e-9):.2f}x, "
                     f"CPU/req {bm[3] / max(m[3], 1e-9):.2f}x; paired: req/s {pair(0):.2f}x, p99 {pair(2):.2f}x, "
                     f"CPU/req {pair(3):.2f}x")
        ROWS.append((suite, label, m[0], m[1], m[2], m[3], note))


def criterion_rows():
    out = subprocess.run(["cargo", "bench", "--locked", "--bench", "decisions", "--", "--warm-up-time", "1",
                          "--measurement-time", str(max(2, SECONDS // 3)), "--output-format", "bencher"],
                         cwd=ROOT, capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = re.match(r"test (\S+)\s+\.\.\. bench:\s+([\d,.]+) ns/iter", line)
        if m:
            ns = float(m.group(2).replace(",", ""))
            ROWS.append(("in-process decisions (1 thread)", m.group(1), 1e9 / ns, None, None, None, f"{ns:.1f} ns"))


def memory_rows():
    """benches/memory.rs prints its own table (bytes per key, not requests per second)."""
    out = subprocess.run(["cargo", "bench", "--locked", "--bench", "memory"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return out.strip()


def main():
    tmp = tempfile.mkdtemp(prefix="ratethrottle-bench.")
    try:
        print(f"benchmarks: {SECONDS}s per row, {os.cpu_count()} cores", flush=True)
        # BENCH_ONLY=redis: only the ShouldRateLimit rows (memory, Redis, Cluster);
        # BENCH_ONLY=anomaly | adaptive | tracing: only that off-vs-on comparison;
        # BENCH_ONLY=limitador: only ratethrottle vs Limitador;
        # BENCH_ONLY=memory: only the memory store's bytes per key.
        only = os.environ.get("BENCH_ONLY")
        memory = memory_rows() if only in (None, "memory") else None
        if only == "memory":
            print(memory)
            return 0
        if not only:
            criterion_rows()
        if only in (None, "redis"):
            grpc_rows(tmp)
            redis_ratio_rows(tmp)
        if not only:
            envoy_rows(tmp)
            alert_rows(tmp)
        for name, rows in (("anomaly", anomaly_rows), ("adaptive", adaptive_rows), ("tracing", tracing_rows),
                           ("runtime", runtime_rows), ("limitador", limitador_rows),
                           ("check", check_ratio_rows)):
            if only in (None, name):
                rows(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"| {'suite':<36} | {'row':<44} | {'req/s':>10} | {'p50 ms':>7} | {'p99 ms':>7} | {'CPU µs/req':>10} | note")
    print(f"|{'-'*38}|{'-'*46}|{'-'*12}|{'-'*9}|{'-'*9}|{'-'*12}|------")
    for suite, row, rps, p50, p99, cpu, note in ROWS:
        f = lambda v, spec: format(v, spec) if v is not None else "-"
        print(f"| {suite:<36} | {row:<44} | {rps:>10,.0f} | {f(p50, '>7.2f')} | {f(p99, '>7.2f')} | {f(cpu, '>10.1f')} | {note}")
    if memory:
        print()
        print(memory)


if __name__ == "__main__":
    sys.exit(main())
