"""edge-agent: camera metadata from the site's MQTT broker to the cloud, buffered on disk.

`run` runs the agent (under systemd); `check-config` checks a config before you start it;
`status`, `top`, `tap` and `deadletter` look at a running agent and its outbox; `simulate`
runs local stand-ins for the cloud and the cameras.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

import agent.config.settings as config_settings
import agent.core.buildinfo as buildinfo
from agent.cli.exitcodes import Exit
from agent.cli.exitcodes import epilog as exit_epilog
from agent.config.settings import (
    HealthSettings,
    Settings,
    credentials_outside_systemd,
    effective_config,
    escape_controls,
    inline_secret_warnings,
    json_schema,
    load_settings,
)
from agent.core.errors import AlreadyRunning, ConfigError, OutboxError, StartupError, TapError
from agent.ops.logs import setup_logging

# Exceptions become exit codes here and only here; every code and its meaning:
# agent/cli/exitcodes.py.
EXIT_NOT_READY = Exit.NOT_READY
EXIT_CONFIG = Exit.CONFIG
EXIT_STARTUP = Exit.STARTUP
EXIT_CONNECT = Exit.CONNECT
EXIT_UNREACHABLE = Exit.UNREACHABLE
EXIT_NOT_FOUND = Exit.NOT_FOUND
EXIT_INTERRUPTED = Exit.INTERRUPTED
EXIT_BROKEN_PIPE = Exit.BROKEN_PIPE


# Names the config file when no --config is given.
CONFIG_ENV = "EDGE_AGENT_CONFIG"


def config_path(given: str | None) -> str:
    """The config file a command reads, decided here for every command: --config, else
    $EDGE_AGENT_CONFIG, else the unit's own (/etc/edge-agent/config.toml)."""
    if given is not None:
        return given
    return os.environ.get(CONFIG_ENV) or str(config_settings.UNIT_CONFIG)


def _load(given: str | None) -> tuple[str, Settings]:
    """The config file (see config_path) and its settings; exit 2 with one line per problem.
    Run with the unit's config, a command reads the credentials the unit would give it."""
    path = config_path(given)
    try:
        settings = load_settings(path)
    except ConfigError as e:
        if given is not None:
            whence = ""
        elif os.environ.get(CONFIG_ENV):
            whence = f" (from {CONFIG_ENV})"
        else:
            whence = f" (the default; give --config FILE or set {CONFIG_ENV})"
        for p in e.problems:
            if whence and p.startswith(f"config file {path!r}"):
                p += whence
            print(f"config error: {escape_controls(p)}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    credentials_outside_systemd(path)
    return path, settings


def _health_url(args: argparse.Namespace) -> str:
    """`status` and `top`: --url, else the config's health.listen. Without a config named and
    none installed (or none this user may read), the default listen address."""
    if args.url is not None:
        return str(args.url)
    named = args.config is not None or os.environ.get(CONFIG_ENV)
    if not named and not os.access(config_settings.UNIT_CONFIG, os.R_OK):
        return f"http://{HealthSettings.model_fields['listen'].default}"
    return f"http://{_load(args.config)[1].health.listen}"


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.app.faults import Faults
    from agent.config.preflight import (
        buffer_problem,
        credential_warnings,
        default_service_user,
        gateway_id_problem,
        secret_problems,
        tls_problems,
        username_problem,
    )

    if args.schema:
        print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
        return 0
    path, settings = _load(args.config)
    if args.show:
        print(json.dumps(effective_config(settings), indent=2))
    for warning in inline_secret_warnings(path, settings) + credential_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    user = args.service_user or default_service_user()
    problems = [
        p
        for p in (
            gateway_id_problem(settings),
            username_problem(settings),
            buffer_problem(settings, user),
        )
        if p
    ]
    # Run by whoever: a file only the service user may read is for `run` to check.
    problems += tls_problems(settings, as_service=False)
    problems += secret_problems(settings, as_service=False)
    try:
        Faults.from_env()  # `run` would refuse it
    except ValueError as e:
        problems.append(str(e))
    for p in problems:
        print(f"config error: {escape_controls(p)}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    if args.connect:
        from agent.cli.probe import probe_all

        results = probe_all(settings, timeout_s=args.timeout_s)
        for r in results:
            print(f"{'ok' if r.ok else 'FAILED'}  {r.target}: {r.detail}", file=sys.stderr)
        if not all(r.ok for r in results):
            return EXIT_CONNECT
    print(f"config ok: {path}", file=sys.stderr)
    return 0


def _exit_now(code: int) -> None:
    """End the process at once (a second signal): the outbox and the broker's session keep
    everything; nothing in flight is worth waiting for."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.app.faults import Faults
    from agent.config.preflight import (
        buffer_path_problem,
        credential_warnings,
        gateway_id_problem,
        secret_problems,
        tls_problems,
        username_problem,
    )

    path, settings = _load(args.config)
    # What check-config (ExecStartPre) checked may have changed since: one line each, exit 2,
    # rather than a traceback from deep in the start.
    problems = [
        p
        for p in (
            gateway_id_problem(settings),
            username_problem(settings),
            buffer_path_problem(settings),
        )
        if p
    ]
    problems += tls_problems(settings) + secret_problems(settings)
    try:
        faults = Faults.from_env()  # a test hook (agent/app/faults.py)
    except ValueError as e:
        problems.append(str(e))
    for p in problems:
        print(f"config error: {escape_controls(p)}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    setup_logging(settings.log)
    for warning in inline_secret_warnings(path, settings) + credential_warnings(settings):
        logging.getLogger("agent").warning(warning)
    from agent.app.service import SecondSignal, run_service
    from agent.ops.notify import Notifier

    logging.getLogger("agent").info(
        "%s starting, gateway %s", buildinfo.describe(), settings.gateway_id
    )
    try:
        uvloop.run(
            run_service(
                settings,
                faults=faults,
                notifier=Notifier.from_env(),
                on_second_signal=lambda: _exit_now(Exit.SECOND_SIGNAL),
                reload=lambda: load_settings(path),
            )
        )
    except (OutboxError, AlreadyRunning, StartupError) as e:
        logging.getLogger("agent").error("cannot start: %s", e)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SecondSignal:
        return Exit.SECOND_SIGNAL
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print /status for a person; exit 0 ready, 1 not ready, 5 unreachable."""
    import urllib.error
    import urllib.request

    from agent.cli.views import status_lines

    url = _health_url(args)
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=args.timeout_s) as r:
            doc = json.loads(r.read())
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"edge-agent at {url} is unreachable: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(status_lines(doc, time.time())))
    return 0 if doc.get("ready") else EXIT_NOT_READY


def cmd_deadletter(args: argparse.Namespace) -> int:
    from agent.cli.views import deadletter_detail, deadletter_lines
    from agent.durable.store import list_dead_letters, retry_dead_letters, show_dead_letter

    _, settings = _load(args.config)
    path = settings.buffer.path
    if not path.exists():
        print(f"no outbox at {path}", file=sys.stderr)
        return EXIT_STARTUP
    if args.action == "list":
        rows = list_dead_letters(path)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for line in deadletter_lines(rows):
                print(line)
            print(f"{len(rows)} dead letters", file=sys.stderr)
        return 0
    if args.action == "show":
        doc = show_dead_letter(path, args.seq)
        if doc is None:
            print(f"deadletter show: no dead letter with seq {args.seq}", file=sys.stderr)
            return EXIT_NOT_FOUND
        print(json.dumps(doc, indent=2) if args.json else "\n".join(deadletter_detail(doc)))
        return 0
    if not args.all and not args.seqs:
        print("deadletter retry: give --all or one or more SEQ", file=sys.stderr)
        return EXIT_CONFIG
    if args.all and args.seqs:
        print("deadletter retry: give --all or SEQ..., not both", file=sys.stderr)
        return EXIT_CONFIG
    n = retry_dead_letters(path, None if args.all else args.seqs)
    print(f"{n} dead letters put back in the outbox; the agent sends them within seconds")
    if args.seqs and n < len(args.seqs):
        print(f"{len(args.seqs) - n} of the given seqs are not dead letters", file=sys.stderr)
        return EXIT_NOT_FOUND
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    """Live view of a running agent; plain snapshots when stdout is not a terminal."""
    from agent.cli.top import TopOptions, run_top

    url = _health_url(args)
    opts = TopOptions(
        url=url,
        interval_s=args.interval_s,
        sort=args.sort,
        silent_s=args.silent_s,
        once=args.once,
        iterations=args.iterations,
        rows=args.rows,
    )
    try:
        return run_top(opts)
    except BrokenPipeError:  # `edge-agent top --once | head`
        _quiet_stdout()
        return 0


def cmd_tap(args: argparse.Namespace) -> int:
    """Print each message on the broker as the agent would see it (see agent/cli/tap.py)."""
    from agent.cli.tap import TapOptions, check_id, run_tap, subscriptions

    _, settings = _load(args.config)
    if args.sent:
        return cmd_tap_sent(args, settings)
    try:
        check_id("--camera", args.camera)
        check_id("--stream", args.stream)
        if not subscriptions(settings, args.camera, args.stream):
            raise ValueError(f"--stream {args.stream!r}: no [[streams]] entry carries that stream")
    except ValueError as e:
        print(f"tap: {e}", file=sys.stderr)
        return EXIT_CONFIG
    opts = TapOptions(
        camera=args.camera,
        stream=args.stream,
        json=args.json,
        count=args.count,
        seconds=args.seconds,
    )
    try:
        return run_tap(settings, opts, sys.stdout, sys.stderr)
    except TapError as e:
        print(f"tap: {e}", file=sys.stderr)
        return EXIT_STARTUP
    except BrokenPipeError:  # `edge-agent tap ... | head`: the reader has gone, so have we
        _quiet_stdout()
        return 0


def cmd_forward(args: argparse.Namespace) -> int:
    """`forward --now`: the running agent retries sending at once, whatever its backoff."""
    import os
    import signal

    from agent.durable.lock import holder

    _, settings = _load(args.config)
    pid = holder(settings.buffer.path)
    if pid is None:
        print(f"forward: no agent runs on {settings.buffer.path}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as e:
        print(f"forward: cannot signal the agent (pid {pid}): {e.strerror}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"forward: asked the agent (pid {pid}) to send now; `edge-agent tap --sent` shows it")
    return 0


def cmd_tap_sent(args: argparse.Namespace, settings: Settings) -> int:
    """`tap --sent`: every attempt to send a batch, as it happens (from GET /status/sent)."""
    from agent.cli.tap import watch_sent

    url = f"http://{settings.health.listen}/status/sent"
    try:
        return watch_sent(url, sys.stdout, json_lines=args.json, count=args.count,
                          seconds=args.seconds)  # fmt: skip
    except OSError as e:
        print(f"tap: the agent at {url} is unreachable: {getattr(e, 'reason', e)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BrokenPipeError:
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the exit flush cannot raise again."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
        return value

    return parse


def cmd_simulate_cloud(args: argparse.Namespace) -> int:
    from agent.sim.cloud import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s cloud: %(message)s")
    host, _, port = args.listen.rpartition(":")
    serve(
        host=host.strip("[]"),
        port=int(port),
        db=Path(args.db),
        fail_rate=args.fail_rate,
        throttle_every=args.throttle_every,
        retry_after_s=args.retry_after_s,
        down_after_s=args.down_after_s,
        down_for_s=args.down_for_s,
        delay_ms=args.delay_ms,
        seed=args.seed,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        token=args.token,
    )
    return 0


def cmd_simulate_cameras(args: argparse.Namespace) -> int:
    from agent.sim.cameras import SimOptions, run_simulation

    host, _, port = args.broker.rpartition(":")
    opts = SimOptions(
        host=host.strip("[]"),
        port=int(port),
        cameras=args.cameras,
        rate=args.rate,
        duration_s=args.duration,
        seed=args.seed,
        processes=args.processes,
        topic_prefix=args.topic_prefix,
        skew_s=args.skew_s,
        clocks=tuple(args.clock),
        late_fraction=args.late_fraction,
        malformed_fraction=args.malformed_fraction,
        record=Path(args.record) if args.record else None,
        start_at=args.start_at,
    )
    # SIGTERM (`timeout`, systemd, a harness) ends it as Ctrl-C does: every process stops
    # publishing, waits for its acks and writes --record, and the summary is printed.
    stop = threading.Event()
    stopped_by: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopped_by.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def started(processes: int) -> None:
        print(
            f"simulate cameras: {opts.cameras} cameras at {opts.rate:g} msgs/s each, from "
            f"{processes} processes to {args.broker}, for {opts.duration_s:g} s "
            "(Ctrl-C or SIGTERM stops it with its summary)",
            file=sys.stderr,
            flush=True,
        )

    summary = run_simulation(opts, stop=stop, started=started)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the summary is on its way: nothing to stop
        signal.signal(sig, signal.SIG_IGN)
    summary["stopped_by"] = stopped_by[0] if stopped_by else None
    print(json.dumps(summary, indent=2))
    return Exit.OK if summary["failed"] == 0 else Exit.PUBLISH_FAILED


def _clock_fault(spec: str) -> tuple[int, str]:
    index, _, kind = spec.partition("=")
    if not index.isdigit() or not kind:
        raise argparse.ArgumentTypeError(f"--clock {spec!r}: expected N=KIND, e.g. 3=offset:37")
    return int(index), kind


def _config_option(parser: argparse.ArgumentParser, what: str = "the agent's config") -> None:
    """--config, the same for every command; its default is config_path's."""
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"{what} (TOML; default: ${CONFIG_ENV}, else {config_settings.UNIT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description=__doc__,
        epilog=exit_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=buildinfo.describe())
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent")
    _config_option(run)
    run.set_defaults(func=cmd_run)

    cc = sub.add_parser("check-config", help="validate a config file (--show prints it)")
    _config_option(cc, "the config to check")
    cc.add_argument(
        "--schema",
        action="store_true",
        help="print the config's JSON Schema (for an editor: taplo, Even Better TOML) and exit",
    )
    cc.add_argument(
        "--connect",
        action="store_true",
        help="also connect: the broker (CONNACK, SUBACK) and the cloud (TLS, credentials)",
    )
    cc.add_argument(
        "--service-user",
        default=None,
        help="the user that runs the agent, for the buffer directory check "
        "(default: edge-agent if it exists, else you)",
    )
    cc.add_argument("--timeout-s", type=float, default=10.0, help="for each --connect probe")
    cc.add_argument(
        "--show", action="store_true", help="print the effective config, secrets masked"
    )
    cc.add_argument(
        "--quiet", action="store_true", help="print only problems (the unit's ExecStartPre)"
    )
    cc.set_defaults(func=cmd_check_config)

    stp = sub.add_parser("status", help="show a running agent's /status; exit 1 if not ready")
    stp.add_argument("--url", default=None, help="e.g. http://127.0.0.1:9108")
    _config_option(stp, "read health.listen from this config")
    stp.add_argument("--json", action="store_true", help="print the raw /status JSON")
    stp.add_argument("--timeout-s", type=float, default=5.0)
    stp.set_defaults(func=cmd_status)

    dl = sub.add_parser("deadletter", help="chunks the cloud refused for good: list, show, retry")
    dlsub = dl.add_subparsers(dest="action", required=True)
    # Each action has its own parser so `retry --config F 7002 7104` (docs/operating.md's order) and
    # `retry 7002 7104 --config F` both parse: SEQ... is the only positional.
    dl_list = dlsub.add_parser("list", help="every dead letter: what it holds, the cloud's answer")
    _config_option(dl_list)
    dl_list.add_argument("--json", action="store_true", help="print JSON")
    dl_show = dlsub.add_parser("show", help="one dead letter: its chunk and the cloud's answer")
    dl_show.add_argument("seq", type=int, metavar="SEQ")
    _config_option(dl_show)
    dl_show.add_argument("--json", action="store_true", help="print JSON")
    dl_retry = dlsub.add_parser("retry", help="put dead letters back in the outbox")
    dl_retry.add_argument("seqs", nargs="*", type=int, metavar="SEQ")
    dl_retry.add_argument("--all", action="store_true", help="retry every dead letter")
    _config_option(dl_retry)
    for parser in (dl_list, dl_show, dl_retry):
        parser.set_defaults(func=cmd_deadletter)

    top = sub.add_parser("top", help="live view of a running agent: pipeline stages, cameras")
    top.add_argument("--url", default=None, help="e.g. http://127.0.0.1:9108")
    _config_option(top, "read health.listen from this config")
    top.add_argument("--interval-s", type=_positive(float), default=2.0, help="refresh every")
    top.add_argument(
        "--sort",
        choices=["problem", "rate", "name", "skew", "last"],
        default="problem",
        help="camera order (keys p r n k l while running)",
    )
    top.add_argument(
        "--silent-s", type=_positive(float), default=30.0, help="a camera unheard this long"
    )
    top.add_argument("--once", action="store_true", help="one plain snapshot; exit like status")
    top.add_argument("--iterations", type=_positive(int), default=None, help="stop after N")
    top.add_argument("--rows", type=_positive(int), default=20, help="cameras per plain snapshot")
    top.set_defaults(func=cmd_top)

    tap = sub.add_parser("tap", help="print each message on the broker as the agent sees it")
    _config_option(tap)
    tap.add_argument("--camera", default=None, help="only this camera id")
    tap.add_argument("--stream", default=None, help="only this stream")
    tap.add_argument("--json", action="store_true", help="one JSON object per line")
    tap.add_argument("--count", type=_positive(int), default=None, help="stop after N messages")
    tap.add_argument("--seconds", type=_positive(float), default=None, help="stop after S s")
    tap.add_argument(
        "--sent",
        action="store_true",
        help="the output side instead: each batch as it leaves (seqs, chunks, bytes, answer, "
        "latency), from the running agent",
    )
    tap.set_defaults(func=cmd_tap)
    fwd = sub.add_parser("forward", help="`forward --now`: the running agent sends at once")
    _config_option(fwd)
    fwd.add_argument(
        "--now", action="store_true", required=True, help="end the forwarder's backoff now"
    )
    fwd.set_defaults(func=cmd_forward)

    sim = sub.add_parser("simulate", help="local stand-ins: the cloud receiver, cameras")
    simsub = sim.add_subparsers(dest="what", required=True)

    cloud = simsub.add_parser("cloud", help="reference receiver of the wire format")
    cloud.add_argument("--listen", default="127.0.0.1:8080")
    cloud.add_argument("--db", required=True)
    cloud.add_argument("--fail-rate", type=float, default=0.0, help="fraction of 500 answers")
    cloud.add_argument("--throttle-every", type=int, default=0, help="answer every Nth with 429")
    cloud.add_argument("--retry-after-s", type=float, default=1.0)
    cloud.add_argument("--down-after-s", type=float, default=None, help="stop listening after")
    cloud.add_argument("--down-for-s", type=float, default=0.0, help="...for this long")
    cloud.add_argument("--delay-ms", type=float, default=0.0, help="slow responses")
    cloud.add_argument("--seed", type=int, default=1)
    cloud.add_argument("--tls-cert", default=None, help="serve HTTPS with this cert chain (PEM)")
    cloud.add_argument("--tls-key", default=None, help="...and this key (PEM)")
    cloud.add_argument(
        "--token", default=None, help="require 'Authorization: Bearer TOKEN' (else 401)"
    )
    cloud.set_defaults(func=cmd_simulate_cloud)

    cams = simsub.add_parser("cameras", help="publish realistic camera metadata at QoS 1")
    cams.add_argument("--broker", default="127.0.0.1:1883")
    cams.add_argument("--cameras", type=int, default=300)
    cams.add_argument("--rate", type=float, default=10.0, help="messages/s per camera")
    cams.add_argument("--duration", type=float, default=60.0, help="seconds")
    cams.add_argument("--seed", type=int, default=1)
    cams.add_argument("--processes", type=int, default=2)
    cams.add_argument("--topic-prefix", default="site/cam")
    cams.add_argument("--skew-s", type=float, default=0.0, help="clock offset of every 10th camera")
    cams.add_argument(
        "--clock",
        action="append",
        default=[],
        type=_clock_fault,
        metavar="N=KIND",
        help="camera N's clock: offset:S, drift:S_PER_MIN, reset1970:AFTER_S, ms_for_s:AFTER_S",
    )
    cams.add_argument("--late-fraction", type=float, default=0.0)
    cams.add_argument("--malformed-fraction", type=float, default=0.0)
    cams.add_argument("--record", default=None, help="write every acknowledged publish (JSONL)")
    cams.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    cams.set_defaults(func=cmd_simulate_cameras)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 1
    except BrokenPipeError:
        # `edge-agent status | head -2`: the reader has gone, which is not an error. Point
        # stdout at /dev/null so the interpreter's own flush at exit stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return rc


if __name__ == "__main__":
    sys.exit(main())
