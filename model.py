"""A GPT of attention (T) and Mamba-1/2/3 (M, with mamba-ssm's parameters and init) layers, mixed by a pattern string.
mamba-ssm's fused kernels on CUDA; elsewhere PyTorch, and the Mamba-1 scan on CPU in C (cpu_scan.py)."""

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpu_scan import cpu_scan, cpu_scan_available


@dataclass
class GPTConfig:
    block_size: int = 1024      # training context
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6          # < n_head: grouped-query attention
    n_embd: int = 768
    block_pattern: str = "T"    # 'T' attention / 'M' Mamba per layer, tiled to n_layer: "TMMM" -> TMMMTMMM...
    mamba_version: int = 1      # 1: Mamba (S6), 2: Mamba-2 (SSD), 3: Mamba-3 (SISO)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64           # Mamba-2 and Mamba-3 head size
    mamba_mlp: bool = False     # an MLP after every Mamba mixer, as in a T block


@functools.cache
def cuda_kernels():
    try:  # mamba-ssm's and causal-conv1d's fused kernels by name, or None; imported on first use with a CUDA tensor
        from causal_conv1d import causal_conv1d_update
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    except Exception:  # not installed, built without CUDA, or mamba-ssm < 2.3 (no Mamba-3)
        return None
    return dict(locals())  # the functions imported above, by name


def kernels_for(x):
    """The fused kernels for x's device, or None. A test points this at mamba-ssm's Triton kernels run on CPU."""
    return cuda_kernels() if x.is_cuda else None


# -----------------------------------------------------------------------------
# Norm, rotary, attention, MLP

def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no learnable gain, as nanochat


def rotary(start, T, head_dim, device):
    """cos, sin (1, T, 1, head_dim/2) for positions start..start+T-1, computed on the fly: no buffer to keep."""
    inv_freq = 10000.0 ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(start, start + T, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):  # x (B, T, H, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # QK-norm alone caps a logit at sqrt(head_dim) (5.7 for 32-dim heads): too flat to pick one token out of
        # hundreds, which copying from the context needs. A learnable query gain lifts the cap.
        self.q_gain = nn.Parameter(torch.ones(self.head_dim))

    def forward(self, x, cos, sin, kv=None, pos=0):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, -1, self.head_dim) for lin in (self.c_q, self.c_k, self.c_v))
        q = F.rms_norm(apply_rotary(q, cos, sin), (self.head_dim,), self.q_gain)  # QK-norm
        k = norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if kv is not None:  # write this chunk into the cache, attend to everything so far
            kv[0][:, :, pos:pos + T], kv[1][:, :, pos:pos + T] = k, v
            k, v = kv[0][:, :, :pos + T], kv[1][:, :, :pos + T]
        # causal from position 0; one new token sees everything; a chunk at pos.. sees the cache and itself causally
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos) if pos and T > 1 else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pos == 0,
                                           enable_gqa=k.size(1) != q.size(1))
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


# -----------------------------------------------------------------------------
# Mamba-1: selective state space model (S6)
#   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t      per channel d and state n
#   y_t = C_t . h_t + D * x_t
# Each mixer has mamba-ssm's parameters and init at its defaults, so that state dicts load both ways, and
# forward(u (B, L, d_model), state=None) -> (B, L, d_model): state, from allocate_state, continued and updated in place.

def selective_scan(x, dt, A, B, C, h0=None):
    """x, dt (b, L, D); A (D, N); B, C (b, L, N); h0 (b, D, N) or None -> y (b, L, D) without D skip, h_L (b, D, N)"""
    if x.shape[1] == 1 and h0 is not None:  # one step (decode)
        h = torch.exp(dt[:, 0, :, None] * A) * h0 + (dt * x)[:, 0, :, None] * B[:, 0, None, :]
        return (h @ C[:, 0, :, None]).squeeze(-1).unsqueeze(1), h
    if x.device.type == "cpu" and x.dtype == torch.float32 and cpu_scan_available():  # the C loop
        return cpu_scan(x, dt, A, B, C, h0)[:2]
    return chunked_scan(x, dt, A, B, C, h0)


def chunked_scan(x, dt, A, B, C, h0=None):
    """Chunks of ~sqrt(L) steps scanned at once, then the state carried across them; exact and stable in any dtype."""
    (b, L, D), N = x.shape, A.shape[1]
    Q = max(1, math.isqrt(L))
    nc = -(-L // Q)
    pad = nc * Q - L  # padded steps have dt = 0: decay 1, no input, so the final state is unchanged
    dt, x, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (dt, x, B, C))
    decay = torch.exp(dt.unsqueeze(-1) * A).view(b, nc, Q, D, N)               # (b, nc, Q, D, N)
    inp = ((dt * x).unsqueeze(-1) * B.unsqueeze(2)).view(b, nc, Q, D, N)      # (b, nc, Q, D, N)
    h, cum, hs, cums = 0, 1, [], []
    for t in range(Q):  # inside every chunk, from a zero state
        h = decay[:, :, t] * h + inp[:, :, t]
        cum = cum * decay[:, :, t]  # decay since the chunk's start
        hs.append(h)
        cums.append(cum)
    carry = torch.zeros(b, D, N, dtype=x.dtype, device=x.device) if h0 is None else h0.to(x.dtype)
    carries = []
    for c in range(nc):  # across chunks: state at the start of chunk c
        carries.append(carry)
        carry = cum[:, c] * carry + h[:, c]
    h = torch.stack(hs, 2) + torch.stack(cums, 2) * torch.stack(carries, 1).unsqueeze(2)  # (b, nc, Q, D, N)
    y = (h.view(b, nc * Q, D, N) @ C.unsqueeze(-1)).squeeze(-1)                       # (b, L+pad, D)
    return y[:, :L], carry


def causal_conv(conv1d, x, conv_state=None, kernels=None):
    """silu(causal depthwise conv): x (B, L, C) -> (B, L, C), continuing conv_state (B, C, d_conv) if given."""
    if conv_state is not None and x.shape[1] == 1:  # one token (decode), on causal-conv1d's kernel if given
        if kernels:
            return kernels["causal_conv1d_update"](x[:, 0].to(conv_state.dtype), conv_state,
                                                   conv1d.weight.squeeze(1), conv1d.bias, "silu").unsqueeze(1)
        conv_state.copy_(torch.cat([conv_state[..., 1:], x.transpose(1, 2)], dim=-1))
        return F.silu((conv_state * conv1d.weight.squeeze(1)).sum(-1) + conv1d.bias).unsqueeze(1)
    L, x = x.shape[1], x.transpose(1, 2)  # (B, C, L)
    if conv_state is None:
        x = conv1d(x)[..., :L]
    else:  # conv_state: the last d_conv inputs so far, in place of the zero padding; updated in place
        x = torch.cat([conv_state[..., 1:].to(x.dtype), x], dim=-1)
        conv_state.copy_(x[..., -conv_state.shape[-1]:])
        x = F.conv1d(x, conv1d.weight, conv1d.bias, groups=x.shape[1])
    return F.silu(x).transpose(1, 2).contiguous()  # (B, L, C): elementwise ops on a transposed view are slow


def dt_bias_init(n):
    """softplus^-1(dt) with dt log-uniform in [0.001, 0.1], floored at 1e-4: mamba-ssm's dt bias, for every mixer."""
    dt = torch.exp(torch.rand(n) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba(nn.Module):  # mamba_ssm.modules.mamba_simple.Mamba: dt_rank ceil(d_model / 16), biases on conv and dt_proj
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2):
        super().__init__()
        self.d_state, self.d_conv = d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)  # x, z
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)  # dt (low rank), B, C
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for m in (self.in_proj, self.conv1d, self.x_proj, self.out_proj):
            m.reset_parameters()  # torch defaults, as mamba-ssm
        std = self.dt_rank ** -0.5  # dt_proj keeps the variance of dt at init
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(dt_bias_init(self.d_inner))
        # S4D-real: A = -(1, 2, ..., N) for every channel
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)

    def allocate_state(self, batch_size):
        """(conv_state (B, D, d_conv) the last d_conv conv inputs, ssm_state (B, D, N) fp32), mamba-ssm's layout."""
        w = self.conv1d.weight
        return (torch.zeros(batch_size, self.d_inner, self.d_conv, device=w.device, dtype=w.dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=w.device, dtype=torch.float32))

    def forward(self, u, state=None):
        kernels, A = kernels_for(u), -torch.exp(self.A_log.float())  # A (D, N)
        if kernels and state is None:  # fused conv + scan + gate + out_proj
            return kernels["mamba_inner_fn"](
                self.in_proj(u).transpose(1, 2), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, D) each
        x = causal_conv(self.conv1d, x, None if state is None else state[0], kernels)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, L, D), bias added with the softplus
        if kernels and state is not None and u.shape[1] == 1:  # mamba-ssm's decode kernel, gate included
            y = kernels["selective_state_update"](state[1], x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D,
                                                  z=z[:, 0], dt_bias=self.dt_proj.bias, dt_softplus=True)
            return self.out_proj(y.to(u.dtype)).unsqueeze(1)
        dt = F.softplus(dt.float() + self.dt_proj.bias.float())  # fp32
        y, h = selective_scan(x.float(), dt, A, B.float(), C.float(), None if state is None else state[1])
        if state is not None:
            state[1].copy_(h)
        y = (y + x.float() * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(u.dtype))


# -----------------------------------------------------------------------------
# Mamba-2: state space duality (SSD). A is a scalar per head, so within a chunk of Q steps the scan is a masked
# attention-like matmul, and between chunks a short scan over chunk states (Dao & Gu 2024, ssd_minimal.py):
#   h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T      h (P, N) per head;   y_t = h_t C_t + D_h * x_t

def segsum(a_cum):
    """a_cum (..., T) cumulative sums -> (..., T, T): a_cum[i] - a_cum[j] = a[j+1] + ... + a[i] if j <= i, else -inf"""
    T = a_cum.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=a_cum.device).tril()
    return (a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)).masked_fill(~causal, float("-inf"))


def ssd_scan(x, a, B, C, chunk_size, h0=None):
    """x (b, L, H, P) already times dt; a (b, L, H) = dt * A; B, C (b, L, N); h0 (b, H, P, N) or None
    -> y (b, L, H, P) without the D skip, h_L (b, H, P, N)."""
    b, L, H, P = x.shape
    if L == 1 and h0 is not None:  # one step of the recurrence (decode)
        h = torch.exp(a[:, 0])[..., None, None] * h0 + x[:, 0, ..., None] * B[:, 0, None, None, :]
        return (h @ C[:, 0, None, :, None]).squeeze(-1).unsqueeze(1), h
    Q = min(chunk_size, L)
    pad = -L % Q  # padded steps: a = 0 and x = 0, so no decay and no input
    x, a, B, C = (F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) for t in (x, a, B, C))
    c = (L + pad) // Q
    x, B, C = x.view(b, c, Q, H, P), B.view(b, c, Q, -1), C.view(b, c, Q, -1)
    a = a.view(b, c, Q, H).permute(0, 3, 1, 2)  # (b, H, c, Q)
    a_cum = a.cumsum(-1)
    # 1. within each chunk: y = (C B^T * decay mask) x, an attention-like matmul
    scores = (C @ B.transpose(-1, -2)).unsqueeze(2) * torch.exp(segsum(a_cum)).transpose(1, 2)  # (b, c, H, Q, Q)
    y = (scores @ x.transpose(2, 3)).transpose(2, 3)                                        # (b, c, Q, H, P)
    # 2. each chunk's own contribution to the state at its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum).permute(0, 2, 3, 1)                   # (b, c, Q, H)
    states = torch.einsum("bcqhp,bcqn->bchpn", x * decay_to_end.unsqueeze(-1), B)           # (b, c, H, P, N)
    # 3. carry states across chunks (a scan over c, as a (c+1) x (c+1) matmul)
    h0 = states.new_zeros(b, 1, H, P, states.shape[-1]) if h0 is None else h0.unsqueeze(1).to(states.dtype)
    states = torch.cat([h0, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0)).cumsum(-1)))               # (b, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    # 4. what the state carried into each chunk adds to its outputs
    decay_from_start = torch.exp(a_cum).permute(0, 2, 3, 1).unsqueeze(-1)                   # (b, c, Q, H, 1)
    y = y + torch.einsum("bcqn,bchpn->bcqhp", C, states[:, :-1]) * decay_from_start
    return y.reshape(b, c * Q, H, P)[:, :L], states[:, -1]


class Mamba2(nn.Module):  # mamba_ssm.modules.mamba2.Mamba2: ngroups=1, D per head, gated RMSNorm
    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, chunk_size=64):  # 64: fastest on CPU
        super().__init__()
        self.d_state, self.d_conv, self.headdim, self.chunk_size = d_state, d_conv, headdim, chunk_size
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"Mamba2: expand * d_model = {self.d_inner} is not a multiple of headdim={headdim}")
        self.nheads = self.d_inner // headdim
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False)  # z, x, B, C, dt
        conv_dim = self.d_inner + 2 * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)  # over x, B, C
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = nn.RMSNorm(self.d_inner, eps=1e-5)  # gated: see gated_norm
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for m in (self.in_proj, self.conv1d, self.out_proj, self.norm):
            m.reset_parameters()
        self.dt_bias.copy_(dt_bias_init(self.nheads))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(1, 16)))  # A = -uniform(1, 16) per head
        self.D.fill_(1.0)

    def allocate_state(self, batch_size):
        w = self.conv1d.weight
        return (torch.zeros(batch_size, w.shape[0], self.d_conv, device=w.device, dtype=w.dtype),
                torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=w.device, dtype=torch.float32))

    def gated_norm(self, y, z):  # rmsnorm(y * silu(z)) * weight: mamba-ssm's RMSNormGated, norm_before_gate=False
        return F.rms_norm(y.float() * F.silu(z.float()), (self.d_inner,), self.norm.weight.float(), self.norm.eps)

    def forward(self, u, state=None):
        kernels, A = kernels_for(u), -torch.exp(self.A_log.float())  # A (H,)
        zxbcdt = self.in_proj(u)
        if kernels and state is None:  # fused conv + chunked scan + gated norm + out_proj
            return kernels["mamba_split_conv1d_scan_combined"](
                zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, A, self.D, self.chunk_size,
                rmsnorm_weight=self.norm.weight, rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight,
                outproj_bias=self.out_proj.bias, headdim=self.headdim, norm_before_gate=False)
        (b, L, _), H, P, N = u.shape, self.nheads, self.headdim, self.d_state
        conv_state, h0 = (None, None) if state is None else state
        z, xBC, dt = zxbcdt.split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        x, B, C = causal_conv(self.conv1d, xBC, conv_state, kernels).split([self.d_inner, N, N], dim=-1)
        x = x.reshape(b, L, H, P)  # (B, L, H, P)
        if kernels and h0 is not None and L == 1:  # decode kernel (D skip included); B, C (B, 1, N) as (B, ngroups, N)
            y = kernels["selective_state_update"](  # it takes per-(head, channel, state) parameters
                h0, x[:, 0], dt[:, 0, :, None].expand(-1, H, P), A[:, None, None].expand(H, P, N), B, C,
                self.D.unsqueeze(-1).expand(H, P), dt_bias=self.dt_bias.unsqueeze(-1).expand(H, P), dt_softplus=True)
            return self.out_proj(self.gated_norm(y.reshape(b, L, self.d_inner), z).to(u.dtype))
        if kernels:
            y, h = kernels["mamba_chunk_scan_combined"](x, dt, A, B.unsqueeze(2), C.unsqueeze(2), self.chunk_size,
                                                        dt_bias=self.dt_bias, dt_softplus=True, initial_states=h0,
                                                        return_final_states=True)
        else:
            dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, H)
            y, h = ssd_scan(x.float() * dt.unsqueeze(-1), dt * A, B.float(), C.float(), self.chunk_size, h0)
        if h0 is not None:
            h0.copy_(h)
        y = y + x * self.D.float().unsqueeze(-1)
        return self.out_proj(self.gated_norm(y.reshape(b, L, self.d_inner), z).to(u.dtype))


# -----------------------------------------------------------------------------
# Mamba-3, SISO (Lahoti et al. 2026). Per head, with dt_t > 0, A_t < 0 and lam_t in (0, 1) all data-dependent:
#   alpha_t = exp(dt_t A_t),  beta_t = alpha_t dt_t (1 - lam_t),  gamma_t = dt_t lam_t       (trapezoidal rule)
#   h_t = alpha_t h_{t-1} + beta_t v_{t-1} k_{t-1}^T + gamma_t v_t k_t^T      h (P, N);   y_t = h_t q_t + D v_t
# v = x, k = R(theta_t)(norm(B_t) + B_bias), q = R(theta_t)(norm(C_t) + C_bias): R turns pairs of state dims by
# theta_t = theta_{t-1} + pi tanh(angle_t) dt_t, a complex state written as data-dependent RoPE (q_t . k_s sees
# theta_t - theta_s). Unrolled, v_s k_s^T enters h_t (t > s) with weight w_s = gamma_s + dt_{s+1} (1 - lam_{s+1})
# and h_s with gamma_s: Mamba-2's SSD scan over x = w v, minus the diagonal's extra dt_{t+1} (1 - lam_{t+1}) term.

def rotate_pairs(x, cos, sin):
    """x (..., N) with pair (x[2i], x[2i+1]) turned by angle i, cos and sin (..., S); pairs from S on stay put."""
    S = cos.shape[-1]
    x0, x1 = x[..., :2 * S:2], x[..., 1:2 * S:2]
    return torch.cat([torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2), x[..., 2 * S:]], -1)


# mamba_ssm.modules.mamba3.Mamba3: one group of B and C, half the state dims rotated, no output norm, no conv
class Mamba3(nn.Module):
    def __init__(self, d_model, d_state=128, expand=2, headdim=64, chunk_size=64):
        super().__init__()
        self.d_state, self.headdim, self.chunk_size = d_state, headdim, chunk_size
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // headdim
        self.n_angles = d_state // 4  # rotated pairs: half the state dims turn
        if self.d_inner % headdim or not self.n_angles:
            raise ValueError(f"Mamba3: expand * d_model = {self.d_inner} must be a multiple of headdim={headdim} "
                             f"and d_state={d_state} >= 4")
        H = self.nheads  # z, x, B, C, dt, A, trap, angle:
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + 3 * H + self.n_angles, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.B_bias = nn.Parameter(torch.empty(H, 1, d_state))  # (H, MIMO rank 1, N)
        self.C_bias = nn.Parameter(torch.empty(H, 1, d_state))
        self.B_norm, self.C_norm = nn.RMSNorm(d_state, eps=1e-5), nn.RMSNorm(d_state, eps=1e-5)
        self.D = nn.Parameter(torch.empty(H))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for m in (self.in_proj, self.out_proj, self.B_norm, self.C_norm):
            m.reset_parameters()
        self.dt_bias.copy_(dt_bias_init(self.nheads))
        for p in (self.B_bias, self.C_bias, self.D):
            p.fill_(1.0)

    def allocate_state(self, batch_size):
        """(angle (B, H, S), ssm_state (B, H, P, N) fp32; the last token's k (B, 1, H, N), v (B, H, P)): mamba-ssm's."""
        w, (H, P, N) = self.in_proj.weight, (self.nheads, self.headdim, self.d_state)
        return (torch.zeros(batch_size, H, self.n_angles, device=w.device),
                torch.zeros(batch_size, H, P, N, device=w.device),
                torch.zeros(batch_size, 1, H, N, device=w.device, dtype=w.dtype),
                torch.zeros(batch_size, H, P, device=w.device, dtype=w.dtype))

    def project(self, u):
        """u -> the kernel's inputs: z, x (..., H, P); BC (..., 2, 1, N); dt, dt A, trap (..., H); angle (..., S)."""
        H, N = self.nheads, self.d_state
        z, x, BC, dt, A, trap, angle = self.in_proj(u).split(
            [self.d_inner, self.d_inner, 2 * N, H, H, H, self.n_angles], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -F.softplus(A.float()).clamp(min=1e-4)
        BC = F.rms_norm(BC.unflatten(-1, (2, 1, N)), (N,), eps=self.B_norm.eps)  # B and C at once (speed)
        BC = BC * torch.stack([self.B_norm.weight, self.C_norm.weight]).unsqueeze(1)
        return z.unflatten(-1, (H, -1)), x.unflatten(-1, (H, -1)), BC, dt, dt * A, trap, angle

    def forward(self, u, state=None):
        kernels = kernels_for(u)
        (b, L, _), H, P, N = u.shape, self.nheads, self.headdim, self.d_state
        z, x, BC, dt, adt, trap, angle = self.project(u)
        if kernels and L > 1:  # fused rotary + trapezoid + scan + gate
            y = kernels["mamba3_siso_combined"](
                BC[:, :, 1], BC[:, :, 0], x, *(t.transpose(1, 2) for t in (adt, dt, trap)), self.C_bias.squeeze(1),
                self.B_bias.squeeze(1), angle.float().unsqueeze(2).expand(-1, -1, H, -1), self.D, z,
                chunk_size=self.chunk_size, return_final_states=state is not None,
                Input_States=None if state is None else (state[0], state[1], state[2].squeeze(1), state[3]))
            if state is not None:
                y, *new = y
                for s, n in zip(state, (new[0], new[1], new[2].unsqueeze(1), new[3])):
                    s.copy_(n)
            return self.out_proj(y.reshape(b, L, self.d_inner).to(u.dtype))
        lam = torch.sigmoid(trap.float())                                           # (b, L, H)
        theta = (torch.pi * torch.tanh(angle.float())).unsqueeze(2) * dt.unsqueeze(-1)  # (b, L, H, S)
        theta = theta.cumsum(1) + (0 if state is None else state[0].unsqueeze(1))
        kq = BC.float() + torch.stack([self.B_bias, self.C_bias]).squeeze(2)        # (b, L, 2, H, N), biased
        k, q = rotate_pairs(kq, theta.cos().unsqueeze(2), theta.sin().unsqueeze(2)).unbind(2)  # (b, L, H, N)
        shifted = F.pad((dt * (1 - lam))[:, 1:], (0, 0, 0, 1))  # dt_{t+1} (1 - lam_{t+1}); none past the end
        h0 = None
        if state is not None:  # the state gets beta_0 v_{-1} k_{-1}^T, but for alpha_0, which SSD applies
            beta_v = (dt * (1 - lam))[:, 0, :, None, None] * state[3].float().unsqueeze(-1)  # (b, H, P, 1)
            h0 = (state[1] + beta_v * state[2].float().transpose(1, 2)).reshape(b * H, 1, P, N)
        heads_as_batch = lambda t: t.transpose(1, 2).reshape(b * H, L, *t.shape[3:])  # SSD with per-head B, C
        y, h = ssd_scan(heads_as_batch(x.float() * (dt * lam + shifted).unsqueeze(-1)).unsqueeze(2),
                        heads_as_batch(adt.unsqueeze(-1)), heads_as_batch(k), heads_as_batch(q), self.chunk_size, h0)
        y = y.view(b, H, L, P).transpose(1, 2) + (self.D.float() - shifted * (q * k).sum(-1)).unsqueeze(-1) * x.float()
        if state is not None:
            for s, n in zip(state, (theta[:, -1] % (2 * math.pi), h.view(b, H, P, N), k[:, -1:], x[:, -1])):
                s.copy_(n)
        return self.out_proj((y * F.silu(z.float())).reshape(b, L, self.d_inner).to(u.dtype))


# -----------------------------------------------------------------------------
# Blocks

class AttentionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, state=None, pos=0):
        x = x + self.attn(norm(x), cos, sin, state, pos)
        return x + self.mlp(norm(x))


class MambaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.mixer = (Mamba(c.n_embd, c.d_state, c.d_conv, c.expand) if c.mamba_version == 1 else
                      Mamba2(c.n_embd, c.d_state, c.d_conv, c.expand, c.headdim) if c.mamba_version == 2 else
                      Mamba3(c.n_embd, c.d_state, c.expand, c.headdim))
        self.mlp = MLP(config) if config.mamba_mlp else None

    def forward(self, x, cos, sin, state=None, pos=0):
        x = x + self.mixer(norm(x), state)
        return x if self.mlp is None else x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# GPT

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(f"n_embd={config.n_embd}, n_head={config.n_head}, n_kv_head={config.n_kv_head}: "
                             "n_head must divide n_embd and n_kv_head must divide n_head")
        if config.mamba_version not in (1, 2, 3):
            raise ValueError(f"mamba_version={config.mamba_version!r}: must be 1, 2 or 3")
        p, n = config.block_pattern, config.n_layer
        if not p or set(p) - set("TM") or len(p) > n:
            raise ValueError(f"block_pattern={p!r}: must be 1 to n_layer={n} letters, each 'T' or 'M'")
        self.config, self.pattern = config, (p * n)[:n]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([AttentionBlock(config) if k == "T" else MambaBlock(config) for k in self.pattern])))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init, but mixers keep mamba-ssm's; also for a model built on the meta device, after to_empty()."""
        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        s = 3 ** 0.5 * self.config.n_embd ** -0.5  # uniform with std 1/sqrt(n_embd)
        for block in self.transformer.h:
            if isinstance(block, AttentionBlock):
                for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                    nn.init.uniform_(lin.weight, -s, s)
                nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
                nn.init.ones_(block.attn.q_gain)
            else:
                block.mixer.reset_parameters()
            if block.mlp is not None:
                nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
                nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx, targets=None, cache=None, loss_reduction="mean"):
        """idx (B, T) -> logits (B, T, vocab) fp32, loss (targets -1 are ignored; "none" gives (B, T))."""
        B, T = idx.shape
        pos = 0 if cache is None else cache.pos
        if cache is not None and pos + T > cache.max_len:
            raise ValueError(f"cache holds max_len={cache.max_len} tokens; {pos} + {T} do not fit")
        cos, sin = rotary(pos, T, self.config.n_embd // self.config.n_head, idx.device)
        x = norm(self.transformer.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, None if cache is None else cache.layers[i], pos)
        logits = self.lm_head(norm(x)).float()  # (B, T, vocab)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return logits, loss.view(B, T) if loss_reduction == "none" else loss

    def init_cache(self, batch_size, max_len):
        """.layers: per layer (k, v) (B, n_kv_head, max_len, hd) for T, the mixer's state for M; .pos: tokens seen."""
        w, cfg = self.lm_head.weight, self.config
        kv = (batch_size, cfg.n_kv_head, max_len, cfg.n_embd // cfg.n_head)
        layers = [tuple(torch.zeros(kv, device=w.device, dtype=w.dtype) for _ in range(2))
                  if isinstance(block, AttentionBlock) else block.mixer.allocate_state(batch_size)
                  for block in self.transformer.h]
        return SimpleNamespace(layers=layers, max_len=max_len, pos=0)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0):
        """Prefill idx (B, T) once, then decode one token at a time from the cache -> (B, T + max_new_tokens)."""
        cache, new = self.init_cache(idx.size(0), idx.size(1) + max_new_tokens), idx
        for _ in range(max_new_tokens):
            new = sample_next(self(new, cache=cache)[0][:, -1], temperature)
            idx = torch.cat([idx, new], dim=1)
        return idx

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs (3x forward) per token: 6 per matmul or conv weight, attention scores and values, scans."""
        flops = 6 * sum(m.weight.numel() for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))
        for block in self.transformer.h:
            m = getattr(block, "mixer", None)
            if m is None:  # attention: QK^T and AV, 2 * 2 * n_embd * seq_len forward
                flops += 3 * 4 * self.config.n_embd * seq_len
            elif isinstance(m, Mamba):  # ~9 flops per (channel, state): exp(dt A), dt B x, decay, add, C h
                flops += 3 * 9 * m.d_inner * m.d_state
            else:  # SSD over chunks of Q: C B^T (once: Mamba-2's B, C are shared by the heads; per head for Mamba-3),
                # and per head the masked scores times x, state in, state out
                Q, H, P, N = min(m.chunk_size, seq_len), m.nheads, m.headdim, m.d_state
                flops += 3 * ((1 if isinstance(m, Mamba2) else H) * 2 * Q * N + H * (2 * Q * P + 4 * P * N))
        return flops

    def configure_optimizers(self, learning_rate, weight_decay, betas, device_type, embedding_lr_mult=1.0):
        """[AdamW] (as nanochat): no weight decay on vectors, A_log, D, embedding and LM head; embedding lr x mult."""
        named = dict(self.named_parameters())
        wte = named.pop("transformer.wte.weight")
        # by name, not by mamba-ssm's p._no_weight_decay flag, which to_empty() (meta-device init) drops
        no_decay = {n for n, p in named.items() if p.ndim < 2 or n.endswith(("A_log", ".D", "lm_head.weight"))}
        groups = [dict(params=[p for n, p in named.items() if n not in no_decay], weight_decay=weight_decay),
                  dict(params=[p for n, p in named.items() if n in no_decay], weight_decay=0.0),
                  dict(params=[wte], weight_decay=0.0, lr=learning_rate * embedding_lr_mult)]
        return [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")]

    @classmethod
    def from_checkpoint(cls, ckpt):  # an unknown model_args key is a TypeError that names it
        model = cls(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model


def sample_next(logits, temperature=0.0, generator=None):
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), 1, generator=generator)
