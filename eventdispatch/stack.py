"""The local stack: Pulsar standalone, a MongoDB-compatible store and Redis, run by the project.

There is no Docker here, so `up` installs what is missing into `settings.cache_dir` (shared by
every checkout on the machine, so a fresh clone starts in seconds), starts each service as a
detached process whose data, log and pid file live under `settings.stack_dir`, and waits until
each one answers. A service that already answers on its port is reused, never restarted;
`down` stops only what this checkout's pid files say it started.

    python -m eventdispatch.stack up | down | status
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pymongo
import redis

from eventdispatch import admin
from eventdispatch.config import Settings

Log = Callable[[str], None]

HOST = "127.0.0.1"  # loopback only, always
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
FERRETDB_MODULE = "github.com/FerretDB/FerretDB"

# How long a fresh process may take to answer; Pulsar needs ~10 s, the rest well under 1 s.
START_TIMEOUT_S = {"pulsar": 180.0, "mongo": 30.0, "redis": 15.0}
# How long `down` waits after SIGTERM before SIGKILL; Pulsar flushes its bookie on the way out.
STOP_GRACE_S = {"pulsar": 30.0, "mongo": 10.0, "redis": 10.0}
SERVICES = ("pulsar", "mongo", "redis")


@dataclass(frozen=True)
class ServiceStatus:
    """What `status` knows about one service."""

    name: str
    address: str
    running: bool  # answers its health check right now
    pid: int | None  # None if this checkout did not start it
    started_by_us: bool
    detail: str  # e.g. "Pulsar 4.0.7", "FerretDB v1.24.2 (SQLite)", "mongod 7.0.14"


class StackError(RuntimeError):
    """A service could not be installed or started; the message says where to look."""


# --- public API ----------------------------------------------------------------------------


def up(settings: Settings, log: Log = print) -> None:
    """Install what is missing, start what is not answering, wait for all, then provision.

    Idempotent: when everything already answers this is a few health checks and the
    (cheap) `admin.provision`.
    """
    _warn_on_url_port_mismatch(settings, log)
    stack_dir = _stack_dir(settings)
    with _lock(stack_dir):
        waiting: list[tuple[str, subprocess.Popen[bytes] | None]] = []
        for name in SERVICES:
            if _answers(settings, name):
                if _our_pid(settings, name) is None:
                    log(
                        f"{name}: already answering on {_address(settings, name)}, "
                        "not started by this checkout; reusing it"
                    )
                continue
            pid = _our_pid(settings, name)
            if pid is not None:
                log(f"{name}: our process {pid} is running but not answering yet; waiting")
                waiting.append((name, None))
                continue
            ports = [_port(settings, name)]
            if name == "pulsar":
                ports.append(settings.pulsar_http_port)
            for port in ports:
                if _port_taken(port):
                    raise StackError(
                        f"{name}: port {port} is taken by something that does not answer "
                        f"like {name}; stop it or change EVENTDISPATCH_* ports"
                    )
            argv, cwd = _prepare(settings, name, log)
            waiting.append((name, _spawn(settings, name, argv, cwd, log)))

        for name, process in waiting:
            _wait_until_answering(settings, name, process, log)

        admin.provision(settings)
        log(f"pulsar: provisioned {settings.topic_prefix} ({len(admin.all_topics())} topics)")


def down(settings: Settings, log: Log = print, only: tuple[str, ...] = SERVICES) -> None:
    """Stop what this checkout started (SIGTERM, then SIGKILL after a grace period): every
    service, or `only` those (the chaos run restarts one at a time)."""
    stack_dir = _stack_dir(settings)
    with _lock(stack_dir):
        stopping: list[tuple[str, int]] = []
        for name in only:
            pid = _our_pid(settings, name)
            if pid is None:
                _pid_file(settings, name).unlink(missing_ok=True)  # stale or absent
                continue
            log(f"{name}: stopping pid {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            stopping.append((name, pid))

        for name, pid in stopping:
            deadline = time.monotonic() + STOP_GRACE_S[name]
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                log(f"{name}: still running after {STOP_GRACE_S[name]:.0f}s; sending SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _pid_file(settings, name).unlink(missing_ok=True)
            log(f"{name}: stopped")


def status(settings: Settings) -> list[ServiceStatus]:
    """One entry per service: does it answer, and did this checkout start it."""
    result = []
    for name in SERVICES:
        pid = _our_pid(settings, name)
        running = _answers(settings, name)
        result.append(
            ServiceStatus(
                name=name,
                address=_address(settings, name),
                running=running,
                pid=pid,
                started_by_us=pid is not None,
                detail=_describe(settings, name) if running else "not answering",
            )
        )
    return result


# --- health checks -------------------------------------------------------------------------


def _answers(settings: Settings, name: str) -> bool:
    """The readiness check `up` waits for: the service does real work, not just listens."""
    port = _port(settings, name)
    try:
        if name == "pulsar":
            url = f"http://{HOST}:{settings.pulsar_http_port}/admin/v2/clusters"
            response = httpx.get(url, timeout=1.0)
            # The standalone registers its cluster only after the broker is up; provisioning
            # a tenant needs it, so an empty list does not count as ready.
            return (
                response.status_code == 200
                and admin.CLUSTER in response.json()
                and _port_taken(port)
            )
        if name == "mongo":
            with _mongo(port) as client:
                client.admin.command("ping")
            return True
        return bool(_redis(port).ping())
    except (httpx.HTTPError, ValueError, pymongo.errors.PyMongoError, redis.RedisError):
        return False


def _describe(settings: Settings, name: str) -> str:
    """Which server answers, asked from the server itself (it may not be ours)."""
    port = _port(settings, name)
    try:
        if name == "pulsar":
            url = f"http://{HOST}:{settings.pulsar_http_port}/admin/v2/brokers/version"
            version = httpx.get(url, timeout=1.0).text.strip().strip('"')  # bare, not JSON
            return f"Pulsar {version} standalone"
        if name == "mongo":
            with _mongo(port) as client:
                info = client.admin.command("buildInfo")
            if "ferretdbVersion" in info:
                ours = _our_pid(settings, name) is not None  # ours is always the SQLite one
                return f"FerretDB {info['ferretdbVersion']}" + (" (SQLite)" if ours else "")
            return f"mongod {info.get('version', '?')}"
        version = _redis(port).info("server").get("redis_version", "?")
        return f"redis-server {version}"
    except (httpx.HTTPError, ValueError, pymongo.errors.PyMongoError, redis.RedisError) as exc:
        return f"answers, but could not tell which server ({exc.__class__.__name__})"


def _mongo(port: int) -> pymongo.MongoClient[dict[str, object]]:
    return pymongo.MongoClient(
        HOST,
        port,
        directConnection=True,
        serverSelectionTimeoutMS=1000,
        connectTimeoutMS=1000,
        socketTimeoutMS=2000,
    )


def _redis(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=1.0, socket_connect_timeout=1.0)


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


# --- start and wait ------------------------------------------------------------------------


def _prepare(settings: Settings, name: str, log: Log) -> tuple[list[str], Path]:
    """Install the service if needed; return its command line and working directory."""
    stack_dir = _stack_dir(settings)
    if name == "pulsar":
        return _prepare_pulsar(settings, stack_dir, log)
    if name == "mongo":
        return _prepare_mongo(settings, stack_dir, log)
    return _prepare_redis(settings, stack_dir, log)


def _prepare_pulsar(settings: Settings, stack_dir: Path, log: Log) -> tuple[list[str], Path]:
    lib = _ensure_pulsar_jars(settings, log)
    _ensure_command("java", "openjdk-17-jre-headless", log)
    home = stack_dir / "pulsar"
    data = home / "data"
    data.mkdir(parents=True, exist_ok=True)
    # The committed conf is the base; ports come from Settings. Later keys win in a
    # java.util.Properties file, so appending is enough.
    conf = home / "standalone.conf"
    conf.write_text(
        (CONF_DIR / "standalone.conf").read_text()
        + "\n# --- generated by eventdispatch.stack from Settings ---\n"
        + f"brokerServicePort={settings.pulsar_port}\n"
        + f"webServicePort={settings.pulsar_http_port}\n"
    )
    argv = [
        "java",
        "-cp",
        f"{lib}/*",
        f"-Xms{settings.pulsar_heap}",
        f"-Xmx{settings.pulsar_heap}",
        f"-XX:MaxDirectMemorySize={settings.pulsar_heap}",
        "-XX:+ExitOnOutOfMemoryError",
        f"-Dlog4j.configurationFile={CONF_DIR / 'log4j2.xml'}",
        f"-Dpulsar.log.level={settings.log_level.lower()}",
        "-Dlog4j.shutdownHookEnabled=false",  # the broker's own hook flushes logs last
        "-Djava.net.preferIPv4Stack=true",
        # What bin/pulsar passes on Java 17: Netty and BookKeeper use JDK internals.
        "-Dio.netty.tryReflectionSetAccessible=true",
        "--add-opens",
        "java.base/java.io=ALL-UNNAMED",
        "--add-opens",
        "java.base/java.util.zip=ALL-UNNAMED",
        "--add-opens",
        "java.base/java.nio=ALL-UNNAMED",
        "--add-opens",
        "java.base/jdk.internal.misc=ALL-UNNAMED",
        "--add-opens",
        "java.base/sun.net=ALL-UNNAMED",
        "--add-opens",
        "java.management/sun.management=ALL-UNNAMED",
        "--add-exports",
        "java.base/jdk.internal.platform=ALL-UNNAMED",
        "org.apache.pulsar.PulsarStandaloneStarter",
        "--config",
        str(conf),
        "--no-functions-worker",
        "--no-stream-storage",
        # Every data directory defaults to ./data/...; keep them all under .stack/.
        # (--zookeeper-dir is only checked for existence: absent means RocksDB metadata.)
        "--metadata-dir",
        str(data / "metadata"),
        "--bookkeeper-dir",
        str(data / "bookkeeper"),
        "--bookkeeper-port",
        str(settings.pulsar_bookie_port),
        "--zookeeper-dir",
        str(data / "zookeeper"),
    ]
    return argv, home  # cwd too: the broker resolves ./offloaders, ./protocols etc. there


def _prepare_mongo(settings: Settings, stack_dir: Path, log: Log) -> tuple[list[str], Path]:
    mongod = shutil.which("mongod")
    if mongod:
        data = stack_dir / "mongod"
        data.mkdir(parents=True, exist_ok=True)
        log("mongo: using mongod from PATH")
        argv = [
            mongod,
            "--dbpath",
            str(data),
            "--bind_ip",
            HOST,
            "--port",
            str(settings.mongo_port),
        ]
        return argv, data
    ferretdb = _ensure_ferretdb(settings, log)
    home = stack_dir / "ferretdb"
    (home / "data").mkdir(parents=True, exist_ok=True)
    (home / "state").mkdir(parents=True, exist_ok=True)
    argv = [
        str(ferretdb),
        "--handler=sqlite",
        # A directory: one SQLite file per database. WAL (FerretDB's default) with
        # synchronous=NORMAL survives a killed process and skips an fsync per statement.
        f"--sqlite-url=file:{home / 'data'}/?_pragma=synchronous(normal)",
        f"--listen-addr={HOST}:{settings.mongo_port}",
        f"--state-dir={home / 'state'}",
        "--debug-addr=-",  # no metrics/pprof listener (it would take port 8088)
        "--telemetry=disable",
        # At INFO/WARN FerretDB logs every connection and dumps every error reply (including
        # pymongo's unsupported `endSessions` on each client close), drowning real problems.
        "--log-level=error",
    ]
    return argv, home


def _prepare_redis(settings: Settings, stack_dir: Path, log: Log) -> tuple[list[str], Path]:
    server = _ensure_command("redis-server", "redis-server", log)
    data = stack_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # No config file: built-in defaults plus these, so /etc/redis/redis.conf never leaks in.
    argv = [
        server,
        "--bind",
        HOST,
        "--port",
        str(settings.redis_port),
        "--dir",
        str(data),
        "--appendonly",
        "yes",  # the device processor's working state must survive restarts
        "--daemonize",
        "no",  # we detach it ourselves and keep its pid
    ]
    return argv, data


def _spawn(
    settings: Settings, name: str, argv: list[str], cwd: Path, log: Log
) -> subprocess.Popen[bytes]:
    """Start `argv` detached (own session, survives this process), log and pid in .stack/."""
    log_path = _log_file(settings, name)
    with log_path.open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _pid_file(settings, name).write_text(f"{process.pid}\n")
    log(f"{name}: started pid {process.pid} on {_address(settings, name)} (log {log_path})")
    return process


def _wait_until_answering(
    settings: Settings, name: str, process: subprocess.Popen[bytes] | None, log: Log
) -> None:
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S[name]
    log_path = _log_file(settings, name)
    while not _answers(settings, name):
        if process is not None and process.poll() is not None:
            _pid_file(settings, name).unlink(missing_ok=True)
            raise StackError(
                f"{name} exited with code {process.returncode} before answering; see {log_path}"
            )
        if time.monotonic() > deadline:
            raise StackError(
                f"{name} did not answer on {_address(settings, name)} within "
                f"{START_TIMEOUT_S[name]:.0f}s; see {log_path}"
            )
        time.sleep(0.2)
    log(f"{name}: answering after {time.monotonic() - started:.1f}s")


# --- installation (into settings.cache_dir, shared by all checkouts) -----------------------


def _ensure_command(command: str, apt_package: str, log: Log) -> str:
    """Path of `command`; installs its Debian package first if it is missing."""
    found = shutil.which(command)
    if found:
        return found
    if os.geteuid() != 0:
        raise StackError(f"{command} is missing; install the Debian package {apt_package}")
    log(f"{command}: missing; installing Debian package {apt_package} (first run only)...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", apt_package], env=env)
    found = shutil.which(command)
    if not found:
        raise StackError(f"installed {apt_package} but {command} is still not on PATH")
    return found


def _ensure_pulsar_jars(settings: Settings, log: Log) -> Path:
    """The broker's runtime classpath, resolved once with Maven into the cache.

    There is no Pulsar tarball to download here, but the broker is an ordinary Maven artifact;
    resolving its runtime dependencies gives the same jars the distribution ships in lib/.
    """
    version = settings.pulsar_version
    home = settings.cache_dir.expanduser().resolve() / f"pulsar-{version}"
    lib = home / "lib"
    if (lib / f"pulsar-broker-{version}.jar").exists():
        return lib
    mvn = _ensure_command("mvn", "maven", log)
    log(f"pulsar: resolving pulsar-broker {version} jars with Maven (first run only)...")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(_PULSAR_POM.format(version=version))
    partial = home / "lib.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(home / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}",
        ]
    )
    partial.rename(lib)  # only a complete lib/ ever exists
    log(f"pulsar: {len(list(lib.glob('*.jar')))} jars in {lib}")
    return lib


_PULSAR_POM = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by eventdispatch.stack: only here to resolve the broker's runtime jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.eventdispatch</groupId>
  <artifactId>pulsar-standalone-classpath</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.pulsar</groupId>
      <artifactId>pulsar-broker</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""


def _ensure_ferretdb(settings: Settings, log: Log) -> Path:
    """A FerretDB binary for `settings.ferretdb_version`, built from source once.

    A plain `go install` binary panics at start-up: FerretDB embeds build/version/version.txt,
    which release tooling generates and the module source lacks. So build from a copy of the
    module source with that file written, and with `_FERRETDB_PATCHES` applied.
    """
    version = settings.ferretdb_version
    cache = settings.cache_dir.expanduser().resolve()
    binary = cache / "bin" / f"ferretdb-{version}-{_FERRETDB_BUILD_TAG}"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if not go:
        raise StackError(
            "FerretDB is built from source and needs Go >= 1.22 on PATH "
            "(Debian's golang package is too old); or put mongod on PATH"
        )
    log(f"mongo: building FerretDB {version} with Go (first run only, ~2 min)...")
    env = {**os.environ, "GOFLAGS": "-buildvcs=false", "CGO_ENABLED": "0"}
    info = json.loads(
        _run([go, "mod", "download", "-json", f"{FERRETDB_MODULE}@{version}"], env=env, cwd=cache)
    )
    source = cache / "build" / f"ferretdb-{version}"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(info["Dir"], source)  # the module cache is read-only
    for path in [source, *source.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    (source / "build" / "version" / "version.txt").write_text(f"{version}\n")
    for relative, before, after in _FERRETDB_PATCHES:
        path = source / relative
        text = path.read_text()
        if before in text:
            path.write_text(text.replace(before, after))
        else:
            log(
                f"mongo: warning: a patch for {relative} does not apply to FerretDB "
                f"{version}; building without it (see _FERRETDB_PATCHES in {__name__})"
            )
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(binary.name + ".partial")
    _run([go, "build", "-trimpath", "-o", str(partial), "./cmd/ferretdb"], env=env, cwd=source)
    partial.rename(binary)
    shutil.rmtree(source, ignore_errors=True)
    log(f"mongo: built {binary}")
    return binary


_FERRETDB_BUILD_TAG = "ed2"  # bump when _FERRETDB_PATCHES change, so the binary is rebuilt

# Two small fixes to FerretDB 1.24's SQLite backend, as (file, before, after):
_FERRETDB_PATCHES: tuple[tuple[str, str, str], ...] = (
    # Lookups by _id use the path `->'$._id'` but the unique _id index is built on `->"_id"`;
    # SQLite matches index expressions textually, so every lookup, update and delete by _id
    # was a full table scan (~15 ms per update at 2,000 documents). Use the index's spelling.
    (
        "internal/backends/sqlite/metadata/metadata.go",
        "IDColumn = DefaultColumn + \"->'$._id'\"",
        'IDColumn = DefaultColumn + "->\\"_id\\""',
    ),
    # The `update` command defers closing each statement's query cursor to the end of the
    # whole command. Every statement that matches a document keeps one SQLite connection busy,
    # so a bulk_write with ~100 matching updates exhausts the pool (100) and the command hangs
    # forever, wedging that database until FerretDB restarts. Close per statement instead.
    (
        "internal/handler/msg_update.go",
        "\t\tcloser := iterator.NewMultiCloser()\n\t\tdefer closer.Close()\n",
        "\t\tcloser := iterator.NewMultiCloser()\n",
    ),
    (
        "internal/handler/msg_update.go",
        '\t\tresult, err := common.UpdateDocument(ctx, c, "update", iter, &u)\n',
        '\t\tresult, err := common.UpdateDocument(ctx, c, "update", iter, &u)\n'
        "\t\tcloser.Close()\n",
    ),
)


def _run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run an install step; on failure raise with its output, which is what you need to see."""
    result = subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(
            f"{' '.join(argv)} failed with code {result.returncode}:\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result.stdout


# --- pid files, paths, settings ------------------------------------------------------------


# A pid file is trusted only if that pid still runs a command containing this marker, so a
# recycled pid never gets signalled.
_CMDLINE_MARKER = {"pulsar": "PulsarStandaloneStarter", "mongo": "", "redis": "redis-server"}


def _our_pid(settings: Settings, name: str) -> int | None:
    """The pid this checkout started for `name`, if that process is still running."""
    try:
        pid = int(_pid_file(settings, name).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    marker = _CMDLINE_MARKER[name] or ("ferretdb" if "ferretdb" in cmdline else "mongod")
    return pid if marker in cmdline and _alive(pid) else None


def _alive(pid: int) -> bool:
    """Running and not a zombie (a child we started but have not reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _stack_dir(settings: Settings) -> Path:
    path = settings.stack_dir.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_file(settings: Settings, name: str) -> Path:
    return _stack_dir(settings) / f"{name}.pid"


def _log_file(settings: Settings, name: str) -> Path:
    return _stack_dir(settings) / f"{name}.log"


def _port(settings: Settings, name: str) -> int:
    return {
        "pulsar": settings.pulsar_port,
        "mongo": settings.mongo_port,
        "redis": settings.redis_port,
    }[name]


def _address(settings: Settings, name: str) -> str:
    if name == "pulsar":
        return (
            f"pulsar://{HOST}:{settings.pulsar_port} (admin http://{HOST}:"
            f"{settings.pulsar_http_port})"
        )
    scheme = {"mongo": "mongodb", "redis": "redis"}[name]
    return f"{scheme}://{HOST}:{_port(settings, name)}"


def _warn_on_url_port_mismatch(settings: Settings, log: Log) -> None:
    """Clients use the *_url settings, the stack the *_port ones; say so if they disagree."""
    pairs = [
        ("pulsar_url", settings.pulsar_url, settings.pulsar_port),
        ("pulsar_admin_url", settings.pulsar_admin_url, settings.pulsar_http_port),
        ("mongo_url", settings.mongo_url, settings.mongo_port),
        ("redis_url", settings.redis_url, settings.redis_port),
    ]
    for field, url, port in pairs:
        if urlsplit(url).port != port:
            log(f"warning: {field}={url} does not point at the stack's port {port}")


@contextlib.contextmanager
def _lock(stack_dir: Path) -> Iterator[None]:
    """Serialise `up`/`down` of one checkout (e.g. parallel test sessions)."""
    with (stack_dir / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- command line --------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down", "status"):
        print("usage: python -m eventdispatch.stack up|down|status", file=sys.stderr)
        return 2
    settings = Settings()
    try:
        if argv[0] == "up":
            started = time.monotonic()
            up(settings)
            print(f"stack up in {time.monotonic() - started:.1f}s")
        elif argv[0] == "down":
            down(settings)
        else:
            for s in status(settings):
                owner = f"pid {s.pid}" if s.started_by_us else "not ours"
                state = "up  " if s.running else "DOWN"
                print(f"{s.name:<7} {state} {s.address:<55} {owner:<10} {s.detail}")
    except (StackError, admin.AdminError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
