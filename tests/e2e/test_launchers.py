"""Launchers as users run them: `ray job submit` against a real head started here on 127.0.0.1 (Ray 2.60 token
auth on, as by default), and the SLURM script in dry-run mode on a fake 2-node allocation."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_processes(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
    return [int(pid) for pid, s in (line.split() for line in out if line.strip()) if int(s) == sid]


@pytest.fixture
def ray_head():
    """A Ray head with the dashboard (job server) on loopback and token auth on (~/.ray/auth_token made if
    missing), in a session of its own; stopped by killing that session's processes (never `ray stop`, which would
    kill every Ray process on the machine). Every port is free-picked so a head from an earlier test can never
    collide. Yields the job server's address, the GCS port, the dashboard port and the environment."""
    temp_dir = tempfile.mkdtemp(prefix="orlhead-", dir="/tmp")   # short: Ray's socket paths have a length limit
    dashboard, gcs = free_port(), free_port()
    subprocess.run([f"{VENV_BIN}/ray", "get-auth-token", "--generate"], capture_output=True, check=True)
    ports = [f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("RAY_AUTH_MODE", None)
    starter = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", *ports,
         "--num-cpus=5", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = starter.communicate(timeout=120)
    try:
        assert starter.returncode == 0, err[-2000:]
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs_port": gcs, "dashboard_port": dashboard, "env": env}
    finally:
        for _ in range(3):
            for pid in session_processes(starter.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_job_on_the_cluster(ray_head, model_cache, tiny_model, tmp_path):
    address, env = ray_head["address"], ray_head["env"]
    out_dir = tmp_path / "job-run"
    env = dict(env, OPENRLAIF_CACHE=model_cache)
    job = subprocess.run(
        ["bash", "launchers/ray_job.sh", "--address", address, "--env", "OPENRLAIF_TEST_MARK=from-launcher", "--",
         "model=tiny", "feedback=function", "steps=1", "rollout.engine=hf", "rollout.max_new_tokens=8",
         f"output.dir={out_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower()
    assert (out_dir / "metrics.jsonl").read_text().count("\n") == 1
    assert (out_dir / "checkpoint" / "model.safetensors").is_file()
    assert "address: auto" in (out_dir / "config.yaml").read_text()   # joined the cluster, did not start its own


def test_ray_job_submit_without_a_cluster_fails_clearly(tmp_path):
    job = subprocess.run(["bash", "launchers/ray_job.sh", "--address", f"http://127.0.0.1:{free_port()}", "--",
                          "model=tiny"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}"))
    assert job.returncode != 0
    assert "error: no Ray cluster answers at http://127.0.0.1:" in job.stderr and "--address" in job.stderr


def test_ray_job_launcher_dry_run_and_bad_options():
    dry = subprocess.run(["bash", "launchers/ray_job.sh", "--dry-run", "--env", "A=1", "--", "steps=3"], cwd=ROOT,
                         capture_output=True, text=True)
    assert dry.returncode == 0 and "ray job submit" in dry.stdout and "cluster.address=auto" in dry.stdout
    assert "output.dir=" in dry.stdout and '"A": "1"' in dry.stdout.replace("\\", "")
    bad = subprocess.run(["bash", "launchers/ray_job.sh", "--nonsense"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
    assert subprocess.run(["bash", "-n", "launchers/ray_job.sh"]).returncode == 0


def fake_slurm(tmp_path) -> dict:
    """Stub scontrol/srun on PATH and the SLURM_* variables of a 2-node allocation with 4 GPUs per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && printf "gpu-a01\\ngpu-a02\\n"\n')
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/srun.calls\n'
                                  'if [[ " $* " == *" hostname --ip-address"* ]]; then echo "10.1.2.3 fe80::1"; fi\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32",
                OPENRLAIF_DRY_RUN="1", OPENRLAIF_LOG_DIR=str(tmp_path / "logs"))


def test_slurm_script_dry_run_on_a_fake_two_node_allocation(tmp_path):
    env = fake_slurm(tmp_path)
    out = subprocess.run(["bash", "launchers/slurm/openrlaif.sbatch", "algorithm=grpo", "steps=10"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.replace("\\", "").splitlines()   # printf %q escapes; compare the plain words
    assert "2 nodes (gpu-a01 gpu-a02), head gpu-a01 at 10.1.2.3:6379, 4 GPUs and 32 CPUs per node" in out.stdout
    head = next(line for line in lines if "--head" in line)
    assert "-w gpu-a01" in head and "--node-ip-address=10.1.2.3" in head and "--num-gpus=4" in head
    assert "--dashboard-host=127.0.0.1" in head and f"--output={tmp_path}/logs/ray-gpu-a01.log" in head
    worker = next(line for line in lines if "--address=10.1.2.3:6379" in line)
    assert "-w gpu-a02" in worker and "--num-cpus=32" in worker and "ray-gpu-a02.log" in worker
    assert any("wait until 2 nodes are alive" in line for line in lines)
    submit = lines[-1]
    assert "launchers/ray_job.sh --address http://127.0.0.1:8265 -- algorithm=grpo steps=10" in submit
    assert "hostname --ip-address" in (tmp_path / "srun.calls").read_text()   # the only command really run


def test_slurm_script_container_options_and_outside_an_allocation(tmp_path):
    env = fake_slurm(tmp_path) | {"OPENRLAIF_CONTAINER": "/images/openrlaif.sqsh", "OPENRLAIF_MOUNTS": "/data:/data"}
    out = subprocess.run(["bash", "launchers/slurm/openrlaif.sbatch"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--container-image=/images/openrlaif.sqsh") == 3   # head, worker, submit
    assert f"--container-mounts={ROOT}:{ROOT},/data:/data" in out.stdout.replace("\\", "")
    env = fake_slurm(tmp_path) | {"OPENRLAIF_APPTAINER": "/images/o.sif"}
    out = subprocess.run(["bash", "launchers/slurm/openrlaif.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.count("apptainer exec --nv") == 3
    env.pop("SLURM_JOB_ID")
    env.pop("OPENRLAIF_LOG_DIR")
    outside = subprocess.run(["bash", "launchers/slurm/openrlaif.sbatch"], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert outside.returncode != 0 and "inside a SLURM allocation" in outside.stderr
    assert subprocess.run(["bash", "-n", "launchers/slurm/openrlaif.sbatch"]).returncode == 0


def local_slurm(tmp_path, ray_head, home: str) -> dict:
    """A one-node allocation whose srun runs its command here, so the sbatch script joins the real token-auth head
    of `ray_head` (which stands in for the head the script would start: `ray start` itself is skipped)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && echo node-a01\n')
    (bin_dir / "srun").write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/srun.calls\n'
        'while [[ $# -gt 0 ]]; do case "$1" in -w) shift 2 ;; --*) shift ;; *) break ;; esac; done\n'
        'if [[ "$*" == "hostname --ip-address" ]]; then echo 127.0.0.1; exit 0; fi\n'
        'if [[ "$*" == *"ray start"* ]]; then exit 0; fi\n'
        'exec "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return env | {"PATH": f"{bin_dir}:{VENV_BIN}:{os.environ['PATH']}", "HOME": home, "SLURM_JOB_ID": "77",
                  "SLURM_JOB_NODELIST": "node-a01", "SLURM_CPUS_PER_TASK": "2",
                  "OPENRLAIF_LOG_DIR": str(tmp_path / "logs"),
                  "RAY_PORT": str(ray_head["gcs_port"]), "DASHBOARD_PORT": str(ray_head["dashboard_port"])}


def test_slurm_script_joins_a_token_auth_cluster_and_runs_the_job(ray_head, model_cache, tiny_model, tmp_path):
    """Run for real against a head with token auth (Ray 2.60's default): the script exports RAY_AUTH_MODE=token
    because ~/.ray/auth_token exists, so its join check (and the job submission) authenticate. Without the token
    file the join fails, and the error says why (AuthenticationError) instead of only "0 of 1 nodes joined"."""
    env = local_slurm(tmp_path, ray_head, os.environ["HOME"]) | {"OPENRLAIF_CACHE": model_cache,
                                                                 "JOIN_TIMEOUT_S": "60"}
    out_dir = tmp_path / "slurm-run"
    job = subprocess.run(["bash", "launchers/slurm/openrlaif.sbatch", "model=tiny", "feedback=function", "steps=1",
                          "rollout.engine=hf", "rollout.max_new_tokens=8", f"output.dir={out_dir}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-4000:]
    assert "all 1 nodes joined" in logs and (out_dir / "checkpoint" / "model.safetensors").is_file()

    home = tmp_path / "home-without-token"
    home.mkdir()
    env = local_slurm(tmp_path, ray_head, str(home)) | {"JOIN_TIMEOUT_S": "8"}
    failed = subprocess.run(["bash", "launchers/slurm/openrlaif.sbatch", "steps=1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert "only 0 of 1 nodes joined" in failed.stderr and "Authentication" in failed.stderr, failed.stderr[-3000:]
