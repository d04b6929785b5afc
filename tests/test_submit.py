"""`atoken submit` against a real two-node Ray cluster on this machine, and node loss during preprocessing.

The cluster is two `ray start` nodes (a head with a `train` resource, a worker with a `render` resource) in a
network namespace the test creates, holding only a loopback interface: Ray's processes and the client talk over
127.0.0.1 and nothing else. Every process the test starts is killed by its process group at the end.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import QUICKSTART, REPO, run_cli

VENV_BIN = Path(sys.executable).parent
HEAD_GCS_PORT, HEAD_DASHBOARD_PORT = 46379, 48265
SHARD_TASKS = ("write_part",)  # the Ray task of every preprocessing job (preprocess/job.py)


def tiny(config_path: Path) -> list[str]:
    """Overrides that shrink every stage of the config to a few steps and items (the fields it has of these):
    what is tested here is where and how the work runs, not what it learns."""
    from atoken.pipeline.config import load_config

    config = load_config(config_path)
    wanted = {"ingest.samples_per_shard": 20, "videos.max_clips": 1, "evaluate.max_samples": 8, "objects.limit": 2}
    for index, _ in enumerate(config.ingest.sources):
        wanted[f"ingest.sources.{index}.limit"] = 40
    for index, _ in enumerate(config.train.stages):
        for name, value in {"steps": 2, "warmup_steps": 1, "checkpoint_every": 2, "batch_size": 4}.items():
            wanted[f"train.stages.{index}.{name}"] = value
    overrides = [f"{key}={value}" for key, value in wanted.items() if _has_field(config, key)]
    # The two pools: preprocessing asks for the worker's `render`, training for the head's `train`.
    overrides += ["ray.preprocess_resources={render: 1}", "ray.train_resources={train: 1}"]
    return [arg for override in overrides for arg in ("--set", override)]


def _has_field(config, dotted: str) -> bool:
    node = config
    for key in dotted.split("."):
        node = node[int(key)] if key.isdigit() else getattr(node, key, _has_field)
        if node is _has_field:
            return False
    return True


class LoopbackCluster:
    """Ray nodes started with `ray start`, each in its own process group, in one loopback-only network
    namespace (`ip netns`); without the rights to make one, on the host's own addresses."""

    def __init__(self, root: Path):
        self.root = root
        self.token = root / "auth_token"
        # Token auth as a real cluster runs it (Ray turns it on whenever ~/.ray/auth_token exists), with a
        # token of the test's own.
        self.token.write_text(secrets.token_hex(32))
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))
        }
        self.env |= {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token),
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.netns = f"atoken-test-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            made = subprocess.run(["ip", "netns", "add", self.netns], capture_output=True).returncode == 0
        except FileNotFoundError:  # no iproute2
            made = False
        if made:
            subprocess.run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"], check=True)
            self.prefix = ["ip", "netns", "exec", self.netns]
        else:
            self.netns, self.prefix = None, []
        self.groups: dict[str, int] = {}
        self.dashboard = f"http://127.0.0.1:{HEAD_DASHBOARD_PORT}"

    def start_node(self, name: str, resources: dict[str, int], head: bool = False) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        args = [
            "ray",
            "start",
            "--num-cpus=1",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp_dir}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={HEAD_DASHBOARD_PORT + 1 + len(self.groups)}",
        ]
        if head:
            args += [
                "--head",
                f"--port={HEAD_GCS_PORT}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={HEAD_DASHBOARD_PORT}",
                f"--ray-client-server-port={HEAD_GCS_PORT + 1}",
            ]
        else:
            args += [f"--address=127.0.0.1:{HEAD_GCS_PORT}"]
        log = open(self.root / f"{name}.start.log", "w")  # noqa: SIM115 - kept open for the daemon's lifetime
        # A session of its own: `ray start` and every daemon it leaves behind share its process group.
        process = subprocess.Popen(
            [*self.prefix, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.groups[name] = process.pid
        if process.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{(self.root / f'{name}.start.log').read_text()[-3000:]}")

    def run(self, args: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.prefix, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    def popen(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [*self.prefix, *args],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def state(self, kind: str) -> list[dict]:
        """Ray's state API (`list_nodes`, `list_tasks`, `list_actors`), asked from inside the namespace."""
        script = (
            f"import json; from ray.util import state; print(json.dumps([dict(vars(x)) for x in "
            f"state.list_{kind}(address={self.dashboard!r}, limit=10000, detail=True)], default=str))"
        )
        result = self.run([sys.executable, "-c", script], timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def kill_node(self, name: str) -> None:
        """SIGKILL a node: its daemons (one process group) and the workers its raylet started."""
        group = self.groups.pop(name)
        victims = _descendants({pid for pid, pgid in _processes().items() if pgid == group})
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for name in list(self.groups):
            self.kill_node(name)
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def _processes() -> dict[int, int]:
    """pid → process group of every process now running."""
    groups = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                groups[int(entry.name)] = os.getpgid(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return groups


def _descendants(roots: set[int]) -> set[int]:
    """`roots` and every process below them (Ray's workers start sessions of their own under the raylet)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children[int(fields[1])].append(int(entry.parent.name))
    found, frontier = set(roots), list(roots)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


@pytest.fixture
def cluster():
    # Short: Ray's unix sockets live under the temp dir and their paths are capped at 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="atk-", dir="/tmp"))
    cluster = LoopbackCluster(root)
    try:
        cluster.start_node("head", {"train": 1}, head=True)
        cluster.start_node("render1", {"render": 1})
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_the_quickstart_on_two_nodes_each_pool_doing_its_part(cluster, tmp_path):
    runs, local = tmp_path / "runs", tmp_path / "local"
    command = ["atoken", "submit", str(QUICKSTART.relative_to(REPO)), "--address", cluster.dashboard,
               "--set", f"run.root={runs}", "--set", f"run.local_dir={local}", *tiny(QUICKSTART)]  # fmt: skip
    started = time.perf_counter()
    result = cluster.run(command, timeout=780)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    job_id = re.search(r"atoken: submitted job (\S+) to ", output)[1]
    parent = re.search(rf"atoken: job {job_id}: MLflow parent run ([0-9a-f]{{32}})", output)[1]
    assert f"atoken: job {job_id}: SUCCEEDED" in output
    print(f"quickstart submitted and finished in {seconds:.1f} s")

    # The run is a real one, tracked where the config says (sqlite under run.local_dir on the head).
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{local / 'mlflow.db'}")
    assert client.get_run(parent).info.status == "FINISHED"
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert {run.info.run_name for run in children} >= {"ingest", "ingest_videos", "train_stage1", "evaluate"}
    assert all(run.info.status == "FINISHED" for run in children)
    assert next(runs.glob("evaluate/*/metrics.json")).is_file()

    # Placement: preprocessing (images, videos, 3D renders) ran on the render node only, training on the
    # train node only.
    resources_of = {node["node_id"]: node["resources_total"] for node in cluster.state("nodes")}
    render_nodes = {node for node, resources in resources_of.items() if "render" in resources}
    train_nodes = {node for node, resources in resources_of.items() if "train" in resources}
    shard_tasks = [task for task in cluster.state("tasks") if task["name"] in SHARD_TASKS]
    assert shard_tasks and {task["node_id"] for task in shard_tasks} == render_nodes
    train_workers = [actor for actor in cluster.state("actors") if actor["class_name"] == "RayTrainWorker"]
    assert train_workers and {actor["node_id"] for actor in train_workers} == train_nodes

    # The other faces of the command: status (with the MLflow run read back from the logs), logs.
    status = cluster.run(["atoken", "submit", "--status", job_id, "--address", cluster.dashboard])
    assert status.returncode == 0, status.stderr
    described = json.loads(status.stdout)
    assert described["status"] == "SUCCEEDED" and described["mlflow_parent_run"] == parent
    logs = cluster.run(["atoken", "submit", "--logs", job_id, "--address", cluster.dashboard])
    assert f"MLflow parent run {parent}" in logs.stdout


@pytest.mark.slow
def test_losing_the_render_node_mid_preprocessing_loses_and_duplicates_nothing(cluster, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(240):
        Image.fromarray(rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)).save(images / f"im_{index:04d}.png")
    # Every task of the job asks for `render`, which only the worker node has: all of them run there.
    command = ["atoken", "submit", "--address", cluster.dashboard, "--no-wait", "--", "preprocess", "images",
               str(images), str(out), "--resolution", "256", "--samples-per-shard", "6",
               "--resources", '{"render": 1}']  # fmt: skip
    submitted = cluster.run(command)
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-6000:]
    job_id = re.search(r"atoken: submitted job (\S+) to ", submitted.stdout)[1]

    # Kill the render node once it has committed a few parts (their records), long before the job writes its
    # manifest, while the next parts are in flight.
    deadline = time.monotonic() + 300
    while len(list((out / "parts").glob("*.parquet"))) < 2:
        assert time.monotonic() < deadline, cluster.run(["atoken", "submit", "--logs", job_id, "--address",
                                                         cluster.dashboard]).stdout[-4000:]  # fmt: skip
        time.sleep(0.05)
    assert not (out / "manifest.parquet").exists(), "the job finished before the kill: make it bigger"
    cluster.kill_node("render1")
    # What an autoscaler does: a fresh render node joins, and the retried tasks run there.
    cluster.start_node("render2", {"render": 1})

    followed = cluster.run(["atoken", "submit", "--follow", job_id, "--address", cluster.dashboard])
    assert followed.returncode == 0, (followed.stdout + followed.stderr)[-6000:]
    assert f"atoken: job {job_id}: SUCCEEDED" in followed.stdout

    from atoken.pipeline.storage import Storage
    from atoken.preprocess.sources import list_folder
    from atoken.preprocess.writer import shard_uri
    from atoken.train.data import read_shard

    expected = sorted(item.key for item in list_folder(str(images)))
    manifest = pq.read_table(io.BytesIO((out / "manifest.parquet").read_bytes())).to_pylist()
    assert sorted(row["key"] for row in manifest) == expected
    assert pq.read_table(io.BytesIO((out / "errors.parquet").read_bytes())).num_rows == 0
    in_shards = collections.Counter(
        sample["__key__"]
        for shard in sorted({row["shard"] for row in manifest})
        for sample in read_shard(Storage(), shard_uri(str(out), shard))
    )
    assert sorted(in_shards) == expected and set(in_shards.values()) == {1}

    # The kill did hit work in flight: some task attempts died with the node and were run again.
    attempts = [task for task in cluster.state("tasks") if task["name"] in SHARD_TASKS]
    assert any(task["state"] == "FAILED" for task in attempts), "no task was running on the killed node"
    assert any(task["attempt_number"] > 0 and task["state"] == "FINISHED" for task in attempts)

    # A job can be stopped too: the same work again, stopped as soon as it is submitted.
    command[command.index(str(out))] = str(tmp_path / "out-stopped")
    again = cluster.run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    stopped_id = re.search(r"atoken: submitted job (\S+) to ", again.stdout)[1]
    stop = cluster.run(["atoken", "submit", "--stop", stopped_id, "--address", cluster.dashboard])
    assert stop.returncode == 0 and stop.stdout.strip() == f"atoken: job {stopped_id}: STOPPED", stop.stdout
    status = cluster.run(["atoken", "submit", "--status", stopped_id, "--address", cluster.dashboard])
    assert json.loads(status.stdout)["status"] == "STOPPED"
    assert not (tmp_path / "out-stopped" / "manifest.parquet").exists()


# Fast checks: what `atoken submit` refuses before it contacts any cluster, and the config it relies on.


def test_submit_refuses_a_relative_run_root_before_contacting_a_cluster():
    result = run_cli(["submit", str(QUICKSTART), "--address", "http://127.0.0.1:9"], cwd=REPO)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("atoken: config error: run.root: 'runs/quickstart' is relative")


def test_submit_refuses_a_config_that_would_not_travel_with_the_job(tmp_path):
    outside = tmp_path / "quickstart.yaml"
    shutil.copyfile(QUICKSTART, outside)
    result = run_cli(["submit", str(outside), "--address", "http://127.0.0.1:9"], cwd=REPO)
    assert result.returncode == 2 and "is outside the working dir" in result.stderr
    bad = run_cli(["submit", str(QUICKSTART.relative_to(REPO)), "--set", "train.stages.0.steps=ten"], cwd=REPO)
    assert bad.returncode == 2 and "train.stages[0].steps: expected an integer" in bad.stderr


def test_ray_resources_are_typed_mappings_checked_field_by_field():
    from atoken.pipeline.config import ConfigError, load_config

    config = load_config(QUICKSTART, ["ray.preprocess_resources.render=1", "ray.train_resources={train: 0.5}"])
    assert config.ray.preprocess_resources == {"render": 1.0} and config.ray.train_resources == {"train": 0.5}
    assert load_config(QUICKSTART).ray.train_resources == {}  # a laptop run asks for nothing special
    with pytest.raises(ConfigError, match=r"^ray.preprocess_resources.render: must be > 0"):
        load_config(QUICKSTART, ["ray.preprocess_resources.render=0"])
    with pytest.raises(ConfigError, match=r"^ray.train_resources: expected a mapping"):
        load_config(QUICKSTART, ["ray.train_resources=[train]"])
    with pytest.raises(ConfigError, match=r"^ray.train_resources.train: expected a number"):
        load_config(QUICKSTART, ["ray.train_resources.train=many"])


def test_the_job_command_survives_the_shell_and_its_parent_run_is_read_back():
    import shlex

    from atoken.pipeline.submit import entrypoint_for, parent_run_from_logs

    overrides = ["ingest.sources=[{kind: folder, path: /data/my photos}]", "ray.train_resources={train: 1}"]
    command = shlex.split(entrypoint_for("configs/quickstart.yaml", overrides))
    assert command[:5] == ["atoken", "run", "configs/quickstart.yaml", "--no-progress", "--verbose"]
    assert [command[i + 1] for i, arg in enumerate(command) if arg == "--set"] == overrides
    logs = "noise\natoken: MLflow parent run 0123456789abcdef0123456789abcdef at sqlite:////x/mlflow.db\nmore"
    assert parent_run_from_logs(logs) == "0123456789abcdef0123456789abcdef"
    assert parent_run_from_logs("atoken: run 'quickstart'") is None
