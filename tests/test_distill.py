"""Distilling a K-step Refiner into a few-step student (issue 25, "Few steps"; surf_train.training.distill): the
student starts as the teacher, learns its K-step output in fewer steps, the teacher stays frozen and out of the
checkpoints, the export records the student's K with the teacher's start noise, and a resume is exact."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from test_resume_exact import _assert_same_weights, _weights
from test_train import FAST, SHRINK, compose_cfg

from surf_train import ASSETS_DIR
from surf_train.__main__ import user_error
from surf_train.common.errors import ConfigError
from surf_train.data.shards import read_shards
from surf_train.models.loading import load_refiner
from surf_train.models.refiner import Refiner, refiner_config
from surf_train.models.sampler import RefinerSampler
from surf_train.training.checkpoint import read_checkpoint
from surf_train.training.distill import distill_loss, provenance
from surf_train.training.export import export, save_refiner
from surf_train.training.module import RefinerModule
from surf_train.training.train import train

# the SHRINK model on the pairs fixture's 16-channel latents and 32-wide text
MODEL = {"preset": "tiny", "dim": 32, "depth": 2, "heads": 2, "text_dim": 32, "window": [2, 4, 4], "mlp_ratio": 2.0}
MODEL["in_channels"] = 16
TEACHER_BRIDGE = {"steps": 4, "sigma_aug_eval": 0.5, "noise_space": "detail", "sigma_aug_max": 1.0}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny K = 4 teacher export: random weights moved off the zero-initialised output (so its velocity is not
    0) by 0.1 x unit noise; its 1-step output is 0.18 from its 4-step one in MSE, against 0.79 from the start."""
    torch.manual_seed(0)
    net = Refiner.from_cfg(refiner_config(MODEL))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    return save_refiner(net.state_dict(), net.cfg, out, bridge=TEACHER_BRIDGE, step=0, weights="raw")


def _fn(net):
    return lambda x, t, c, txt, **kw: net(x, t, c, txt, return_dict=False)[0]


def _batch(pairs, n=4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(preview, target, text) of the first n pairs of the fixture's shards."""
    samples = [s for _, s in zip(range(n), read_shards(sorted(pairs.glob("*.tar"))))]
    text = torch.nn.utils.rnn.pad_sequence([s["text"] for s in samples], batch_first=True)
    stack = [torch.stack([s[k] for s in samples]).float() for k in ("preview", "target")]
    return *stack, text.float()


def _gap(student, teacher_net, pairs, steps=1) -> float:
    """MSE between the student's `steps` and the teacher's 4 Euler steps from the same start points."""
    preview, target, text = _batch(pairs)
    sampler = RefinerSampler.from_bridge(TEACHER_BRIDGE)
    with torch.no_grad():
        return float(distill_loss(_fn(student), _fn(teacher_net), sampler, steps, preview, target, text, _gen()))


def _gen():
    return torch.Generator().manual_seed(7)


def _distill(teacher, pairs, run_dir, max_steps, extra=(), **distill):
    """train() with module.distill = {teacher, **distill} on the pairs fixture, the SHRINK model."""
    node = ", ".join(f"{k}: {v!r}" for k, v in {"teacher": str(teacher), **distill}.items())
    over = [f"data.shards={pairs}", f"run_dir={run_dir}", f"trainer.max_steps={max_steps}", *SHRINK, *FAST]
    return train(compose_cfg([*over, f"module.distill={{{node}}}", *extra]))


def test_student_starts_as_the_teacher_with_its_sampler(teacher, pairs):
    """The student (and its EMA) is the teacher's weights; its bridge is the teacher's sampler with K = 1; at init
    its 1 step is not the teacher's 4 (there is something to distil)."""
    m = RefinerModule(model=MODEL, distill={"teacher": str(teacher)}, ema_decay=0.9)
    t_net, meta = load_refiner(teacher)
    for state in (m.net.state_dict(), m.ema.module.state_dict()):
        assert state.keys() == t_net.state_dict().keys()
        assert all(torch.equal(v, t_net.state_dict()[k]) for k, v in state.items())
    assert m.bridge.steps == 1 and m.hparams["bridge"]["steps"] == 1
    assert m.bridge.sampler() == RefinerSampler.from_bridge(meta["bridge"]).override(steps=1)
    assert not any(n.startswith("teacher") for n, _ in m.named_parameters())
    assert _gap(m.net, t_net, pairs) > 0.1


@pytest.mark.parametrize("steps", [1, 2])
def test_distill_loss_starts_where_the_teacher_sampler_does(teacher, pairs, steps):
    """The start point is the teacher sampler's own draw: a student with the teacher's weights and K gives loss 0
    exactly, and the target the loss uses is sampler.refine's output with the same generator."""
    net, _ = load_refiner(teacher)
    preview, target, text = _batch(pairs)
    sampler = RefinerSampler.from_bridge(TEACHER_BRIDGE)
    assert distill_loss(_fn(net), _fn(net), sampler, 4, preview, target, text, _gen()) == 0
    want = sampler.refine(_fn(net), sampler.upsample(preview, target.shape[-2:]), preview, text, _gen())
    up = sampler.upsample(preview, target.shape[-2:])
    got = sampler.override(steps=steps).refine(_fn(net), up, preview, text, _gen())
    loss = distill_loss(_fn(net), _fn(net), sampler, steps, preview, target, text, _gen(), gt_weight=0.5)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(got, want) + 0.5 * ((got - target) ** 2).mean())


@pytest.fixture(scope="module")
def distilled(teacher, pairs, tmp_path_factory):
    """A 40-step 1-step distillation; returns (summary, run_dir, the module as training left it)."""
    run = tmp_path_factory.mktemp("distilled")
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RefinerModule, "on_fit_end", lambda self: seen.append(self), raising=False)
        s = _distill(teacher, pairs, run, 40, ["module.optim.warmup_steps=2", "data.val_samples=4", "ckpt_every=40"])
    return s, run, seen[0]


def test_distillation_brings_the_student_to_the_teacher(distilled, teacher, pairs):
    s, run, module = distilled
    t_net, _ = load_refiner(teacher)
    before = _gap(t_net, t_net, pairs)
    after = _gap(module.net.eval(), t_net, pairs)
    assert s["train_loss_last"] < 0.7 * s["train_loss_first"]
    assert after < 0.25 * before, (before, after)  # 0.177 -> 0.009 (measured)
    assert s["val_mse_to_teacher"] is not None and s["val_mse_to_teacher"] < before


def test_the_teacher_stays_frozen_and_out_of_the_checkpoint(distilled, teacher):
    s, run, module = distilled
    t_net, _ = load_refiner(teacher)
    assert not module.teacher.net.training and not any(p.requires_grad for p in module.teacher.net.parameters())
    for k, v in t_net.state_dict().items():
        assert torch.equal(module.teacher.net.state_dict()[k], v), k
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith("net.") for k in ck["state_dict"])
    n_student = len(list(module.net.parameters()))
    assert len(ck["optimizer_states"][0]["state"]) == n_student
    assert sum(len(g["params"]) for g in ck["optimizer_states"][0]["param_groups"]) == n_student


def test_the_export_records_the_students_k_and_the_teachers_start_noise(distilled, teacher, pairs, tmp_path):
    """No flag: the export's sampler is the student's (K = 1) with the teacher's start noise and noise space."""
    s, run, module = distilled
    out = export(run / "checkpoints" / "last.ckpt", tmp_path / "student")
    meta = json.loads((out / "surf.json").read_text())
    assert {k: meta["bridge"][k] for k in TEACHER_BRIDGE} == {**TEACHER_BRIDGE, "steps": 1}
    assert meta["distilled_from"] == {"teacher": "teacher", "steps": 1, "gt_weight": 0.0}  # a local path: its name
    sampler = RefinerSampler.from_bridge(meta["bridge"])
    assert (sampler.steps, sampler.start_noise, sampler.noise_space) == (1, 0.5, "detail")
    assert "| distilled from | `teacher`, into 1 step(s)" in (out / "README.md").read_text()
    net, _ = load_refiner(out)
    assert all(torch.equal(v, module.net.state_dict()[k]) for k, v in net.state_dict().items())


def test_a_resumed_distillation_continues_exactly(teacher, pairs, tmp_path, caplog):
    """8 steps straight against 4 + 4 (a 2-step student, a ground-truth weight, EMA 0.5): the same student weights
    and EMA, so the start noise came from (seed, rank, step, batch) and the teacher reloaded from its path."""
    extra = ["module.ema_decay=0.5", "data.val_samples=0", "ckpt_every=4", "module.optim.warmup_steps=2"]
    extra.append("module.optim.decay=constant")  # a cosine would decay over max_steps: 4 in the first half
    student = {"steps": 2, "gt_weight": 0.1}
    assert _distill(teacher, pairs, tmp_path / "straight", 8, extra, **student)["steps"] == 8
    assert _distill(teacher, pairs, tmp_path / "resumed", 4, extra, **student)["steps"] == 4
    with caplog.at_level("WARNING", logger="surf_train.training.module"):
        s = _distill(teacher, pairs, tmp_path / "resumed", 8, extra, **student)
    assert s["steps"] == 8 and s["resumed_from"].endswith("last.ckpt")
    assert not [r for r in caplog.records if "distils another one" in r.getMessage()]  # the same teacher
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))
    hp = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")[1]
    assert hp["bridge"]["steps"] == 2 and hp["distill"]["teacher"] == str(teacher)


def test_a_teacher_with_kind_condition_and_its_student_are_told_each_samples_kind(pairs, tmp_path, monkeypatch):
    """model.kind_condition: both networks get the batch's (B,) preview kinds at every call, in training and in
    validation, as ordinary training tells the Refiner."""
    net = Refiner.from_cfg(refiner_config({**MODEL, "kind_condition": True}))
    path = save_refiner(net.state_dict(), net.cfg, tmp_path / "kind_teacher", bridge=TEACHER_BRIDGE, step=0)
    kinds, forward = [], Refiner.forward

    def spy(self, *args, preview_kind=None, **kw):
        kinds.append(preview_kind)
        return forward(self, *args, preview_kind=preview_kind, **kw)

    monkeypatch.setattr(Refiner, "forward", spy)
    s = _distill(path, pairs, tmp_path / "run", 2, ["model.kind_condition=true", "data.val_samples=4"])
    assert s["val_mse_to_teacher"] is not None
    assert len(kinds) >= 2 * (4 + 1) and all(isinstance(k, torch.Tensor) and k.dtype == torch.long for k in kinds)


def test_a_resume_with_another_teacher_is_one_warning(teacher, pairs, tmp_path, caplog):
    """The checkpoint keeps the teacher's fingerprint (not its weights): an export rebuilt at the teacher's path
    between the two halves of a run is named in one warning line."""
    import shutil

    path = shutil.copytree(teacher, tmp_path / "teacher")
    extra = ["data.val_samples=0", "ckpt_every=2"]
    _distill(path, pairs, tmp_path / "run", 2, extra)
    net, meta = load_refiner(path)
    state = {k: v + 0.01 for k, v in net.state_dict().items()}
    save_refiner(state, net.cfg, path, bridge=meta["bridge"], step=1, weights="raw")
    with caplog.at_level("WARNING", logger="surf_train.training.module"):
        assert _distill(path, pairs, tmp_path / "run", 3, extra)["steps"] == 3
    lines = [r.getMessage() for r in caplog.records if "distils another one" in r.getMessage()]
    assert len(lines) == 1 and str(path) in lines[0] and "\n" not in lines[0], lines


@pytest.mark.parametrize(
    "what, extra, said",
    [
        ("no such teacher", [], ["module.distill.teacher: ", "nothing: not an exported Refiner"]),
        ("another shape", ["model.dim=64", "model.heads=4"], ["is a Refiner with dim=32", "but model has dim=64"]),
        ("with init_from_wan", ["module.init_from_wan=x"], ["set module.init_from_wan=null"]),
    ],
)
def test_a_bad_teacher_is_one_configerror_line(teacher, pairs, tmp_path, what, extra, said):
    path = tmp_path / "nothing" if what == "no such teacher" else teacher
    with pytest.raises(Exception) as e:
        _distill(path, pairs, tmp_path / "run", 2, extra)
    err = user_error(e.value)
    assert isinstance(err, ConfigError) and "\n" not in str(err), e.value
    assert all(part in str(err) for part in said), str(err)
    if what == "another shape":
        assert str(teacher) in str(err)


@pytest.mark.skipif(not (ASSETS_DIR / "toy_refiner").is_dir(), reason="assets/toy_refiner missing")
def test_toy_student_experiment_distils_the_shipped_refiner():
    """+experiment=toy_student (make toy-student): the model is the shipped teacher's shape, the student a 1-step
    sampler with its start noise, on the pairs `make toy-refiner` makes."""
    cfg = compose_cfg(["+experiment=toy_student", "module.decode_base=null"])
    assert cfg.module.distill.teacher == "assets/toy_refiner" and cfg.module.distill.steps == 1
    assert {s.shards for s in cfg.data.sources.values()} == {"runs/toy_refiner/gen_pairs", "runs/toy_refiner/sr_pairs"}
    m = instantiate(cfg.module, _convert_="all")
    teacher = load_refiner(ASSETS_DIR / "toy_refiner")[1]["bridge"]
    assert {k: m.hparams["bridge"][k] for k in teacher} == {**teacher, "steps": 1}
    assert (m.bridge.steps, m.bridge.sigma_aug_eval, m.bridge.noise_space, m.bridge.up_mode) == (
        1,
        0.6,
        "detail",
        "nearest",
    )


def test_a_checkpoint_with_an_unknown_distill_setting_is_one_configerror():
    """An export of a checkpoint whose module.distill records a setting this code does not know (one from another
    version) is one line naming it, not a TypeError."""
    assert provenance({"teacher": "assets/toy_refiner", "steps": 1})["gt_weight"] == 0.0
    with pytest.raises(ConfigError, match=r"module.distill: unknown settings \['sharpness_weight'\]"):
        provenance({"teacher": "assets/toy_refiner", "steps": 1, "sharpness_weight": 0.0})
