"""The Refiner speaks diffusers: its output types, its attention through diffusers' dispatch (backends, processors)
equal to the attention before it, regional compilation, loading from a Hub snapshot with a subfolder, a model card
the Hub reads. diffusers' own tester mixins on it: tests/referee."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from surf_train.models import refiner as R
from surf_train.models.blocks import TextAttnProcessor, WindowAttnProcessor
from surf_train.models.refiner import Refiner, RefinerConfig
from surf_train.models.windows import window_attention


def _net(seed=0, **kw) -> Refiner:
    """A tiny Refiner with a non-zero output (the zero-initialised gates and output projection drawn at random)."""
    torch.manual_seed(seed)
    net = Refiner.from_cfg(RefinerConfig(**{"in_channels": 4, "dim": 24, "heads": 2, "depth": 2, "text_dim": 16, **kw}))
    with torch.no_grad():
        gates = [b.scale_shift_table for b in net.blocks]
        for p in (net.proj_out.weight, net.condition_embedder.time_proj.weight, *gates):
            p.normal_(std=0.2)
    return net.eval()


def _inputs(b=2, f=3, h=12, w=16, pad_from=5):
    """x_t, t, cond (B, 4, F, H, W) and text (B, 12, 16) whose last sample is padding after `pad_from` tokens."""
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(b, 4, f, h, w, generator=g), torch.randn(b, 4, f, h, w, generator=g)
    text = torch.randn(b, 12, 16, generator=g)
    text[-1, pad_from:] = 0
    return x, torch.rand(b, generator=g), cond, text


@pytest.fixture
def restore_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: put it back."""
    before, _ = _AttentionBackendRegistry.get_active_backend()
    yield
    _AttentionBackendRegistry.set_active_backend(before)


def test_forward_returns_the_diffusers_output_or_a_tuple():
    net, args = _net(), _inputs()
    with torch.no_grad():
        out, tup = net(*args), net(*args, return_dict=False)
    assert isinstance(out, Transformer2DModelOutput) and isinstance(tup, tuple) and len(tup) == 1
    assert out.sample.shape == args[0].shape and torch.equal(out.sample, tup[0]) and out.sample.abs().min() > 0


class PreviousWindowProcessor(WindowAttnProcessor):
    """The window attention before the dispatch: torch's SDPA on contiguous (windows, heads, Lw, d)."""

    def attend(self, query, key, value, attn_mask=None):
        q, k, v = (y.transpose(1, 2).contiguous() for y in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)


class PreviousTextProcessor(TextAttnProcessor):
    """The text attention before the dispatch: torch's SDPA on (B, heads, N, d) views, the mask (B, 1, 1, L)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None):
        heads = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(-1, (heads, -1)).transpose(1, 2)
        v = attn.to_v(encoder_hidden_states).unflatten(-1, (heads, -1)).transpose(1, 2)
        mask = None
        if attention_mask is not None:
            has_text = attention_mask.any(-1)
            mask = (attention_mask | ~has_text[:, None])[:, None, None, :]
        o = attn.to_out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))
        return o if attention_mask is None else o * has_text[:, None, None].to(o.dtype)


@pytest.mark.parametrize("impl", ["grouped", "mask"])
def test_native_backend_equals_the_attention_before_the_dispatch(impl, restore_backend):
    """Bit for bit: the windows (one dispatch call per window-size group) and the whole Refiner, set through
    diffusers' processor API."""
    g = torch.Generator().manual_seed(0)
    for grid, shift in (((3, 6, 8), True), ((3, 6, 8), False), ((5, 7, 9), True)):
        q, k, v = (torch.randn(2, grid[0] * grid[1] * grid[2], 2, 12, generator=g) for _ in range(3))
        with attention_backend(AttentionBackendName.NATIVE):
            new = window_attention(q, k, v, grid, (2, 4, 4), shift, impl, WindowAttnProcessor().attend)
        old = window_attention(q, k, v, grid, (2, 4, 4), shift, impl, PreviousWindowProcessor().attend)
        assert torch.equal(new, old), (grid, shift)
    net, args = _net(window=(2, 4, 4), attn_impl=impl), _inputs(h=12, w=18)
    with torch.no_grad():
        net.set_attention_backend("native")
        new = net(*args).sample
        net.reset_attention_backend()
        net.set_attn_processor(
            {k: PreviousTextProcessor() if ".attn2." in k else PreviousWindowProcessor() for k in net.attn_processors}
        )
        old = net(*args).sample
    assert torch.equal(new, old)


def test_trimmed_text_padding_equals_masking_it(monkeypatch):
    """The Refiner cuts the text after the last real token (no mask when nothing left is padding); masking the
    padding instead, as before, gives the same velocities within float32 rounding."""
    net, (x, t, cond, text) = _net(), _inputs(pad_from=5)
    padded = torch.cat([text, torch.zeros(2, 500, 16)], 1)  # as a 512-token text encoder pads
    with torch.no_grad():
        trimmed = net(x, t, cond, padded).sample
        assert torch.equal(trimmed, net(x, t, cond, text).sample)
        monkeypatch.setattr(R, "trim_text", lambda tx, m: (tx, R.text_padding_mask(tx) if m is None else m))
        masked = net(x, t, cond, padded).sample
    torch.testing.assert_close(trimmed, masked, atol=1e-6, rtol=1e-6)


def test_trim_text_cases():
    text = _inputs(pad_from=5)[3]
    cut, mask = R.trim_text(text, None)
    assert cut.shape == (2, 12, 16) and mask[1].tolist() == [True] * 5 + [False] * 7  # sample 0 is all real
    cut, mask = R.trim_text(text[1:], None)
    assert cut.shape == (1, 5, 16) and mask is None  # a lone prompt: no padding left, no mask
    assert R.trim_text(torch.zeros(2, 4, 16), None) == (None, None)  # no real token: as no text


@pytest.mark.parametrize("backend", ["_native_math", "_native_flash", "flex"])
def test_cpu_attention_backends_agree_with_native(backend, restore_backend):
    """A flash kernel takes no mask: a lone prompt (its padding cut) runs on it; a batch with padding does not."""
    net, args = _net(), _inputs(b=1 if "flash" in backend else 2)
    with torch.no_grad():
        ref = net(*args).sample
        net.set_attention_backend(backend)
        got = net(*args).sample
        if "flash" in backend:
            with pytest.raises(ValueError, match="attn_mask"):
                net(*_inputs(b=2))
        net.reset_attention_backend()
    assert all(p._attention_backend is None for p in net.attn_processors.values())
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_diffusers_class_attributes_name_the_refiners_parts():
    net = _net(kind_condition=True)  # every optional part present: the preview-kind embedding too
    classes = {type(m).__name__ for m in net.modules()}
    assert set(Refiner._repeated_blocks) <= classes and set(Refiner._no_split_modules) <= classes
    names = [n for n, _ in net.named_modules()]
    assert all(any(p in n for n in names) for p in Refiner._skip_layerwise_casting_patterns)
    params = [n.split(".") for n, _ in net.named_parameters()]
    assert all(any(m in parts for parts in params) for m in Refiner._keep_in_fp32_modules)
    assert len(net.attn_processors) == 2 * 2  # window and text attention in each of 2 blocks


@pytest.mark.slow
def test_compile_repeated_blocks_gives_the_eager_output():
    """Regional compilation (inductor, one graph per block with no break; a plain and a shifted variant) on CPU:
    51 s on a busy 2-core machine (inductor compiles C++; faster with its cache warm)."""
    net, args = _net(window=(2, 4, 4)), _inputs(h=12, w=18)
    with torch.no_grad():
        eager = net(*args).sample
        net.compile_repeated_blocks(fullgraph=True)
        compiled = net(*args).sample
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = net(*args).sample
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, compiled)


HUB_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    from surf_train.common.errors import ConfigError
    from surf_train.models.loading import load_refiner
    from surf_train.models.refiner import Refiner
    want = Refiner.from_pretrained(sys.argv[1])  # the export itself
    net = Refiner.from_pretrained("surf-org/refiner-repo", subfolder="refiner")
    same, meta = load_refiner("surf-org/refiner-repo", subfolder="refiner")
    ok = all(torch.equal(v, net.state_dict()[k]) and torch.equal(v, same.state_dict()[k])
             for k, v in want.state_dict().items())
    try:
        load_refiner("surf-org/not-cached", subfolder="refiner")
        err = None
    except ConfigError as e:
        err = str(e)
    print(json.dumps({"equal": ok, "steps": meta["bridge"]["steps"], "error": err}))
    """
)


def test_hub_id_with_subfolder_loads_from_the_hub_cache_offline(tmp_path):
    """A hub repository holding the export under refiner/, laid out as huggingface_hub caches it; offline, with any
    network access sent to a dead proxy."""
    from surf_train.training.export import save_refiner

    net = _net()
    out = save_refiner(net.state_dict(), net.cfg, tmp_path / "export", bridge={"steps": 3})
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--surf-org--refiner-repo"
    snap = repo / "snapshots" / commit / "refiner"
    snap.mkdir(parents=True)
    for f in out.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": dead}
    p = subprocess.run(
        [sys.executable, "-c", HUB_LOAD, str(out)], env={**env, "HTTP_PROXY": dead}, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["equal"] and got["steps"] == 3
    assert got["error"].startswith("surf-org/not-cached: no such directory, and not loadable from the Hub")


@pytest.mark.parametrize(
    "base, hub", [("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", True), ("assets/toy_base", False), ("tiny:tiny", False)]
)
def test_model_card_is_what_the_hub_and_push_to_hub_read(base, hub, tmp_path):
    """The export's README.md parses as a Hub model card (YAML front matter: library_name, tags, base_model only
    for a Hub model); diffusers' push_to_hub path (load_or_create_model_card, populate_model_card) keeps it."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
    from huggingface_hub import ModelCard

    from surf_train.training.export import CARD_TAGS, save_refiner

    net = _net()
    record = {"base": {"id": base, "name": "b", "family": "wan", "revision": None}}
    out = save_refiner(net.state_dict(), net.cfg, tmp_path / "e", trained_on=record, source="step3.ckpt")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.tags == CARD_TAGS
    assert card.data.base_model == (base if hub else None)
    assert "# SURF Refiner" in card.text and "| base model | b (" in card.text
    pushed = populate_model_card(load_or_create_model_card(str(out / "README.md")))
    assert str(pushed) == str(card) == (out / "README.md").read_text()
