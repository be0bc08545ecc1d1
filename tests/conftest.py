"""What the tests share: the variant scripts (each test of a script's pieces runs on every script that has them), a
small but complete configuration of any of them, and one torch thread."""

import dataclasses
import importlib
import os

import pytest
import torch

VARIANTS = ("drama_xs", "drama_s", "drama_mamba1", "drama_uniform_sampling")  # the paper's agent and its ablations
WITH_DFS = tuple(v for v in VARIANTS if v != "drama_uniform_sampling")

if not torch.cuda.is_available():  # Triton can only interpret here, and triton.jit reads this when a kernel (its own
    os.environ.setdefault("TRITON_INTERPRET", "1")  # library's too) is defined: before anything imports triton


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """torch's OpenMP threads busy-wait: on a shared 2-core machine one thread is much faster."""
    torch.set_num_threads(1)


@pytest.fixture(params=VARIANTS, scope="module")
def mod(request):
    """Each variant script, imported (its training loop stays under `if __name__ == "__main__"`)."""
    return importlib.import_module(request.param)


@pytest.fixture(params=WITH_DFS, scope="module")
def dfs_mod(request):
    """Each variant script that samples with DFS."""
    return importlib.import_module(request.param)


# An agent small enough to build, save and act with in well under a second (`Args(env_id=..., **TINY_AGENT)`).
TINY_AGENT = dict(
    d_model=64,
    headdim=32,
    encoder_filters=(4, 8, 8, 8, 8),
    stoch_categoricals=8,
    stoch_classes=8,
    act_context_length=4,
    actor_hidden=32,
    critic_hidden=32,
    head_hidden=32,
)


def tiny_args(mod, **overrides):
    """A small but complete configuration of the script `mod` (overrides a variant's Args lacks are left out)."""
    kwargs = dict(
        env_id="ALE/Pong-v5",
        encoder_filters=(4, 8, 8, 8, 8),
        stoch_categoricals=4,
        stoch_classes=4,
        d_model=32,
        d_state=8,
        headdim=16,
        chunk_size=8,
        head_hidden=16,
        actor_hidden=16,
        critic_hidden=16,
        batch_size=2,
        sequence_length=16,
        random_steps=16,
        buffer_size=1000,
        imagine_batch_size=8,
        imagine_context_length=4,
        imagine_horizon=4,
        act_context_length=4,
    )
    kwargs.update(overrides)
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    return mod.Args(**{k: v for k, v in kwargs.items() if k in fields})
