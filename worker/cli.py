"""`voxqueue` command line: worker, emulator, demo, the producer's produce / replay / tail, and the
operator's status / sessions / dead (worker/admin.py)."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from typing import Any

import click

from producer.protocol import DeploymentMismatch
from worker.config import ConfigError, Settings, load_settings
from worker.logs import configure_logging, register_secret, register_url

EXIT_LOOP_DIED = 3  # a background loop kept failing (worker.pool.LOOP_FAILURES_MAX); restart me


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running service.

    Everything imported so far lives for the whole process: freezing it keeps every later
    collection from rescanning it. A higher first-generation threshold makes collections rarer;
    with hundreds of sessions each cycle otherwise stalls the event loop for tens of
    milliseconds, which shows up directly as frame lag.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def run_async(coro: Any) -> Any:
    """uvloop when available: it roughly halves the event loop's share of CPU per frame."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="voxqueue")
def main() -> None:
    """voxqueue: live speech from AI backends to Deepgram and transcripts back, through Redis Streams."""


def _settings(**flags: Any) -> Settings:
    try:
        settings = load_settings(**flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if settings.api_key():
        register_secret(settings.api_key())
    return settings


@main.command()
@click.option(
    "--concurrency", type=int, help="Sessions this process holds at most [env VOXQUEUE_CONCURRENCY]."
)
@click.option("--redis-url", help="Redis URL [env VOXQUEUE_REDIS_URL].")
@click.option("--deepgram-url", help="Deepgram live endpoint, ws:// or wss:// [env VOXQUEUE_DEEPGRAM_URL].")
@click.option("--namespace", help="Key namespace [env VOXQUEUE_NAMESPACE].")
@click.option("--partitions", type=int, help="Partition count [env VOXQUEUE_PARTITIONS].")
@click.option("--name", "consumer_name", help="Consumer name in the groups (default host-pid-random).")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port.")
@click.option(
    "--log-format", type=click.Choice(["auto", "json", "console"]), help="[env VOXQUEUE_LOG_FORMAT]"
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def worker(**flags: Any) -> None:
    """Run a worker: claim sessions, stream them to Deepgram, publish transcripts.

    SIGTERM or SIGINT drains: finishes sessions whose end has arrived, hands the others over to
    other workers at once. A second signal exits immediately.
    """
    settings = _settings(**flags)
    configure_logging(settings.log_level, settings.log_format)
    register_url(settings.redis_url)  # its exact text and its password, in every log line
    from worker.health import HealthServer
    from worker.pool import LoopDied, WorkerPool

    tune_gc()

    async def serve() -> None:
        pool = WorkerPool(settings)
        pool.install_signal_handlers()
        health = HealthServer(pool.monitor)
        if settings.metrics_port is not None:
            # /metrics, /healthz, /readyz, served in this event loop (worker/health.py says why).
            await health.start(settings.metrics_port)
        try:
            await pool.run()
        except LoopDied as exc:
            click.echo(f"worker failed: {exc}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_LOOP_DIED)
        finally:
            await health.close()
        if pool.unstopped:
            # asyncio.run() would now cancel and wait for these tasks with no time limit; they
            # ignored cancellation already (their leases are left to expire), so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    try:
        run_async(serve())
    except OSError as exc:
        raise click.ClickException(f"worker failed: {exc.strerror or exc}") from None
    except DeploymentMismatch as exc:  # another partition count than the deployment's: say which
        raise click.ClickException(f"worker refused to start: {exc}") from None


class _BadInput(click.ClickException):
    """Input that cannot work (a file voxqueue cannot send): exit 2, as the README says."""

    exit_code = 2


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0 = any free port."
)
@click.option("--engine", type=click.Choice(["marker", "speech"]), default="marker", show_default=True)
@click.option("--key", "keys", multiple=True, help="Accepted API key (repeatable); none given = any key.")
@click.option(
    "--silence-timeout", default=10.0, show_default=True, help="Close 1011 after this long with no data."
)
@click.option(
    "--final-every", default=0.5, show_default=True, help="Marker engine: seconds of audio per final."
)
def emulator(
    host: str, port: int, engine: str, keys: tuple[str, ...], silence_timeout: float, final_every: float
) -> None:
    """Run the local Deepgram live-protocol emulator (faults at /_emulator/faults)."""
    from worker.emulator import run_emulator, speech_available

    if engine == "speech" and not speech_available():
        raise click.UsageError("engine 'speech' needs pocketsphinx: pip install 'voxqueue[speech]'")
    configure_logging("info", "auto")
    for key in keys:
        register_secret(key)
    try:
        run_async(
            run_emulator(
                host=host,
                port=port,
                engine=engine,
                keys=list(keys) or None,
                silence_timeout=silence_timeout,
                final_every=final_every,
                on_ready=_emulator_ready(engine),
            )
        )
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass


def _emulator_ready(engine: str) -> Any:
    def ready(server: Any) -> None:
        # One line a user can act on: where to point the workers, and what this engine transcribes.
        what = "real speech (pocketsphinx)" if engine == "speech" else "marker frames only (tests)"
        click.echo(
            f"voxqueue emulator listening on {server.url} (engine {engine}: {what}); "
            f"workers: VOXQUEUE_DEEPGRAM_URL={server.url}",
            err=True,
        )

    return ready


@main.command()
@click.option(
    "--engine",
    type=click.Choice(["auto", "marker", "speech"]),
    default="auto",
    show_default=True,
    help="Emulator engine; auto = speech when pocketsphinx is installed.",
)
@click.option(
    "--file",
    "audio_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Audio to send (default: the bundled speech sample).",
)
@click.option(
    "--speed", default=1.0, show_default=True, help="Multiple of real time; 0 = as fast as possible."
)
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
def demo(engine: str, audio_file: str | None, speed: float, as_json: bool) -> None:
    """Run the whole pipeline on this machine: Redis, emulator, a worker, a producer.

    Needs nothing configured. With DEEPGRAM_API_KEY set it uses real Deepgram; with
    VOXQUEUE_REDIS_URL set it uses that Redis instead of starting one.
    """
    from worker.demo import DemoError, DemoInputError, run_demo

    try:
        code = run_async(run_demo(engine=engine, audio_file=audio_file, speed=speed, as_json=as_json))
    except DemoInputError as exc:
        raise _BadInput(str(exc)) from None
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


def _attach_producer_commands() -> None:
    from producer.cli import add_producer_commands

    add_producer_commands(main)


def _attach_admin_commands() -> None:
    from worker.admin import add_admin_commands

    add_admin_commands(main)


_attach_producer_commands()
_attach_admin_commands()


if __name__ == "__main__":
    main()
