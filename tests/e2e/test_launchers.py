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
        'if [[ "$*" == *"ray start"* ]]; then exec sleep 600; fi\n'
        'exec "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return env | {"PATH": f"{bin_dir}:{VENV_BIN}:{os.environ['PATH']}", "HOME": home, "SLURM_JOB_ID": "77",
                  "SLURM_JOB_NODELIST": "node-a01", "SLURM_CPUS_PER_TASK": "2",
                  "OPENRLAIF_LOG_DIR": str(tmp_path / "logs"),
                  "RAY_PORT": str(ray_head["gcs_port"]), "DASHBOARD_PORT": str(ray_head["dashboard_port"])}


def test_slurm_script_without_the_token_fails_naming_the_authentication_error(ray_head, tmp_path):
    """Against a head with token auth (Ray 2.60's default) and no token file: the join fails, and the error says
    why (AuthenticationError) instead of only "0 of 1 nodes joined". (The job itself runs under real Slurm below.)"""
    home = tmp_path / "home-without-token"
    home.mkdir()
    env = local_slurm(tmp_path, ray_head, str(home)) | {"JOIN_TIMEOUT_S": "8"}
    failed = subprocess.run(["bash", "launchers/slurm/openrlaif.sbatch", "steps=1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert "only 0 of 1 nodes joined" in failed.stderr and "Authentication" in failed.stderr, failed.stderr[-3000:]


SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")


@pytest.fixture
def slurm_cluster(tmp_path):
    """Real Slurm daemons on this host (Debian's slurmctld, slurmd and munge; `.ci/run` installs them): munged
    on its own socket and key, a controller, and two node daemons n1 and n2 of 2 CPUs each on loopback, every
    port free-picked and every state, spool and log file under a temp dir. Yields the environment for sbatch."""
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here ({', '.join(missing)} missing): this test runs the sbatch script "
                    "under real Slurm daemons. Install them with `apt-get install -y --no-install-recommends "
                    "slurmctld slurmd slurm-client munge` (as .ci/run does).")
    if os.geteuid() != 0:
        pytest.skip("the Slurm test starts slurmd, which runs jobs as their users: it needs root (CI runs as root).")
    base = tempfile.mkdtemp(prefix="orlslurm-", dir="/tmp")
    os.chmod(base, 0o755)
    for sub in ("munge", "state", "log", "spool/n1", "spool/n2", "ray-n2"):
        os.makedirs(os.path.join(base, sub))
    key = os.path.join(base, "munge", "munge.key")
    with open(key, "wb") as handle:
        handle.write(os.urandom(128))
    os.chmod(key, 0o600)
    socket_path = os.path.join(base, "munge", "socket")
    host = socket.gethostname()
    conf = os.path.join(base, "slurm.conf")
    ports = [free_port() for _ in range(3)]
    with open(conf, "w") as handle:
        handle.write("\n".join([
            "ClusterName=openrlaif-test", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ports[0]}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
            f"StateSaveLocation={base}/state", f"SlurmdSpoolDir={base}/spool/%n",
            f"SlurmctldPidFile={base}/slurmctld.pid", f"SlurmdPidFile={base}/slurmd-%n.pid",
            f"SlurmctldLogFile={base}/log/slurmctld.log", f"SlurmdLogFile={base}/log/slurmd-%n.log",
            f"NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]} CPUs=2 RealMemory=4000",
            f"NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[2]} CPUs=2 RealMemory=4000",
            "PartitionName=debug Nodes=n1,n2 Default=YES State=UP", ""]))
    env = dict(os.environ, SLURM_CONF=conf, PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    daemons = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                start_new_session=True) for command in (
        ["munged", "-F", "--force", f"--socket={socket_path}", f"--key-file={key}",
         f"--pid-file={base}/munge/pid", f"--log-file={base}/munge/log", f"--seed-file={base}/munge/seed"],)]
    try:
        time.sleep(1)
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", conf], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True))
        time.sleep(1)
        for node in ("n1", "n2"):
            daemons.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", conf], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            idle = subprocess.run(["sinfo", "-h", "-o", "%D %t"], env=env, capture_output=True, text=True).stdout
            if idle.strip() == "2 idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the Slurm nodes did not come up: sinfo says {idle!r}; logs in {base}/log")
        yield {"env": env, "base": base}
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for daemon in reversed(daemons):
            for pid in session_processes(daemon.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(base, ignore_errors=True)


def test_slurm_script_runs_a_two_node_job_under_real_slurm(slurm_cluster, model_cache, tmp_path):
    """`sbatch --nodes=2 launchers/slurm/openrlaif.sbatch ...` under real daemons: the script starts a Ray head on
    n1 and a worker on n2 (both this host: own ports, the worker its own temp dir), waits for both, submits the job,
    and the run, whose actor needs a worker on each node (STRICT_SPREAD), trains to its checkpoint."""
    base, run_dir = slurm_cluster["base"], tmp_path / "slurm-job"
    run_dir.mkdir()
    head_args = " ".join(f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "ray-client-server-port"))
    worker_args = f"--temp-dir={base}/ray-n2 " + " ".join(f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"))
    env = {k: v for k, v in slurm_cluster["env"].items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}   # 0 = one node
    env |= {"RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()),
            "RAY_HEAD_ARGS": head_args, "RAY_WORKER_ARGS": worker_args, "OPENRLAIF_CACHE": model_cache,
            "JOIN_TIMEOUT_S": "90"}
    out_dir = run_dir / "out"
    job = subprocess.run(
        ["sbatch", "--nodes=2", "--cpus-per-task=2", "--gpus-per-node=0", "--wait", f"--output={run_dir}/job.out",
         os.path.join(ROOT, "launchers", "slurm", "openrlaif.sbatch"), "model=tiny", "feedback=function", "steps=1",
         "rollout.engine=hf", "rollout.max_new_tokens=8", "data.prompts_per_step=2", "rollout.samples_per_prompt=2",
         "actor.micro_batch_size=2", "actor.resources.num_workers=2", "actor.resources.strategy=STRICT_SPREAD",
         f"output.dir={out_dir}"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    log = (run_dir / "job.out").read_text() if (run_dir / "job.out").exists() else ""
    assert job.returncode == 0, (job.stdout + job.stderr + log)[-4000:]
    assert "2 nodes (n1 n2), head n1 at 127.0.0.1" in log and "all 2 nodes joined" in log
    assert "succeeded" in log.lower()
    assert (out_dir / "metrics.jsonl").read_text().count("\n") == 1
    assert (out_dir / "checkpoint" / "model.safetensors").is_file()
