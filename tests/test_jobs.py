"""jobs/: the entry points name the right CLI command, and run as real jobs on a real Ray cluster.

The cluster test starts its own head with `ray start --head --block` in a fresh temp dir, on its own
ports and with token auth (Ray 2.60's default for new clusters), next to the session's in-process
Ray. It submits ingest through `JobSubmissionClient` and the chained align through the `ray job
submit` CLI, both with infra/runtime_env.yaml and the checkout as working dir, then stops the head
by signalling the `ray start` process it launched: `ray stop` would kill every Ray on the machine,
the session's included.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import io as stdio
import os
import runpy
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from ferray.data import io
from ferray.config import StorageSettings

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
SAMPLE_ZIP = REPO / "ferray" / "assets" / "fer2013-sample.zip"
RUNTIME_ENV = REPO / "infra" / "runtime_env.yaml"
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"

# Each job file and the `ferray` command line it runs.
JOB_COMMANDS: dict[str, list[str]] = {
    "ingest": ["ingest"],
    "align": ["align"],
    "embed": ["embed"],
    "train": ["train"],
    "evaluate": ["evaluate"],
    "annotate": ["annotate"],
    "pipeline": ["pipeline"],
    "retrain": ["pipeline", "--retrain"],
}


# ---------------------------------------------------------------------------------------------
# The entry points


def job_prefix(path: Path) -> list[str]:
    """The literal arguments a job file puts before `*sys.argv[1:]` in its `main([...])` call."""
    tree = ast.parse(path.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"]
    assert len(calls) == 1, f"{path.name}: one call to ferray.cli.main"
    (argument,) = calls[0].args
    assert isinstance(argument, ast.List)
    *literals, rest = argument.elts
    assert isinstance(rest, ast.Starred) and ast.unparse(rest) == "*sys.argv[1:]", path.name
    return [ast.literal_eval(node) for node in literals]


def test_every_job_file_is_known() -> None:
    assert sorted(p.stem for p in JOBS.glob("*.py")) == sorted(JOB_COMMANDS)


@pytest.mark.parametrize("job", sorted(JOB_COMMANDS))
def test_job_names_its_cli_command(job: str) -> None:
    path = JOBS / f"{job}.py"
    assert job_prefix(path) == JOB_COMMANDS[job]
    assert ast.get_docstring(ast.parse(path.read_text())), f"{job}.py needs its one-line docstring"
    assert "from ferray.cli import main" in path.read_text()


@pytest.mark.parametrize("job", sorted(JOB_COMMANDS))
def test_job_help_is_the_cli_help(job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the file as `python jobs/<x>.py --help` would; skips while the CLI lacks the command."""
    out, err = stdio.StringIO(), stdio.StringIO()
    monkeypatch.setattr(sys, "argv", [str(JOBS / f"{job}.py"), "--help"])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(JOBS / f"{job}.py"), run_name="__main__")
    command = JOB_COMMANDS[job]
    if exit_.value.code == 2 and "invalid choice" in err.getvalue():
        pytest.skip(f"`ferray {command[0]}` has no CLI subcommand yet")
    assert exit_.value.code == 0, err.getvalue()
    assert f"usage: ferray {command[0]}" in out.getvalue()
    for option in command[1:]:
        if option not in out.getvalue():
            pytest.skip(f"`ferray {' '.join(command)}`: the CLI has no {option} yet")


# ---------------------------------------------------------------------------------------------
# A real cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Linux: if pytest is killed, the kernel sends `ray start --block` SIGTERM and it takes the
    # cluster down, instead of leaving an orphan holding ports and memory.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class LocalCluster:
    """A head started by this test: where to reach it and the environment its clients need."""

    dashboard_url: str
    gcs_address: str
    temp_dir: str
    token: str
    env: dict[str, str]

    def client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})


def cluster_processes(temp_dir: str) -> list[int]:
    """Pids whose command line names the cluster's temp dir (every Ray process of that cluster)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2, start_timeout_s: float = 60) -> Iterator[LocalCluster]:
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as missing:
        # Without these the head starts a minimal dashboard with no job API at all.
        pytest.fail(f"Ray's job submission API needs ray[default] (missing {missing.name})")
    # Short path: Ray's unix sockets live under it and must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ferray-ray-", dir="/tmp")
    token = secrets.token_hex(32)
    # The session Ray may have put RAY_* (auth mode, address) into this process's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # SIGTERM drains the node for up to 30 s by default; nothing here needs draining.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_USAGE_STATS_ENABLED="0",
        # Job entrypoints say `python`: it must be this virtualenv's, as in an activated shell.
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    gcs_port, dashboard_port = free_port(), free_port()
    command = [
        str(RAY), "start", "--head", "--block", f"--port={gcs_port}", f"--num-cpus={num_cpus}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}", "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=_die_with_parent)
    cluster = LocalCluster(f"http://127.0.0.1:{dashboard_port}", "", temp_dir, token, env)
    try:
        # Up when the job API answers and `ray start` has recorded the GCS address, in the
        # cluster's own temp dir (not /tmp/ray, where a plain `ray.init()` would look).
        address_file = Path(temp_dir) / "ray_current_cluster"
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                cluster.client().list_jobs()
                if address_file.is_file():
                    break
                error: Exception = FileNotFoundError(address_file)
            except Exception as failure:  # not up yet: connection refused, 503 while the head starts
                error = failure
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (Path(temp_dir) / "ray-start.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ray start did not come up ({error}):\n{tail}")
            time.sleep(0.5)
        address = address_file.read_text().strip()
        yield LocalCluster(cluster.dashboard_url, address, temp_dir, token, env)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group this test started, nothing else
            process.wait(timeout=10)
        log.close()
        deadline = time.monotonic() + 15
        while cluster_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job(client: Any, job_id: str, timeout_s: float) -> tuple[str, str]:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            break
        time.sleep(0.5)
    return str(status), client.get_job_logs(job_id)


def stage_counts(out: str, storage: StorageSettings) -> tuple[int, int, dict[str, int]]:
    """(ok rows in the data shards, shards, counts by status from `_stats/`) of a stage output."""
    shards = io.completed_shards(out, storage)
    table = io.read_table(shards, storage, columns=["status"])
    by_status: dict[str, int] = {}
    for stats in io.read_stats(out, storage):
        for status, count in stats["by_status"].items():
            by_status[status] = by_status.get(status, 0) + count
    assert set(table["status"].to_pylist()) <= {"ok"}, "data shards hold ok rows only"
    return table.num_rows, len(shards), by_status


@pytest.fixture(scope="module")
def session_ray(ray_session: None) -> str:
    """The suite's in-process Ray, started before the cluster so the two run side by side."""
    import ray

    return str(ray.get_runtime_context().gcs_address)


def test_jobs_run_on_a_submitted_local_cluster(session_ray: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    started = time.perf_counter()
    out = tmp_path / "out"
    ingested, aligned = out / "ingested", out / "aligned"
    runtime_env = {**yaml.safe_load(RUNTIME_ENV.read_text()), "working_dir": str(REPO)}
    with local_cluster() as cluster:
        up = time.perf_counter() - started
        assert cluster.gcs_address and cluster.gcs_address != session_ray

        # Ingest through the Python SDK, exactly `ferray ingest` on the cluster. The empty address
        # (ferray's default) must join the job's cluster too: Ray sets RAY_ADDRESS for the driver.
        client = cluster.client()
        empty_address = {**runtime_env, "env_vars": {**runtime_env["env_vars"], "FERRAY_RAY__ADDRESS": ""}}
        job_id = client.submit_job(
            entrypoint=f"python jobs/ingest.py fer2013 {SAMPLE_ZIP} {ingested}",
            runtime_env=empty_address,
            submission_id=f"ferray-ingest-{secrets.token_hex(4)}",
        )
        status, logs = wait_for_job(client, job_id, timeout_s=120)
        ingest_s = time.perf_counter() - started - up
        assert status == "SUCCEEDED", logs[-4000:]
        assert "rows in: 35   ok: 35" in logs, logs[-4000:]

        # Align chained on it through the CLI users type, with the README's runtime env file.
        align_id = f"ferray-align-{secrets.token_hex(4)}"
        submit = subprocess.run(
            [str(RAY), "job", "submit", f"--address={cluster.dashboard_url}", f"--submission-id={align_id}",
             f"--runtime-env={RUNTIME_ENV}",
             f"--working-dir={REPO}", "--", "python", "jobs/align.py", str(ingested), str(aligned)],
            env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=180,
        )
        align_s = time.perf_counter() - started - up - ingest_s
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        assert "ferray align:" in submit.stdout and "rows in: 35" in submit.stdout, submit.stdout[-4000:]
        # Quiet in a job too: ferray's runtime env merged into the job's, Ray Data's tables kept off the log.
        for noise in ("Running Dataset", "Execution plan", "Total Progress", "absl::InitializeLog", "cudart_stub"):
            assert noise not in logs and noise not in submit.stdout, (logs + submit.stdout)[-4000:]

        # The session Ray is untouched while the other cluster runs.
        assert ray.get(ray.put("still here")) == "still here"
        # Each job's driver registered with this cluster's GCS: it joined the cluster (empty address
        # and `auto` alike) rather than starting a private Ray inside the job.
        jobs = {job.submission_id: job for job in client.list_jobs()}
        assert jobs[job_id].entrypoint.startswith("python jobs/ingest.py")
        assert jobs[job_id].driver_info is not None and jobs[align_id].driver_info is not None
        temp_dir = cluster.temp_dir

    storage = StorageSettings()
    for stage_out in (ingested, aligned):
        ok_rows, shards, by_status = stage_counts(str(stage_out), storage)
        assert (stage_out / io.MARKERS).is_dir() and shards == 1
        assert ok_rows == by_status.get("ok") == 35 and sum(by_status.values()) == 35, by_status
    assert (aligned / io.META / "align.json").is_file()

    # Stopped, and only it: none of its processes remain, the session's Ray still answers.
    assert cluster_processes(temp_dir) == []
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
    assert ray.get(ray.remote(lambda: "pong").remote()) == "pong"

    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n[test_jobs] real local cluster: up {up:.1f} s, ingest job (SDK) {ingest_s:.1f} s, "
              f"align job (CLI) {align_s:.1f} s, total with stop {elapsed:.1f} s")
