"""The reward heads' kernels (reward_heads.cu: reward_heads_forward_kernel, reward_mlp_units_kernel,
reward_heads_param_grad_kernel, reward_heads_dhidden_kernel, bradley_terry_kernel) run on the
CPU through test/reward_heads_emu.cpp (the emulated CUDA toolkit of test/emu_cuda/ on the GPU
emulation of test/gpu_emu.h) against the CPU heads of llmc/reward_heads.c on the same fresh
random inputs: reward_heads_forward (the rewards), reward_heads_backward (every parameter
gradient and the hidden-state gradient, both added to non-zero starting values) and
bradley_terry_loss (the loss and both gradients), for each head the header supports (linear, and
mlp with GELU and with ReLU).

The CPU heads compute in double, the kernels in fp32, so each output may differ by the fp32
roundings of the kernel's sums, bounded from the sizes of their terms (computed here in float64):
a sum of n terms in any order is within about n 2^-24 of the sum of their magnitudes, and the
error of an mlp unit's pre-activation carries through the activation's slope into what is made
of it. A term left out or taken twice, a wrong index or a wrong head is far outside those bounds
(the mutation check shows one element of the hidden state changed by 2^-8 of itself is).
Outputs that are only written (the rewards, the Bradley-Terry loss and gradients) start as NaN;
the gradients are added to non-zero starting values, as reward_heads_backward does. Each case
runs with the threads of each block forward and in reverse and the launches' blocks forward, in
reverse and shuffled (gpu_emu.ORDERS). The backward without dhidden, and the Bradley-Terry loss
without gradients, must give the same bits as with them.

Nothing in train_mora calls these kernels: `train_mora reward` trains the heads on the CPU
(see reward_heads_cuda.h)."""
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import ORDERS, build_emulator, rewrite_launches, run_program, sanitizer_flags

LINEAR, MLP = 0, 1
GELU, RELU = 0, 1
D = 3                 # MORA_NUM_DIMS
U = 2.0 ** -24        # fp32 unit roundoff
GELU_K, GELU_A = np.sqrt(2.0 / np.pi), 0.044715
CPU_OBJECTS = ["reward_heads", "model", "ops_cpu", "matmul", "utils"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("gcc not found: the CPU heads are C")
    build = tmp_path_factory.mktemp("reward_heads")
    objects = []
    for name in CPU_OBJECTS:   # the CPU heads and what llmc/reward_heads.c links
        obj = build / f"{name}.o"
        subprocess.run([cc, "-std=gnu11", "-O2", "-fopenmp", *sanitizer_flags(), "-I", str(ROOT / "llmc"), "-I", str(ROOT),
                        "-c", str(ROOT / "llmc" / f"{name}.c"), "-o", str(obj)], check=True)
        objects.append(obj)
    launched = rewrite_launches((ROOT / "reward_heads.cu").read_text(), 5)
    return build_emulator(build, launched, "reward_heads_emu", suffix=".cu",
                          flags=["-I", str(ROOT / "test" / "emu_cuda"), "-I", str(ROOT / "test"), "-I", str(ROOT), "-fopenmp",
                                 "-Wno-unused-function"],
                          objects=[*objects, "-lm"])


def head_size(kind, C, H):
    return C + 1 if kind == LINEAR else H * C + 2 * H + 1


def make_inputs(kind, C, H, N, M, seed):
    rng = np.random.default_rng(seed)
    P = head_size(kind, C, H)
    params = np.empty((D, P), np.float32)
    for d in range(D):
        if kind == LINEAR:
            params[d] = rng.standard_normal(P) / np.sqrt(C)
        else:   # W1 ~ N(0, 1/C), b1, w2 ~ N(0, 1/H), b2: the units in the activation's active range
            params[d, :H * C] = rng.standard_normal(H * C) / np.sqrt(C)
            params[d, H * C:] = rng.standard_normal(2 * H + 1) * np.r_[np.full(H, 0.5), np.full(H, 1 / np.sqrt(H)), [1.0]]
    hidden = rng.standard_normal((N, C)).astype(np.float32)
    dims = rng.integers(0, D, N).astype(np.int32)
    drew = rng.standard_normal(N).astype(np.float32)
    grads0 = (0.1 * rng.standard_normal((D, P))).astype(np.float32)
    dhidden0 = (0.1 * rng.standard_normal((N, C))).astype(np.float32)
    chosen, rejected = (3.0 * rng.standard_normal((2, M))).astype(np.float32)
    if M >= 2:   # extreme margins stay finite
        chosen[:2], rejected[:2] = [200.0, -200.0], [-200.0, 200.0]
    return dict(params=params, hidden=hidden, dims=dims, drew=drew, grads0=grads0, dhidden0=dhidden0, chosen=chosen,
                rejected=rejected)


def run(emulator, tmp_path, kind, act, C, H, x, order="forward"):
    """The kernels' outputs and the CPU heads' (dicts of float32 arrays)."""
    N, M = x["hidden"].shape[0], x["chosen"].size
    P = head_size(kind, C, H)
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([kind, act, N, C, H, M], np.int32).tofile(f)
        for name in ("params", "hidden", "dims", "drew", "grads0", "dhidden0", "chosen", "rejected"):
            x[name].tofile(f)
    proc = run_program([emulator, inp, outp], order)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = np.fromfile(outp, np.float32)
    gpu_sizes = [("rewards", (N, D)), ("grads", (D, P)), ("dhidden", (N, C)), ("grads_no_dhidden", (D, P)), ("loss", (1,)),
                 ("dchosen", (M,)), ("drejected", (M,)), ("loss_no_grads", (1,))]
    cpu_sizes = [("rewards", (N, D)), ("grads", (D, P)), ("dhidden", (N, C)), ("loss", (1,)), ("dchosen", (M,)),
                 ("drejected", (M,))]
    out, at = [], 0
    for sizes in (gpu_sizes, cpu_sizes):
        got = {}
        for name, shape in sizes:
            n = int(np.prod(shape))
            got[name] = raw[at:at + n].reshape(shape)
            at += n
        out.append(got)
    assert at == raw.size
    return out


def act_and_slopes(a, act):
    """act(a), act'(a) and a bound on |act''| near a (float64)."""
    if act == RELU:
        return np.maximum(a, 0.0), (a > 0).astype(np.float64), np.zeros_like(a)
    u = GELU_K * (a + GELU_A * a ** 3)
    t = np.tanh(u)
    du = GELU_K * (1.0 + 3.0 * GELU_A * a * a)
    slope = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * du
    return 0.5 * a * (1.0 + t), slope, np.full_like(a, 0.8)   # |gelu''| <= 0.8 everywhere


def bounds(kind, act, C, H, x):
    """How far each of the kernels' outputs may lie from the CPU heads' (float64 arrays shaped as
    the outputs): the fp32 roundings of the kernels' sums and activations, from the terms'
    magnitudes, plus the CPU result's own rounding to float32 (half an ulp, taken as U |ref|
    by the caller)."""
    params, h, dims, dr = (x[k].astype(np.float64) for k in ("params", "hidden", "dims", "drew"))
    dims = x["dims"]
    g0, dh0 = np.abs(x["grads0"].astype(np.float64)), np.abs(x["dhidden0"].astype(np.float64))
    N = h.shape[0]
    rows = [dims == d for d in range(D)]
    nd = np.array([r.sum() for r in rows])
    sums = lambda n: (n + 4) * U   # a sum of n terms (and its add to a starting value), any order
    if kind == LINEAR:
        w, b = params[:, :C], params[:, C]
        rewards = sums(C + 1) * (np.abs(h) @ np.abs(w).T + np.abs(b))
        grads = np.empty_like(params)
        for d in range(D):
            grads[d, :C] = sums(nd[d] + 1) * (g0[d, :C] + np.abs(dr[rows[d]]) @ np.abs(h[rows[d]]))
            grads[d, C] = sums(nd[d] + 1) * (g0[d, C] + np.abs(dr[rows[d]]).sum())
        dhidden = 4 * U * (dh0 + np.abs(dr[:, None] * w[dims]))
        return rewards, grads, dhidden
    W1 = params[:, :H * C].reshape(D, H, C)
    b1, w2, b2 = params[:, H * C:H * C + H], params[:, H * C + H:H * C + 2 * H], params[:, -1]
    rewards = np.empty((N, D))
    e_units = np.empty((N, H))   # each row's units (head dims[n]): error of act(a) ...
    e_dpre = np.empty((N, H))    # ... and of dpre = dr w2 act'(a)
    units, dpre = np.empty((N, H)), np.empty((N, H))
    for d in range(D):
        a = h @ W1[d].T + b1[d]                                     # (N, H)
        ea = sums(C + 1) * (np.abs(h) @ np.abs(W1[d]).T + np.abs(b1[d]))
        g, slope, curve = act_and_slopes(a, act)
        eg = np.abs(slope) * ea + 8 * U * (np.abs(a) + np.abs(g))   # tanhf's and the products' roundings
        terms = np.abs(g) * np.abs(w2[d])
        rewards[:, d] = np.abs(w2[d]) @ eg.T + sums(H + 1) * (terms.sum(axis=1) + np.abs(b2[d]))
        mine = dims == d
        units[mine], e_units[mine] = g[mine], eg[mine]
        ddr = np.abs(dr[mine, None] * w2[d])
        e_slope = curve[mine] * ea[mine] + 16 * U * (1.0 + np.abs(a[mine]))
        if act == RELU:   # a unit within its error of 0 may be on for one side and off for the other
            e_slope = np.where(np.abs(a[mine]) <= ea[mine], 1.0, e_slope)
        dpre[mine] = dr[mine, None] * w2[d] * slope[mine]
        e_dpre[mine] = ddr * e_slope + 4 * U * np.abs(dpre[mine])
    grads = np.empty_like(params)
    for d in range(D):
        r = rows[d]
        P = H * C
        gW1 = np.abs(dpre[r]).T @ np.abs(h[r]) + g0[d, :P].reshape(H, C)   # (H, C)
        grads[d, :P] = (sums(nd[d] + 1) * gW1 + e_dpre[r].T @ np.abs(h[r])).ravel()
        grads[d, P:P + H] = sums(nd[d] + 1) * (np.abs(dpre[r]).sum(axis=0) + g0[d, P:P + H]) + e_dpre[r].sum(axis=0)
        grads[d, P + H:P + 2 * H] = (sums(nd[d] + 1) * ((np.abs(dr[r, None] * units[r])).sum(axis=0) + g0[d, P + H:P + 2 * H])
                                     + np.abs(dr[r]) @ e_units[r])
        grads[d, -1] = sums(nd[d] + 1) * (np.abs(dr[r]).sum() + g0[d, -1])
    dhidden = np.empty((N, C))
    for n in range(N):
        Wn = np.abs(W1[dims[n]])
        dhidden[n] = sums(H + 1) * (np.abs(dpre[n]) @ Wn + dh0[n]) + e_dpre[n] @ Wn
    return rewards, grads, dhidden


def assert_within(name, got, ref, bound):
    assert got.shape == ref.shape and not np.isnan(got).any(), f"{name}: NaN, an element was not written"
    ref = ref.astype(np.float64)
    bad = np.abs(got.astype(np.float64) - ref) > bound + U * np.abs(ref)
    assert not bad.any(), (name, np.argwhere(bad)[:5].tolist(), got[bad][:5], ref[bad][:5])


def check(gpu, cpu, kind, act, C, H, x):
    rewards, grads, dhidden = bounds(kind, act, C, H, x)
    assert_within("rewards", gpu["rewards"], cpu["rewards"], rewards)
    assert_within("grads", gpu["grads"], cpu["grads"], grads)
    assert_within("dhidden", gpu["dhidden"], cpu["dhidden"], dhidden)
    # Bradley-Terry: the margin rounded once (then the softplus, slope at most 1, and sigmoid,
    # slope s (1 - s), carry it), expf/log1pf a few ulps, the mean a sum of M terms
    c, r = x["chosen"].astype(np.float64), x["rejected"].astype(np.float64)
    m = c - r
    softplus = np.maximum(-m, 0.0) + np.log1p(np.exp(-np.abs(m)))
    s = 1.0 / (1.0 + np.exp(m))
    M = m.size
    loss = ((M + 4) * U * softplus.sum() + U * np.abs(m).sum() + 8 * U * M) / M
    assert_within("loss", gpu["loss"], cpu["loss"], loss)
    dg = (s * (1.0 - s) * U * np.abs(m) + 8 * U * s) / M
    assert_within("dchosen", gpu["dchosen"], cpu["dchosen"], dg)
    assert_within("drejected", gpu["drejected"], cpu["drejected"], dg)


CASES = [  # kind, act, N, C, H, M (Bradley-Terry pairs)
    (LINEAR, GELU, 37, 576, 0, 1000),    # SmolLM2's width
    (LINEAR, GELU, 1, 100, 0, 1),        # one row (two heads get no rows), C under a block's 256 threads
    (LINEAR, GELU, 300, 768, 0, 2500),   # GPT-2's width; more pairs than the loss kernel's 1024 threads
    (MLP, GELU, 37, 576, 64, 1000),
    (MLP, RELU, 5, 768, 33, 3),          # H not a multiple of 32
    (MLP, GELU, 3, 40, 300, 1025),       # H past a block's 256 threads: a thread takes two units
    (MLP, RELU, 1, 1, 1, 2),             # the smallest head
]


def case_id(c):
    return "%s_N%d_C%d_H%d_M%d" % (("linear", "mlp-gelu", "mlp-relu")[c[0] + c[0] * c[1]], *c[2:])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernels_match_cpu_heads(emulator, tmp_path, case, order):
    kind, act, N, C, H, M = case
    x = make_inputs(kind, C, H, N, M, seed=N * 1000 + C + H + kind)
    gpu, cpu = run(emulator, tmp_path, kind, act, C, H, x, order)
    check(gpu, cpu, kind, act, C, H, x)
    # without dhidden the parameter gradients are the same bits; without the gradients, the loss
    assert np.array_equal(gpu["grads_no_dhidden"].view(np.uint32), gpu["grads"].view(np.uint32))
    assert np.array_equal(gpu["loss_no_grads"].view(np.uint32), gpu["loss"].view(np.uint32))
    # every head's gradient moved where it has rows; the heads without rows keep their starting values
    grads0 = x["grads0"]
    for d in range(D):
        if (x["dims"] == d).any():
            assert not np.array_equal(gpu["grads"][d], grads0[d])
        else:
            assert np.array_equal(gpu["grads"][d], grads0[d])


@pytest.mark.parametrize("kind,act,H", [(LINEAR, GELU, 0), (MLP, GELU, 64), (MLP, RELU, 33)])
def test_bounds_notice_one_changed_hidden_element(emulator, tmp_path, kind, act, H):
    """The comparison fails when the CPU heads see one element of the hidden state changed by 2^-8
    of itself (the kernels the unchanged one): the bounds are tight enough that an input element
    read wrongly, or a term dropped, shows in the rewards and the gradients."""
    N, C, M = 7, 96, 4
    x = make_inputs(kind, C, H, N, M, seed=77 + H)
    gpu, _ = run(emulator, tmp_path, kind, act, C, H, x)
    changed = {k: v.copy() for k, v in x.items()}
    n = int(np.argmax(np.abs(x["drew"])))   # a row whose gradient weight is not small
    c = int(np.argmax(np.abs(x["hidden"][n])))
    changed["hidden"][n, c] *= np.float32(1 + 2.0 ** -8)
    _, cpu = run(emulator, tmp_path, kind, act, C, H, changed)
    rewards, grads, dhidden = bounds(kind, act, C, H, x)
    for name, bound in (("rewards", rewards), ("grads", grads)):
        with pytest.raises(AssertionError):
            assert_within(name, gpu[name], cpu[name], bound)
