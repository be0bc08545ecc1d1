"""Each variant script is drama_xs.py plus its ablation (the paper's 3.2 and 3.3: uniform sampling instead of DFS,
Mamba-1 instead of Mamba-2, the S model) and nothing else.

A fix that lands in drama_xs.py but not in a variant (or the reverse) shows up here as a changed line
outside the variant's ablation region.
"""

import ast
import difflib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# variant -> (top-level blocks of drama_xs.py its diff may touch, most changed lines allowed)
ABLATIONS = {
    "drama_s": ({"Args"}, 6),
    "drama_uniform_sampling": ({"Args", "check_args", "ReplayBuffer", "softmax"}, 60),
    "drama_mamba1": (
        {"imports", "mamba_chunk_scan_combined, MAMBA_SSM_ERROR", "TRITON_SCAN", "Args", "check_args", "segment_sum",
         "ssd_scan", "GatedRMSNorm", "Mamba2", "MambaBlock"},
        282,
    ),
}


def top_level_blocks(source: str) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of every top-level statement, 1-based; imports are named 'imports', an
    assignment by the names it assigns ('a, b')."""
    blocks = []
    for node in ast.parse(source).body:
        assigned = ", ".join(n.id for t in getattr(node, "targets", []) for n in ast.walk(t) if isinstance(n, ast.Name))
        name = getattr(node, "name", "imports" if isinstance(node, ast.Import | ast.ImportFrom | ast.Try) else assigned)
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        blocks.append((first, node.end_lineno, name))
    return blocks


def block_of(line: int, blocks) -> str:
    """Name of the block containing `line`, or the block right after it (comments and blank lines belong to
    the next statement, as section headers do)."""
    for _first, last, name in blocks:
        if line <= last:
            return name
    return "end of file"


def diff_outside_ablation(root: Path, variant: str) -> tuple[list[str], int]:
    """Changed regions of `diff drama_xs.py {variant}.py` outside the variant's ablation, and the changed lines."""
    base = (root / "drama_xs.py").read_text()
    other = (root / f"{variant}.py").read_text()
    allowed, _ = ABLATIONS[variant]
    blocks = top_level_blocks(base)
    matcher = difflib.SequenceMatcher(None, base.splitlines(), other.splitlines(), autojunk=False)
    outside, changed = [], 0
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        changed += (i2 - i1) + (j2 - j1)
        first, last = i1 + 1, max(i1 + 1, i2)
        touched = {block_of(line, blocks) for line in range(first, last + 1)}
        outside += [f"drama_xs.py:{first}-{last} ({name})" for name in sorted(touched - allowed)]
    return outside, changed


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_diff_touches_only_the_ablation(variant):
    assert (ROOT / f"{variant}.py").exists(), f"{variant}.py is missing"
    outside, changed = diff_outside_ablation(ROOT, variant)
    assert not outside, f"{variant}.py differs from drama_xs.py outside its ablation: {outside}"
    assert 0 < changed <= ABLATIONS[variant][1], f"{variant}.py: {changed} changed lines"


def test_s_changes_only_args_defaults():
    import drama_s
    import drama_xs

    xs, s = drama_xs.Args(), drama_s.Args()
    differing = {k for k in vars(xs) if getattr(xs, k) != getattr(s, k)}
    assert differing == {"exp_name", "encoder_filters", "d_state"}
    assert s.encoder_filters == tuple(2 * f for f in xs.encoder_filters) and s.d_state == 2 * xs.d_state


def test_a_drifted_fix_is_caught(tmp_path):
    """The check can fail: a fix in train_world_model that only one script got is outside every ablation."""
    source = (ROOT / "drama_xs.py").read_text()
    (tmp_path / "drama_xs.py").write_text(source)
    (tmp_path / "drama_s.py").write_text(
        source.replace(
            "    starts = buffer.sample_world_model_starts(args, rng)\n",
            "    starts = buffer.sample_world_model_starts(args, rng)\n    starts.sort()\n",
            1,
        )
    )
    outside, changed = diff_outside_ablation(tmp_path, "drama_s")
    assert changed == 1 and outside == [outside[0]] and "train_world_model" in outside[0]
