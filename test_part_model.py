"""Tests for model.py: run with `python test_part_model.py` or pytest.
The comparisons with mamba-ssm's own modules need its source (the sdist unpacked under .gpu/, or $MAMBA_SSM_SRC)
and einops; without them those parts skip and the hard-coded shapes and the sequential references still run."""
import ast
import functools
import glob
import importlib.util
import math
import os
import sys
import tempfile
import types

import torch
import torch.nn.functional as F

import model
from model import GPT, GPTConfig, Mamba, Mamba2, chunked_scan, layer_pattern, sample_next, selective_scan, ssd_scan

HERE = os.path.dirname(os.path.abspath(__file__))
# Tiny models gain nothing from threads, and on a loaded machine OpenMP threads spin-wait on each other:
# this file took 113 s with 2 threads and 13 s with 1 at load average 12 on 2 cores.
torch.set_num_threads(1)


def tiny(pattern, **kw):
    kw = dict(block_size=64, vocab_size=101, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, block_pattern=pattern) | kw
    return GPTConfig(**kw)


@torch.no_grad()
def randomize(model, seed=0):
    """Init leaves c_proj at 0 and lm_head near 0 (near-uniform logits); give every matrix real values so that
    equivalence tests compare something. A_log, D and the dt bias keep their init."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2 and "A_log" not in name:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


def scan_ref(x, dt, A, B, C, h0=None):
    """The definition, one time step at a time: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t."""
    h = torch.zeros(x.shape[0], *A.shape, dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def skip(msg):
    try:
        import pytest
    except ImportError:
        print(f"SKIP: {msg}")
        return
    pytest.skip(msg)


# mamba-ssm's own Python source (the sdist, unpacked under .gpu/ or at $MAMBA_SSM_SRC), loaded on CPU with its
# CUDA/Triton-only imports stubbed and its selective_scan_ref in place of the CUDA scan: the reference module.
SRC = os.environ.get("MAMBA_SSM_SRC") or next(iter(sorted(glob.glob(os.path.join(HERE, ".gpu", "mamba_ssm-*")))), None)


@functools.cache
def mamba_ssm_reference():
    if SRC is None or importlib.util.find_spec("einops") is None:
        return None
    before = set(sys.modules)

    def stub(name, **attrs):
        sys.modules[name] = mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    def load(name, rel):
        spec = importlib.util.spec_from_file_location(name, os.path.join(SRC, "mamba_ssm", rel))
        sys.modules[name] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def source_functions(rel, names, namespace):  # reference functions out of a file that needs Triton to import
        tree = ast.parse(open(os.path.join(SRC, "mamba_ssm", rel)).read())
        tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
        exec(compile(tree, rel, "exec"), namespace)
        return namespace

    import einops
    refs = source_functions("ops/triton/layernorm_gated.py", {"rms_norm_ref"},
                            dict(torch=torch, F=F, rearrange=einops.rearrange))
    refs["repeat"] = einops.repeat
    source_functions("modules/ssd_minimal.py", {"segsum", "ssd_minimal_discrete"}, refs)

    class RMSNormGated(torch.nn.Module):  # mamba-ssm's module around its own rms_norm_ref
        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))
            self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate

        def forward(self, x, z=None):
            return refs["rms_norm_ref"](x, self.weight, None, z=z, eps=self.eps, group_size=self.group_size,
                                        norm_before_gate=self.norm_before_gate)

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  seq_idx=None, cu_seqlens=None, dt_softplus=False, return_final_states=False,
                                  return_varlen_states=False):  # the kernel's contract, on ssd_minimal_discrete
        assert z is None and seq_idx is None and cu_seqlens is None and B.shape[2] == 1
        dt = dt.float() + dt_bias
        dt = F.softplus(dt) if dt_softplus else dt
        h = x.shape[2]
        B, C = B.expand(-1, -1, h, -1).float(), C.expand(-1, -1, h, -1).float()
        y, final = refs["ssd_minimal_discrete"](x.float() * dt.unsqueeze(-1), A * dt, B, C, chunk_size,
                                                None if initial_states is None else initial_states.unsqueeze(1))
        y = y + x * D.unsqueeze(-1)
        return (y, final) if return_final_states else y

    try:
        for pkg in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.utils", "mamba_ssm.modules",
                    "mamba_ssm.distributed"):
            stub(pkg)
        stub("selective_scan_cuda")
        stub("mamba_ssm.ops.triton.layer_norm", _layer_norm_fwd=None)
        stub("mamba_ssm.ops.triton.layernorm_gated", RMSNorm=RMSNormGated)
        stub("mamba_ssm.ops.triton.ssd_combined", mamba_chunk_scan_combined=mamba_chunk_scan_combined,
             mamba_split_conv1d_scan_combined=None)
        stub("mamba_ssm.distributed.tensor_parallel", ColumnParallelLinear=None, RowParallelLinear=None)
        stub("mamba_ssm.distributed.distributed_utils", all_reduce=None, reduce_scatter=None)
        load("mamba_ssm.utils.torch", "utils/torch.py")
        ssi = load("mamba_ssm.ops.selective_scan_interface", "ops/selective_scan_interface.py")
        simple = load("mamba_ssm.modules.mamba_simple", "modules/mamba_simple.py")
        mamba2 = load("mamba_ssm.modules.mamba2", "modules/mamba2.py")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
    assert simple.causal_conv1d_fn is None and simple.selective_state_update is None  # the pure-PyTorch paths
    assert mamba2.causal_conv1d_fn is None and mamba2.selective_state_update is None
    simple.selective_scan_fn = ssi.selective_scan_ref
    return types.SimpleNamespace(Mamba=simple.Mamba, Mamba2=mamba2.Mamba2, selective_scan_ref=ssi.selective_scan_ref,
                                 ssd_minimal_discrete=refs["ssd_minimal_discrete"])


# -----------------------------------------------------------------------------

def test_block_pattern_tiling_and_errors():
    assert layer_pattern(tiny("TMM", n_layer=7)) == "TMMTMMT"
    assert GPT(tiny("TM")).pattern == "TMTM"
    for bad in ("", "TX", "tm", "TMTMT"):  # bad char, lowercase, longer than n_layer=4
        try:
            GPT(tiny(bad))
        except ValueError as e:
            assert repr(bad) in str(e)
        else:
            raise AssertionError(f"block_pattern={bad!r} accepted")
    for kw in (dict(n_kv_head=3), dict(mamba_version=3)):
        try:
            GPT(tiny("M", **kw))
        except ValueError:
            pass
        else:
            raise AssertionError(f"{kw} accepted")


def check_scan(scan, dtype, atol, shapes=((2, 37, 8, 4), (1, 64, 16, 16), (3, 1, 4, 2), (2, 130, 40, 16))):
    """scan(x, dt, A, B, C, h0) against scan_ref in float64: outputs, final state, and all six gradients."""
    torch.manual_seed(0)
    for b, L, D, N in shapes:
        x, B, C = torch.randn(b, L, D), torch.randn(b, L, N), torch.randn(b, L, N)
        dt = F.softplus(torch.randn(b, L, D) - 1)
        A = -torch.exp(torch.randn(D, N))
        h0 = torch.randn(b, D, N)
        inputs = [t.to(dtype).requires_grad_() for t in (x, dt, A, B, C, h0)]
        inputs_ref = [t.double().requires_grad_() for t in (x, dt, A, B, C, h0)]
        y, h = scan(*inputs)
        y_ref, h_ref = scan_ref(*inputs_ref)
        assert y.dtype == dtype and torch.allclose(y.double(), y_ref, atol=atol)
        assert torch.allclose(h.double(), h_ref, atol=atol)
        gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
        grads = torch.autograd.grad((y * gy.to(dtype)).sum() + (h * gh.to(dtype)).sum(), inputs)
        grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), inputs_ref)
        for name, g, g_ref in zip("x dt A B C h0".split(), grads, grads_ref):
            scale = g_ref.abs().max().item()
            assert torch.allclose(g.double(), g_ref, atol=atol * max(1, scale)), f"grad {name} at {(b, L, D, N)}"


def test_chunked_scan_matches_sequential_reference():
    check_scan(chunked_scan, torch.float64, 1e-10)


def test_cpu_scan_kernel_matches_sequential_reference():
    if model.cpu_scan_kernel() is None:
        return skip("no C compiler: the CPU kernel is not built (the chunked scan runs instead)")
    assert (torch.tensor([1e-39]) * 1.0).item() > 0, "loading the kernel switched the process to flush-to-zero"
    check_scan(selective_scan, torch.float32, 2e-5)
    check_scan(selective_scan, torch.float32, 2e-5, shapes=((1, 300, 70, 3),))  # several checkpoints, ragged blocks


def test_mamba_falls_back_to_the_pytorch_scan():
    """Without a C compiler the mixer runs chunked_scan: same outputs and gradients."""
    torch.manual_seed(0)
    m = Mamba(d_model=32, d_state=8)
    u = torch.randn(2, 40, 32, requires_grad=True)
    y = m(u)
    g = torch.autograd.grad(y.square().sum(), [u, m.A_log, m.dt_proj.bias])
    kernel = model.cpu_scan_kernel
    model.cpu_scan_kernel = lambda: None
    try:
        y_fallback = m(u)
        g_fallback = torch.autograd.grad(y_fallback.square().sum(), [u, m.A_log, m.dt_proj.bias])
    finally:
        model.cpu_scan_kernel = kernel
    assert torch.allclose(y, y_fallback, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(g, g_fallback))


def test_ssd_scan_matches_sequential_reference():
    """Mamba-2's chunked SSD form == the Mamba-1 recurrence with A constant within a head."""
    torch.manual_seed(0)
    for b, L, H, P, N, Q in ((2, 37, 3, 4, 5, 8), (1, 16, 2, 2, 3, 16), (2, 5, 1, 3, 2, 64)):
        x, B, C = torch.randn(b, L, H, P, dtype=torch.float64), torch.randn(b, L, N, dtype=torch.float64), \
            torch.randn(b, L, N, dtype=torch.float64)
        dt = F.softplus(torch.randn(b, L, H, dtype=torch.float64) - 1)
        A = -torch.exp(torch.randn(H, dtype=torch.float64))
        h0 = torch.randn(b, H, P, N, dtype=torch.float64)
        inputs = [t.requires_grad_() for t in (x, dt, A, B, C, h0)]
        y, h = ssd_scan(x * dt.unsqueeze(-1), dt * A, B, C, Q, h0)
        y_ref, h_ref = scan_ref(x.reshape(b, L, H * P), dt.repeat_interleave(P, -1),
                                A.repeat_interleave(P).unsqueeze(-1).expand(H * P, N), B, C, h0.reshape(b, H * P, N))
        assert torch.allclose(y.reshape(b, L, H * P), y_ref) and torch.allclose(h.reshape(b, H * P, N), h_ref)
        gy, gh = torch.randn_like(y), torch.randn_like(h)
        grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs)
        loss_ref = (y_ref * gy.reshape(b, L, H * P)).sum() + (h_ref * gh.reshape(b, H * P, N)).sum()
        grads_ref = torch.autograd.grad(loss_ref, inputs)
        for name, g, g_ref in zip("x dt A B C h0".split(), grads, grads_ref):
            assert torch.allclose(g, g_ref), f"grad {name} at {(b, L, H, P, N, Q)}"
    ref = mamba_ssm_reference()
    if ref is None:
        return skip("mamba-ssm sources or einops not found: ssd_minimal_discrete not compared")
    x, a, B, C = torch.randn(2, 64, 3, 4), -torch.rand(2, 64, 3), torch.randn(2, 64, 5), torch.randn(2, 64, 5)
    y, h = ssd_scan(x, a, B, C, 16)
    per_head = lambda t: t.unsqueeze(2).expand(-1, -1, 3, -1)
    y_ref, h_ref = ref.ssd_minimal_discrete(x, a, per_head(B), per_head(C), 16)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(h, h_ref, atol=1e-5)


def test_mamba_state_dict_matches_mamba_ssm():
    # from mamba_ssm/modules/mamba_simple.py: d_inner = expand * d_model, dt_rank = ceil(d_model / 16)
    m = Mamba(d_model=64, d_state=16, d_conv=4, expand=2)
    expected = {"A_log": (128, 16), "D": (128,), "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4),
                "conv1d.bias": (128,), "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4),
                "dt_proj.bias": (128,), "out_proj.weight": (64, 128)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1)) and torch.all(m.D == 1)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.std() > 0.01  # log-uniform in [dt_min, dt_max]
    ref = mamba_ssm_reference()
    if ref is None:
        return skip("mamba-ssm sources or einops not found: compared with the hard-coded list only")
    theirs = ref.Mamba(d_model=64, d_state=16, d_conv=4, expand=2)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_mamba_matches_mamba_ssm_module():
    """Their module (run on CPU with selective_scan_ref) and ours, same weights: outputs, gradients, decode steps."""
    ref = mamba_ssm_reference()
    if ref is None:
        return skip("mamba-ssm sources or einops not found")
    torch.manual_seed(0)
    theirs = ref.Mamba(d_model=32, d_state=8, d_conv=4, expand=2, layer_idx=0)
    ours = Mamba(d_model=32, d_state=8, d_conv=4, expand=2)
    ours.load_state_dict(theirs.state_dict())
    u = torch.randn(2, 50, 32, requires_grad=True)
    y_theirs, y_ours = theirs(u), ours(u)
    assert torch.allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5), (y_ours - y_theirs).abs().max()
    g = torch.randn_like(y_ours)
    gu_theirs, *gp_theirs = torch.autograd.grad((y_theirs * g).sum(), [u, *theirs.parameters()])
    gu_ours, *gp_ours = torch.autograd.grad((y_ours * g).sum(), [u, *ours.parameters()])
    assert torch.allclose(gu_ours, gu_theirs, rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(theirs.named_parameters(), gp_ours, gp_theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"grad {name}: {(a - b).abs().max()}"
    # decoding: their step() (pure-PyTorch branch) vs ours, token by token after a prefill
    params = types.SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)
    state = ours.allocate_state(2)
    with torch.no_grad():
        theirs(u[:, :20], inference_params=params)
        ours(u[:, :20], state)
        steps = []
        for t in range(20, 30):
            params.seqlen_offset = t
            a, b = theirs(u[:, t:t + 1], inference_params=params), ours(u[:, t:t + 1], state)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
            steps.append(b)
    assert torch.allclose(torch.cat(steps, 1), y_ours[:, 20:30], rtol=1e-5, atol=1e-5)


def test_mamba2_matches_mamba_ssm_module():
    ref = mamba_ssm_reference()
    if ref is None:
        return skip("mamba-ssm sources or einops not found")
    torch.manual_seed(0)
    theirs = ref.Mamba2(d_model=32, d_state=8, headdim=16, chunk_size=16, use_mem_eff_path=False, layer_idx=0)
    ours = Mamba2(d_model=32, d_state=8, headdim=16, chunk_size=16)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    theirs = randomize(theirs)  # norm weight and all matrices away from their init
    theirs.norm.weight.data.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    u = torch.randn(2, 48, 32, requires_grad=True)  # 3 chunks
    y_theirs, y_ours = theirs(u), ours(u)
    assert torch.allclose(y_ours, y_theirs, rtol=1e-4, atol=1e-5), (y_ours - y_theirs).abs().max()
    g = torch.randn_like(y_ours)
    gu_theirs, *gp_theirs = torch.autograd.grad((y_theirs * g).sum(), [u, *theirs.parameters()])
    gu_ours, *gp_ours = torch.autograd.grad((y_ours * g).sum(), [u, *ours.parameters()])
    assert torch.allclose(gu_ours, gu_theirs, rtol=1e-4, atol=1e-5)
    ours_grads = dict(zip([n for n, _ in ours.named_parameters()], gp_ours))
    for (name, _), b in zip(theirs.named_parameters(), gp_theirs):
        assert torch.allclose(ours_grads[name], b, rtol=1e-4, atol=1e-4), f"grad {name}"
    params = types.SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)
    state = ours.allocate_state(2)
    with torch.no_grad():
        theirs(u[:, :32], inference_params=params)  # ssd_minimal_discrete takes whole chunks only
        ours(u[:, :32], state)
        for t in range(32, 42):
            params.seqlen_offset = t
            assert torch.allclose(theirs(u[:, t:t + 1], inference_params=params), ours(u[:, t:t + 1], state),
                                  rtol=1e-4, atol=1e-5)


def test_mamba2_init_matches_mamba_ssm():
    m = Mamba2(d_model=64, d_state=16, headdim=16)
    A = -torch.exp(m.A_log)
    assert A.shape == (8,) and (A <= -1).all() and (A >= -16).all() and torch.all(m.D == 1)
    dt = F.softplus(m.dt_bias)
    assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001 and torch.all(m.norm.weight == 1)


def test_decode_matches_full_recompute():
    for pattern, version in (("T", 1), ("M", 1), ("TM", 1), ("MMT", 1), ("M", 2), ("MMT", 2)):
        torch.manual_seed(0)
        model = randomize(GPT(tiny(pattern, mamba_version=version, headdim=16))).eval()
        prompt = torch.randint(0, 101, (2, 9))
        out = model.generate(prompt, 12)
        seq = prompt
        cache = model.init_cache(2, 9 + 12)
        logits_step, _ = model(prompt, cache=cache)
        with torch.no_grad():
            for i in range(12):
                logits_full, _ = model(seq)  # recompute everything
                assert (logits_full[:, -1] - logits_step[:, -1]).abs().max() < 1e-4, (pattern, version, i)
                seq = torch.cat([seq, logits_full[:, -1].argmax(-1, keepdim=True)], 1)
                logits_step, _ = model(seq[:, -1:], cache=cache)
        assert torch.equal(out, seq), (pattern, version)
        assert len(set(seq[:, 9:].flatten().tolist())) > 3, "degenerate model: the test would prove nothing"


@torch.no_grad()
def test_chunked_prefill_continues_a_cache():
    """Prefill 7 tokens, then chunks of 9, 1, 3 (multi-hop RAG appends documents mid-conversation)."""
    for pattern, version in (("T", 1), ("M", 1), ("TM", 1), ("MMT", 1), ("MMT", 2)):
        torch.manual_seed(1)
        model = randomize(GPT(tiny(pattern, mamba_version=version, headdim=16))).eval()
        idx = torch.randint(0, 101, (2, 20))
        full, _ = model(idx)
        cache = model.init_cache(2, 20)
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 16), (16, 17), (17, 20))]
        assert cache.pos == 20
        assert (torch.cat(parts, 1) - full).abs().max() < 1e-4, (pattern, version)
        try:
            model(idx[:, :1], cache=cache)
        except ValueError as e:
            assert "max_len=20" in str(e)
        else:
            raise AssertionError("overflowing the cache was accepted")


@torch.no_grad()
def test_kv_position_advances_when_last_layer_is_mamba():
    model = randomize(GPT(tiny("TM", n_layer=2))).eval()
    idx = torch.randint(0, 101, (1, 6))
    cache = model.init_cache(1, 6)
    for t in range(6):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
    assert cache.pos == 6
    assert (logits[:, -1] - model(idx)[0][:, -1]).abs().max() < 1e-4


def test_dt_bias_survives_gpt_init():
    model = GPT(tiny("M"))
    for block in model.transformer.h:
        dt = F.softplus(block.mixer.dt_proj.bias)
        assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001 and dt.std() > 0.01
        assert torch.all(block.mixer.D == 1) and block.mixer.A_log[0, -1] == math.log(16)


def test_meta_device_init_leaves_nothing_uninitialised():
    with torch.device("meta"):
        model = GPT(tiny("TM"))
    model.to_empty(device="cpu")
    for p in model.parameters():  # fill with garbage: init_weights must overwrite every parameter
        p.data.fill_(float("nan"))
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    dt = F.softplus(model.transformer.h[1].mixer.dt_proj.bias)
    assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001
    logits, loss = model(torch.randint(0, 101, (1, 8)), torch.randint(0, 101, (1, 8)))
    assert torch.isfinite(loss) and abs(loss.item() - math.log(101)) < 0.1


def test_optimizer_groups():
    for version in (1, 2):
        check_optimizer_groups(GPT(tiny("TM", mamba_mlp=True, mamba_version=version, headdim=16)))
    with torch.device("meta"):  # to_empty() drops parameter attributes: the groups must not depend on them
        model = GPT(tiny("TM", mamba_mlp=True))
    model.to_empty(device="cpu")
    model.init_weights()
    check_optimizer_groups(model)


def check_optimizer_groups(model):
    adamw, muon = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu", muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    for n in in_muon:
        assert model.get_parameter(n).ndim == 2 and n.startswith("transformer.h.")
        assert not any(s in n for s in ("A_log", ".D", "bias", "conv1d", "wte", "lm_head")), n
    assert "transformer.h.1.mixer.in_proj.weight" in in_muon and "transformer.h.0.attn.c_q.weight" in in_muon
    no_decay = {names[id(p)] for g in adamw.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    mixer = {n for n in names.values()
             if n.startswith("transformer.h.1.mixer.") and not n.endswith(("proj.weight", "conv1d.weight"))}
    assert mixer <= no_decay and {"transformer.h.1.mixer.A_log", "transformer.h.1.mixer.D"} <= mixer  # + dt/conv biases
    (adamw_only,) = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu")
    assert sum(len(g["params"]) for g in adamw_only.param_groups) == len(names)
    x = torch.randint(0, 101, (2, 16))  # one step changes every parameter that gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x, x)[1].backward()
    adamw.step(), muon.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.grad is not None)


def test_pure_transformer_state_dict_is_a_plain_gpt():
    sd = GPT(tiny("T", n_layer=2)).state_dict()
    per_layer = ["attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.c_proj.weight",
                 "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert list(sd) == ["transformer.wte.weight"] + [f"transformer.h.{i}.{k}" for i in range(2) for k in per_layer] \
        + ["lm_head.weight"]


def test_loss_mask_reduction_and_dtypes():
    torch.manual_seed(0)
    model = randomize(GPT(tiny("TM")))
    idx = torch.randint(0, 101, (2, 10))
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = model(idx, targets)
    _, losses = model(idx, targets, loss_reduction="none")
    assert logits.shape == (2, 10, 101) and logits.dtype == torch.float32 and losses.shape == (2, 10)
    assert torch.all(losses[:, :4] == 0)
    assert torch.allclose(loss, losses[:, 4:].mean())
    assert torch.allclose(loss, F.cross_entropy(logits[:, 4:].reshape(-1, 101), idx[:, 4:].reshape(-1)))
    for dtype in (torch.bfloat16, torch.float64):  # nothing hard-codes a dtype
        logits_d, loss_d = model.to(dtype)(idx, targets)
        assert logits_d.dtype == torch.float32 and abs(loss_d.item() - loss.item()) < 0.05 * loss.item()
        assert model.generate(idx[:, :3], 4).shape == (2, 7)


def test_from_checkpoint_round_trip():
    import dataclasses
    model = randomize(GPT(tiny("MMT", mamba_mlp=True)))
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config)}, f"{d}/ckpt.pt")
        loaded = GPT.from_checkpoint(torch.load(f"{d}/ckpt.pt", weights_only=True))
    idx = torch.randint(0, 101, (1, 12))
    assert loaded.pattern == "MMTM" and torch.equal(model(idx)[0], loaded(idx)[0])
    try:
        GPT.from_checkpoint({"model": {}, "model_args": dataclasses.asdict(model.config) | {"n_lyer": 3}})
    except ValueError as e:
        assert "n_lyer" in str(e)
    else:
        raise AssertionError("unknown model_args key accepted")


def test_sample_next():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert sample_next(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}


def test_flops_per_token():
    model = GPT(tiny("TM", n_layer=2))
    matmul = model.num_params() - model.transformer.wte.weight.numel()
    f256, f512 = model.flops_per_token(256), model.flops_per_token(512)
    assert f512 - f256 == 12 * 64 * 256  # one attention layer's score/value term grows with the context
    assert 6 * matmul < f256 - 12 * 64 * 256 < 7 * matmul  # + scan and conv terms of the M layer


if __name__ == "__main__":
    import time
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            t = time.time()
            fn()
            print(f"{name} ok ({time.time() - t:.1f}s)")
