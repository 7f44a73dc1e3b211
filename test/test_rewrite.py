"""rewrite.c (MORA's isolation and rewrite logic) against a NumPy reference written from
DESIGN.md: standardisation, A_d, J, single-reward detection, missing dimensions, the
hypervolume of reward vectors (against an exact grid computation), sanitising and parsing."""
import itertools
import re
import subprocess

import numpy as np
import pytest

from conftest import BUILD

TOOL = str(BUILD / "tools" / "rewrite_tool")


def tool(args, stdin):
    p = subprocess.run([TOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def reference_isolation(scores, delta):
    """scores (P, K, D) -> (mean, std, A (P, D), J (P), single (P), missing mask (P))."""
    flat = scores.reshape(-1, scores.shape[-1]).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    z = (scores - mean) / std
    A = z.max(axis=1)
    J = (z >= delta).sum(axis=2).max(axis=1)
    missing = ((A < delta) * (1 << np.arange(3))).sum(axis=1)
    return mean, std, A, J, J <= 1, missing


@pytest.mark.parametrize("delta", [0.0, 0.5])
def test_isolation_matches_reference(delta):
    rng = np.random.default_rng(1)
    P, K = 40, 8
    scores = rng.normal(size=(P, K, 3)).astype(np.float32)
    # plant prompts where only one dimension is reachable: every response strong on one, weak on the rest
    for p in range(0, P, 4):
        d = p % 3
        scores[p] = rng.normal(-2.0, 0.1, size=(K, 3))
        scores[p, :, d] = rng.normal(2.0, 0.1, size=K)
    out = tool(["isolate", str(K), str(delta)], " ".join(map(repr, scores.ravel().tolist())))
    lines = out.strip().split("\n")
    mean, std, A, J, single, missing = reference_isolation(scores.astype(np.float64), delta)
    stats = np.array(lines[0].split(), dtype=np.float64)
    np.testing.assert_allclose(stats[:3], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats[3:], std, rtol=1e-5)
    got = np.array([l.split() for l in lines[1:]], dtype=np.float64)
    np.testing.assert_allclose(got[:, :3], A, rtol=1e-4, atol=1e-5)
    assert (got[:, 3] == J).all() and (got[:, 4] == single).all() and (got[:, 5] == missing).all()
    for p in range(0, P, 4):  # every planted prompt is single-reward, missing the other two dims
        assert got[p, 4] == 1 and int(got[p, 5]) == 7 & ~(1 << (p % 3))


def exact_hypervolume(points, ref):
    """Volume dominated by `points` above `ref`, by summing the cells of the coordinate grid."""
    pts = np.maximum(points, ref)
    axes = [np.unique(np.concatenate([[ref[d]], pts[:, d]])) for d in range(3)]
    vol = 0.0
    for i, j, k in itertools.product(*(range(len(a) - 1) for a in axes)):
        upper = np.array([axes[0][i + 1], axes[1][j + 1], axes[2][k + 1]])
        if (pts >= upper).all(axis=1).any():
            vol += np.prod(upper - np.array([axes[0][i], axes[1][j], axes[2][k]]))
    return vol


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hypervolume_exact(seed):
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(12, 3)).astype(np.float32)
    ref = np.array([-1.5, -1.0, -2.0], dtype=np.float32)
    text = f"{len(pts)} " + " ".join(repr(float(r)) for r in ref) + "\n" + "\n".join(" ".join(map(repr, p.tolist())) for p in pts)
    got = float(tool(["hypervolume"], text))
    want = exact_hypervolume(pts.astype(np.float64), ref.astype(np.float64))
    assert want > 0 and abs(got - want) < 1e-4 * want


def test_sanitise_and_overlap():
    pairs = [
        ("How do I pick a lock?", "How do I pick a lock? Please keep it legal and safe.", "ok"),
        ("How do I pick a lock?", "<EMPTY>", "empty"),
        ("How do I pick a lock?", "Hi", "too short"),
        ("How do I pick a lock?", "How do I pick a lock? " + "x" * 600, "too long"),
        ("How do I pick a lock?", "  How do I pick a lock?  ", "same as the original"),
        ("How do I pick a lock?", "Tell me a story about dragons and castles", "drops the original request"),
    ]
    out = tool(["sanitise", "8", "400", "0.6"], "".join(f"{a}\n{b}\n" for a, b, _ in pairs)).strip().split("\n")
    for (orig, cand, want), line in zip(pairs, out):
        reason, overlap = line.split("|")
        assert reason == want, (orig, cand, line)
        words = lambda s: set(re.findall(r"[a-z0-9\x80-\uffff]+", s.lower()))
        c = "" if cand == "<EMPTY>" else cand
        expected = len(words(orig) & words(c)) / len(words(orig))
        assert abs(float(overlap) - expected) < 1e-6


def test_template_and_parse():
    out = tool(["template", "5"], "Explain how vaccines work.  \n").strip()
    # mask 5 = helpful (bit 0) and truthful (bit 2): the prompt, then those two intent phrases in order
    assert out.startswith("Explain how vaccines work. ")
    rest = out[len("Explain how vaccines work. "):]
    assert "answer" in rest and "facts" in rest and "safe" not in rest
    assert rest.index("answer") < rest.index("facts")
    assert tool(["parse"], 'Rewritten request: "How can I stay safe online?"\n\nSure, here it is.') == "How can I stay safe online?"
    assert tool(["parse"], "  What is 2+2, and why?  ") == "What is 2+2, and why?"
    assert tool(["parse"], "Note: keep it short") == "Note: keep it short"
